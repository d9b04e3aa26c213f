"""The evaluate stage: its metrics against scikit-learn's on the same predictions."""
import csv
import json

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from src.evaluate import classification_metrics
from src.inference.calibration_error import chance_ece
from src.networks.checkpoint import load_trained_model

from conftest import image_folder, make_project, python, run, tutorial_logits, use_store

# Seven classes (more than 5, so top-5 accuracy is reported), few tiny images: trains in seconds.
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu & co"]
PER_CLASS = 14


def reference_ece(confidence, correct, bins):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            total += m.sum() / len(confidence) * abs(correct[m].mean() - confidence[m].mean())
    return total


def sklearn_metrics(y_true, probs, class_names, uncalibrated=None):
    """eval.json's numbers by scikit-learn; `uncalibrated`: the probabilities before temperature
    scaling (default: `probs`, a model without it)."""
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(1)
    raw = probs if uncalibrated is None else uncalibrated
    expected = {"images": len(y_true), "accuracy": skm.accuracy_score(y_true, y_pred),
                "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
                "loss": skm.log_loss(y_true, probs, labels=labels),
                "ece": reference_ece(probs.max(1), y_pred == y_true, 15),
                "loss_uncalibrated": skm.log_loss(y_true, raw, labels=labels),
                "ece_uncalibrated": reference_ece(raw.max(1), y_pred == y_true, 15)}
    if len(class_names) > 5:
        expected["top5_accuracy"] = skm.top_k_accuracy_score(y_true, probs, k=5, labels=labels)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        expected.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    expected["per_class"] = {name: {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
                             for i, name in enumerate(class_names)}
    return expected


def unflatten(flat):
    """eval.json's flat names (test/per_class/ant/f1) as nested dicts."""
    nested = {}
    for key, value in flat.items():
        *parents, last = key.split("/", 3 if "/per_class/" in key else 1)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def assert_same_metrics(got, expected, **tolerance):
    assert set(got) == set(expected) | {"chance_ece"}  # no scikit-learn counterpart: its own test below
    assert 0 < got["chance_ece"] < 1
    for key, value in expected.items():
        if key == "per_class":
            assert list(got[key]) == list(value)
            for name in value:
                assert got[key][name] == pytest.approx({k: float(v) for k, v in value[name].items()}, **tolerance)
        else:
            assert got[key] == pytest.approx(float(value), **tolerance), key


def test_chance_ece_is_the_ece_perfect_calibration_shows_by_chance_and_shrinks_as_images_grow():
    rng = np.random.default_rng(7)
    floors = []
    for n in (200, 3200):
        confidence = rng.uniform(0.35, 1.0, n)
        # answers right exactly as often as the model says: any ECE measured is chance
        measured = [reference_ece(confidence, rng.random(n) < confidence, 15) for _ in range(300)]
        floors.append(chance_ece(confidence, 15))
        assert floors[-1] == pytest.approx(np.mean(measured), rel=0.1)
        overconfident = rng.random(n) < confidence - 0.15  # 15 points less often right than it says
        assert reference_ece(confidence, overconfident, 15) > 0.12 > floors[-1]
    assert floors[1] == pytest.approx(floors[0] / 4, rel=0.25)  # ~1 / sqrt(images)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    shapes = image_folder(root / "shapes", CLASSES, PER_CLASS, size=24)
    project = make_project(root / "project", {
        "data.source": str(shapes), "data.val": 0.2, "data.test": 0.25})
    run(["dvc", "repro", "evaluate"], project)
    return project


@pytest.mark.slow
def test_eval_json_equals_scikit_learn_on_the_same_predictions(evaluated):
    project = evaluated
    flat = json.loads((project / "metrics/eval.json").read_text())
    assert all(key.startswith("test/") for key in flat)  # named after the split it measured
    results = unflatten(flat)["test"]
    with open(project / "metrics/confusion.csv", newline="") as f:
        confusion = list(csv.DictReader(f))
    assert len(confusion) == results["images"] == len(CLASSES) * 4  # 25% of 14 per class

    # The same predictions, computed here the tutorial's way (float transforms, plain fp32 model).
    model, ckpt = load_trained_model(project / "models/model.pt")
    assert ckpt["class_names"] == CLASSES
    paths = [project / r["path"] for r in confusion]
    y_true = np.array([CLASSES.index(r["actual"]) for r in confusion])
    logits = tutorial_logits(model, ckpt, paths).double()
    probs = torch.softmax(logits, 1).numpy()
    assert [CLASSES[i] for i in probs.argmax(1)] == [r["predicted"] for r in confusion]
    # Calibrated at training: the checkpoint's temperature undoes it.
    uncalibrated = torch.softmax(logits * ckpt["temperature"], 1).numpy()
    assert ckpt["temperature"] != 1.0 and results["loss"] != pytest.approx(results["loss_uncalibrated"])
    assert_same_metrics(results, sklearn_metrics(y_true, probs, CLASSES, uncalibrated), rel=1e-5, abs=1e-6)

    # Logged into the training's MLflow run: headline metrics named after the split, per class as a table.
    client = use_store(project)
    run_metrics = mlflow.get_run(ckpt["mlflow_run_id"]).data.metrics
    assert run_metrics["test/macro_f1"] == pytest.approx(results["macro_f1"])
    assert run_metrics["test/accuracy"] == pytest.approx(results["accuracy"])
    assert not any("per_class" in key or "gnu" in key for key in run_metrics)
    table = mlflow.artifacts.load_dict(f"runs:/{ckpt['mlflow_run_id']}/per_class_metrics.json")
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == CLASSES and rows["gnu & co"]["f1"] == pytest.approx(results["per_class"]["gnu & co"]["f1"])
    logged = {a.path for a in client.list_artifacts(ckpt["mlflow_run_id"])}
    assert {"confusion.png", "misclassified.png", "reliability.png", "confusion.csv",
            "per_class_metrics.json"} <= logged, logged


@pytest.mark.slow
def test_the_temperature_is_the_one_val_gives_the_saved_weights(evaluated):
    """Training fits T on the best epoch's val logits, kept from its validation: the same T as
    scoring val again with model.pt's weights before calibration."""
    from src.data.manifest import load_class_names, read_manifest, rows_for
    from src.inference.classify import classify_files
    from src.training.calibration import fit_temperature
    model, ckpt = load_trained_model(evaluated / "models/model.pt")
    with torch.no_grad():  # undo the temperature folded into the head
        model.fc.weight *= ckpt["temperature"]
        model.fc.bias *= ckpt["temperature"]
    paths, labels = rows_for(read_manifest(evaluated / "data/manifest.csv"), "val",
                             load_class_names(evaluated / "data/class_indices.json"))
    logits, _ = classify_files(model, ckpt, [evaluated / p for p in paths], torch.device("cpu"), batch_size=64)
    assert fit_temperature(logits, torch.tensor(labels)) == pytest.approx(ckpt["temperature"], rel=1e-4)


@pytest.mark.slow
def test_pictures_are_written(evaluated):
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(evaluated / "metrics" / name) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300


@pytest.mark.slow
def test_checkpoint_for_other_classes_is_refused(evaluated):
    index = evaluated / "data/class_indices.json"
    original = index.read_text()
    try:
        index.write_text(json.dumps({"0": "ant", "1": "bee"}))
        result = run([python(), "-m", "src.evaluate"], evaluated, check=False)
    finally:
        index.write_text(original)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "trained on classes" in result.stderr


def test_few_classes_have_no_top5_and_match_scikit_learn():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    logits = rng.normal(0, 2, (50, 3))
    y_true = rng.integers(0, 3, 50)
    y_true[:3] = 2  # every class present in the truth
    results, cm, probs = classification_metrics(y_true, logits, names, bins=10)
    assert "top5_accuracy" not in results
    assert cm.sum() == 50 and (cm.sum(1) == np.bincount(y_true, minlength=3)).all()
    expected = sklearn_metrics(y_true, probs, names)
    expected["ece"] = expected["ece_uncalibrated"] = reference_ece(probs.max(1), probs.argmax(1) == y_true, 10)
    assert_same_metrics(results, expected, rel=1e-9, abs=1e-12)


def train_then_evaluate(root, source, overrides):
    project = make_project(root / "project", {"data.source": str(source), **overrides})
    run(["dvc", "repro", "evaluate"], project)
    train = json.loads((project / "metrics/train.json").read_text())
    return train, unflatten(json.loads((project / "metrics/eval.json").read_text()))


@pytest.mark.slow
def test_train_best_val_accuracy_is_evaluates_val_accuracy(tmp_path):
    """A pre-split folder without test/: evaluate measures val, with the weights train chose on val,
    both at the evaluation size (data.eval_image_size). At 64 px and up, so CPUs with native bf16
    take the bf16 path; the loss agreeing to 1e-9 shows that every image got the same logits both
    times, not just the same share right (uncalibrated, so the logits are the validated ones)."""
    source = tmp_path / "photos"
    image_folder(source / "train", per_class=16, size=40, seed=0)
    image_folder(source / "val", per_class=6, size=40, seed=1)
    train, evaluation = train_then_evaluate(tmp_path, source, {"data.image_size": 64, "data.eval_image_size": 72,
                                                               "train.epochs": 2, "train.batch_size": 16,
                                                               "train.calibrate": False})
    assert list(evaluation) == ["val"] and evaluation["val"]["images"] == 18
    assert train["best_val_acc"] == evaluation["val"]["accuracy"]
    assert train["best_val_loss"] == pytest.approx(evaluation["val"]["loss"], rel=1e-9)
