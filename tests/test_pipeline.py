"""The whole pipeline through real `dvc repro`, in a throw-away copy of the project."""
import csv
import json

import pytest

from conftest import logged_runs, run

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_repro_end_to_end_then_noop(digits_project):
    project = digits_project  # ingest, split and classes done (shared): `dvc repro` runs the rest
    run(["dvc", "repro"], project)

    manifest = read_csv(project / "data/manifest.csv")
    assert len(manifest) == 1797  # every digit image, each in exactly one split
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    classes = json.loads((project / "data/class_indices.json").read_text())
    assert classes == {str(i): str(i) for i in range(10)}

    train = json.loads((project / "metrics/train.json").read_text())
    assert train["epochs_run"] == 2
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    test_rows = [r for r in manifest if r["split"] == "test"]
    assert evaluation["test/images"] == len(test_rows)
    assert evaluation["test/accuracy"] > 0.3  # 2 epochs at 16 px: far above chance (0.1)
    # Temperature scaling, fitted on val, recorded in train.json; both calibration errors reported.
    assert 0.05 < train["temperature"] < 20 and train["temperature"] != 1.0
    assert {"test/ece", "test/ece_uncalibrated", "test/loss_uncalibrated"} <= set(evaluation)
    assert (project / "metrics/reliability.png").stat().st_size > 0

    predictions = read_csv(project / "data/predictions.csv")
    assert [p["file"] for p in predictions] == [r["path"] for r in test_rows]
    assert all(0 < float(p["probability"]) <= 1 for p in predictions)

    runs = logged_runs(project)
    assert len(runs) == 1
    assert runs[0].data.params["arch"] == "resnet18"
    assert runs[0].data.metrics["test/accuracy"] == evaluation["test/accuracy"]
    assert runs[0].data.metrics["best_val_acc"] == train["best_val_acc"]
    assert runs[0].data.metrics["test/ece_uncalibrated"] == evaluation["test/ece_uncalibrated"]
    assert "model_uri" not in runs[0].data.tags  # mlflow.log_model: false (the tests' setting)

    again = run(["dvc", "repro"], project)
    assert "up to date" in again.stdout
    assert len(logged_runs(project)) == 1
