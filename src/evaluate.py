"""Stage `evaluate`: accuracy and confusion matrix of the trained model on the test split.

Writes metrics/eval.json and metrics/confusion.csv (a `dvc plots` confusion matrix), and
logs the metrics into the training's MLflow run.
"""
import io
import csv
from pathlib import Path

import torch

from src import tracking
from src.classes import read_manifest
from src.common import UserError, run_stage, write_json, write_text
from src.data import ImageListDataset, eval_transform, make_loader, rows_for
from src.device import pick_device
from src.inference import load_trained_model, predict_logits
from src.params import load_params

MODEL_PATH = Path("models/model.pt")
EVAL_PATH = Path("metrics/eval.json")
CONFUSION_PATH = Path("metrics/confusion.csv")


def main():
    params = load_params()
    device = pick_device(params["train"]["device"])
    model, ckpt = load_trained_model(MODEL_PATH, device)
    class_names = ckpt["class_names"]
    rows = read_manifest()
    split = "test" if any(r["split"] == "test" for r in rows) else "val"
    paths, labels = rows_for(rows, split, class_names)
    if not paths:
        raise UserError("the manifest has no test or val images to evaluate on; set data.test > 0")
    dataset = ImageListDataset(paths, labels, eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"]))
    loader = make_loader(dataset, params["evaluate"]["batch_size"])
    logits, targets = predict_logits(model, loader, device)
    predicted = logits.argmax(1)
    accuracy = (predicted == targets).float().mean().item()

    metrics = {"test_images": len(paths), "test_accuracy": accuracy}
    write_json(EVAL_PATH, metrics)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "actual", "predicted"])
    for path, t, p in zip(paths, targets.tolist(), predicted.tolist()):
        writer.writerow([path, class_names[t], class_names[p]])
    write_text(CONFUSION_PATH, buf.getvalue())

    if ckpt.get("mlflow_run_id"):
        tracking.log_evaluation(params, ckpt["mlflow_run_id"], metrics, [CONFUSION_PATH])
    print(f"evaluate: {split} accuracy {accuracy:.4f} on {len(paths)} images -> {EVAL_PATH}")


if __name__ == "__main__":
    run_stage(main)
