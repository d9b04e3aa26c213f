"""The evaluate stage: its metrics against scikit-learn's on the same predictions."""
import csv
import json

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from conftest import make_project, python, run
from src.data import ImageListDataset, eval_transform, make_loader
from src.evaluate import classification_metrics
from src.inference import load_trained_model, predict_logits

# Seven classes (more than 5, so top-5 accuracy is reported), few tiny images: trains in seconds.
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu & co"]
PER_CLASS = 14


def write_shapes(root):
    """Each class a colour and a bar position, plus noise: learnable, but not perfectly in 2 epochs."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        colour = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53 + 80) % 256])
        for i in range(PER_CLASS):
            a = rng.normal(128, 60, (24, 24, 3))
            a[:, 3 * k:3 * k + 4] = colour
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / name / f"{name[:3]}_{i}.png")


def reference_ece(confidence, correct, bins):
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (confidence > lo) & (confidence <= hi)
        if m.any():
            total += m.sum() / len(confidence) * abs(correct[m].mean() - confidence[m].mean())
    return total


def sklearn_metrics(y_true, probs, class_names):
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(1)
    expected = {"test_images": len(y_true), "test_accuracy": skm.accuracy_score(y_true, y_pred),
                "test_loss": skm.log_loss(y_true, probs, labels=labels),
                "ece": reference_ece(probs.max(1), y_pred == y_true, 15)}
    if len(class_names) > 5:
        expected["test_top5_accuracy"] = skm.top_k_accuracy_score(y_true, probs, k=5, labels=labels)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        expected.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(class_names):
        expected.update({f"precision/{name}": p[i], f"recall/{name}": r[i], f"f1/{name}": f[i],
                         f"support/{name}": s[i]})
    return expected


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    write_shapes(root / "shapes")
    project = make_project(root / "project", {
        "data.source": str(root / "shapes"), "data.val": 0.2, "data.test": 0.25})
    run(["dvc", "repro", "evaluate"], project)
    return project


def test_eval_json_equals_scikit_learn_on_the_same_predictions(evaluated):
    project = evaluated
    results = json.loads((project / "metrics/eval.json").read_text())
    with open(project / "metrics/confusion.csv", newline="") as f:
        confusion = list(csv.DictReader(f))
    assert len(confusion) == results["test_images"] == len(CLASSES) * 4  # 25% of 14 per class

    # The same predictions, computed here along the training's own validation path.
    model, ckpt = load_trained_model(project / "models/model.pt")
    assert ckpt["class_names"] == CLASSES
    paths = [project / r["path"] for r in confusion]
    y_true = np.array([CLASSES.index(r["actual"]) for r in confusion])
    dataset = ImageListDataset(paths, y_true.tolist(), eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"]))
    logits, _ = predict_logits(model, make_loader(dataset, 8), torch.device("cpu"))
    probs = torch.softmax(logits.double(), 1).numpy()
    assert [CLASSES[i] for i in probs.argmax(1)] == [r["predicted"] for r in confusion]

    expected = sklearn_metrics(y_true, probs, CLASSES)
    assert set(results) == set(expected)
    for key, value in expected.items():
        assert results[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key

    # Logged into the training's MLflow run ("gnu & co" made MLflow-safe).
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run_metrics = mlflow.get_run(ckpt["mlflow_run_id"]).data.metrics
    assert run_metrics["macro_f1"] == pytest.approx(results["macro_f1"])
    assert run_metrics["f1/gnu _ co"] == pytest.approx(results["f1/gnu & co"])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(ckpt["mlflow_run_id"])}
    assert {"confusion.png", "misclassified.png", "confusion.csv"} <= logged, logged


def test_pictures_are_written(evaluated):
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(evaluated / "metrics" / name) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300


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
    assert "test_top5_accuracy" not in results
    assert cm.sum() == 50 and (cm.sum(1) == np.bincount(y_true, minlength=3)).all()
    expected = sklearn_metrics(y_true, probs, names)
    expected["ece"] = reference_ece(probs.max(1), probs.argmax(1) == y_true, 10)
    for key, value in expected.items():
        assert results[key] == pytest.approx(float(value), rel=1e-9, abs=1e-12), key
