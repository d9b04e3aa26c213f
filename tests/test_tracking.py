"""src/core/tracking.py against a real SQLite MLflow store: what one training run records, the model
logged to MLflow predicting like its checkpoint, concurrent store creation, an unreachable server."""
import csv
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from src.core import tracking
from src.core.errors import UserError
from src.core.params import flatten, load_params
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from src.networks.checkpoint import load_trained_model, save_checkpoint
from src.networks.factory import build_model

from conftest import REPO, env, free_port, image_folder, use_store


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty workspace as the stages see it: cwd = DVC_ROOT = tmp_path, no tracking server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after; MLflow itself exports it
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def test_training_run_records_everything_and_logged_model_predicts_like_checkpoint(workspace):
    params = load_params(REPO / "params.yaml")
    images = sorted(image_folder(workspace / "images", ["circle", "cross", "square"], per_class=3).rglob("*.png"))
    Path("data").mkdir()
    with open(tracking.MANIFEST, "w", newline="") as f:  # the split stage's manifest format
        csv.writer(f).writerows([["path", "label", "split", "sha256"]] +
                                [[str(p), p.parent.name, "train", "0" * 64] for p in images])
    Path("data/class_indices.json").write_text('{"0": "circle", "1": "cross", "2": "square"}')
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    save_checkpoint("models/model.pt", {
        "arch": "resnet18", "num_classes": 3, "class_names": ["circle", "cross", "square"], "image_size": 16,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "model": model.state_dict()})
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.3 * e, "val_loss": 1.1 / e, "val_acc": 0.25 * e,
                "lr": 0.01} for e in (1, 2)]
    digest = "ab" * 32

    with tracking.start_training_run(params, digest) as run:
        for row in history:
            tracking.log_epoch(row, flat=["lr"])  # lr constant in this run: not worth a chart
        best, ckpt = load_trained_model("models/model.pt")
        tracking.finish_training({"best_val_acc": 0.5}, history, ["data/class_indices.json"],
                                 checkpoint="models/model.pt", model=best, image_size=ckpt["image_size"])
    tracking.log_evaluation(params, run.info.run_id, "test",
                            {"accuracy": 0.75, "per_class": {"cross": {"f1": 1.0, "support": 3}}},
                            ["models/model.pt.missing", "data/class_indices.json"])

    client = mlflow.MlflowClient()
    logged = client.get_run(run.info.run_id)
    assert logged.info.run_name == "workspace"
    expected_params = {k: str(v) for k, v in flatten(params).items()}
    assert logged.data.params == expected_params
    assert logged.data.tags["dataset_digest"] == digest
    assert logged.data.metrics["test/accuracy"] == 0.75 and not any("cross" in k for k in logged.data.metrics)
    per_class = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/per_class_metrics.json")
    assert per_class["columns"] == ["class", "f1", "support"] and per_class["data"] == [["cross", 1.0, 3]]
    val_acc = client.get_metric_history(run.info.run_id, "curves/val_acc")
    assert [(m.step, m.value) for m in val_acc] == [(1, 0.25), (2, 0.5)]
    # The decisive curves in the chart view's first section, the rest under vitals/, no flat line;
    # MLflow orders sections as plain strings: curves, then the headline (test or val), then vitals.
    assert {k for k in logged.data.metrics if "/" in k and not k.startswith("test/")} == {
        "curves/val_acc", "curves/val_loss", "vitals/train_acc", "vitals/train_loss"}
    first, last = tracking.SECTIONS["decisive"], tracking.SECTIONS["rest"]
    for headline in ("test", "val"):
        assert sorted([last, headline, first]) == [first, headline, last]
    dataset = logged.inputs.dataset_inputs[0].dataset
    assert dataset.name == params["data"]["source"] and dataset.digest == digest[:36]

    # Artifacts live at the workspace root, as files.
    artifacts = Path(logged.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(workspace / "mlartifacts")
    assert (artifacts / "checkpoint/model.pt").read_bytes() == Path("models/model.pt").read_bytes()
    assert (artifacts / "plots/training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (artifacts / "class_indices.json").is_file()

    # The MLflow model, loaded back, predicts what the checkpoint predicts on the same image files.
    loaded = mlflow.pytorch.load_model(logged.data.tags["model_uri"])
    reference, ckpt = load_trained_model("models/model.pt")
    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.inference_mode():
        expected, got = reference(batch), loaded(batch)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got, expected, atol=1e-5)


def test_unreachable_tracking_server_fails_at_once_with_one_line(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = load_params(REPO / "params.yaml")
    with pytest.raises(UserError, match="unreachable") as error:
        tracking.start_training_run(params, "digest")
    assert "\n" not in str(error.value) and "MLFLOW_TRACKING_URI" in str(error.value)
    with pytest.raises(UserError, match="unreachable"):
        tracking.log_evaluation(params, "0" * 32, "test", {"accuracy": 1.0})
    assert not (workspace / "mlflow.db").exists()


SETUP_AT = """
import sys, time
from src.core import tracking
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # all processes reach the fresh store together
print(tracking.setup("race"))
"""


@pytest.mark.slow
def test_workers_creating_the_store_at_once_share_one_experiment(tmp_path):
    """What two `dvc queue start -j 2` workers do on their first run: no migration race, one experiment."""
    start = str(time.time() + 10)
    procs = [subprocess.Popen([sys.executable, "-c", SETUP_AT, start], cwd=REPO,
                              env={**env(), "DVC_ROOT": str(tmp_path)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), results
    ids = {out.strip().splitlines()[-1] for out, _, _ in results}
    assert len(ids) == 1
    use_store(tmp_path)
    experiment = mlflow.get_experiment_by_name("race")
    assert experiment.experiment_id in ids
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_evaluation_of_weights_trained_elsewhere_is_skipped_with_a_note(workspace, capsys):
    """e.g. `dvc pull`ed weights whose training run lives in another machine's store."""
    params = load_params(REPO / "params.yaml")
    tracking.log_evaluation(params, "0" * 32, "test", {"accuracy": 1.0})
    assert "not in" in capsys.readouterr().out
    assert mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], output_format="list") == []
