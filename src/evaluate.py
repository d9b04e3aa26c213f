"""Stage `evaluate`: where the trained model succeeds and fails, on the test split.

Writes
  metrics/eval.json         metrics for `dvc metrics diff`, named after the split measured
                            ("test/", or "val/" for a dataset without a test split): accuracy
                            (top-1, top-5 with more than 5 classes), loss, calibration error,
                            macro and weighted precision/recall/F1, per_class/<class>/f1, ...
  metrics/confusion.csv     one row per image (path, actual, predicted): the DVC confusion plot
  metrics/confusion.png     the confusion matrix with class names and counts
  metrics/misclassified.png the most confidently wrong images, with true and predicted labels
  metrics/reliability.png   accuracy against confidence, with and without temperature scaling
and logs the metrics into the training's MLflow run.
"""
import csv
import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from src.core import process, tracking
from src.core.device import pick_device
from src.core.errors import UserError
from src.core.files import write_json, write_text
from src.core.params import flatten, load_params
from src.core.paths import CONFUSION_CSV, CONFUSION_PNG, EVAL_METRICS, MISCLASSIFIED_PNG, MODEL, RELIABILITY_PNG
from src.core.process import run_stage
from src.data.loaders import ImageFiles
from src.data.manifest import check_same_classes, held_out_split, read_manifest, rows_for
from src.inference.calibration_error import chance_ece, expected_calibration_error
from src.inference.classify import classify_files
from src.inference.explain import overlays
from src.inference.figures import confusion_figure, image_grid, reliability_figure, save_figure
from src.networks.checkpoint import load_trained_model


def confusion_matrix(y_true, y_pred, n_classes):
    """cm[actual, predicted] = count."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def ratio(a, b):
    """a / b elementwise, 0 where b is 0 (scikit-learn's zero_division=0)."""
    return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)


def classification_metrics(y_true, logits, class_names, bins, temperature=1.0):
    """The flat eval.json dict from labels and logits (float64 for exact averages). `temperature`:
    the one folded into the model at training (`src.training.calibration`); loss and ECE are
    also reported for logits * temperature, the network before calibration."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    log_probs = torch.log_softmax(logits, 1)
    probs = log_probs.exp().numpy()
    n, n_classes = probs.shape
    y_pred = probs.argmax(1)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    per_class = {"precision": ratio(tp, predicted), "recall": ratio(tp, support)}
    p, r = per_class["precision"], per_class["recall"]
    per_class["f1"] = ratio(2 * p * r, p + r)

    metrics = {"images": int(n), "accuracy": float(tp.sum() / n),
               # the mean of the classes' recalls: what accuracy would be if every class were as common
               "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}
    if n_classes > 5:
        top5 = np.argsort(-probs, axis=1)[:, :5]
        metrics["top5_accuracy"] = float((top5 == y_true[:, None]).any(1).mean())
    metrics["loss"] = float(-log_probs[torch.arange(n), torch.as_tensor(y_true)].mean())
    metrics["ece"] = expected_calibration_error(probs.max(1), y_pred == y_true, bins)
    metrics["chance_ece"] = chance_ece(probs.max(1), bins)
    raw = torch.log_softmax(logits * temperature, 1)
    metrics["ece_uncalibrated"] = expected_calibration_error(raw.exp().max(1).values.numpy(), y_pred == y_true, bins)
    metrics["loss_uncalibrated"] = float(-raw[torch.arange(n), torch.as_tensor(y_true)].mean())
    for name, values in per_class.items():
        metrics[f"macro_{name}"] = float(values.mean())
        metrics[f"weighted_{name}"] = float((values * support).sum() / n)
    # Per class last, one entry per class: `dvc metrics diff` lists each class's change on its own line.
    metrics["per_class"] = {cls: {**{name: float(values[i]) for name, values in per_class.items()},
                                  "support": int(support[i])} for i, cls in enumerate(class_names)}
    return metrics, cm, probs


def confidently_wrong(y_true, probs, limit):
    """Indices of wrong predictions, most confident first."""
    y_pred = probs.argmax(1)
    wrong = np.flatnonzero(y_pred != y_true)
    return wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:limit]


def explained(model, ckpt, paths, classes):
    """The images as the model saw them (resized, cropped), under the Grad-CAM heat map of `classes`."""
    files = ImageFiles(paths, ckpt["image_size"])
    return overlays(model, ckpt, [files.pixels(i)[0] for i in range(len(files))], classes) if paths else []


def per_class_report(metrics, class_names, worst=10):
    lines = [f"{'class':>20}  precision  recall     f1  support   (lowest f1 first)"]
    per_class = metrics["per_class"]
    for cls in sorted(class_names, key=lambda c: per_class[c]["f1"])[:worst]:
        m = per_class[cls]
        lines.append(f"{cls[:20]:>20}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    return "\n".join(lines)


def main():
    matplotlib.use("Agg")  # files only: a stage never opens a window
    process.start()
    params = load_params()
    cfg = params["evaluate"]
    device = pick_device(cfg["device"], "evaluate.device")
    model, ckpt = load_trained_model(MODEL, device)
    class_names = ckpt["class_names"]
    check_same_classes(class_names)
    rows = read_manifest()
    split = held_out_split(rows)
    paths, labels = rows_for(rows, split, class_names)
    if not paths:
        raise UserError("the manifest has no test or val images to evaluate on; set data.test > 0")
    how = {"batch_size": cfg["batch_size"], "precision": cfg["precision"], "precision_param": "evaluate.precision",
           "workers": cfg["workers"]}
    logits, errors = classify_files(model, ckpt, paths, device, **how, desc="evaluate")
    bad = [(p, e) for p, e in zip(paths, errors) if e]
    if bad:
        raise UserError(f"{bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable {split} images); "
                        f"fix or remove them and rerun `dvc repro`")
    y_true = np.asarray(labels)
    temperature = ckpt.get("temperature", 1.0)
    metrics, cm, probs = classification_metrics(y_true, logits, class_names, cfg["calibration_bins"], temperature)
    if cfg["tta"]:  # beside the plain numbers, which the figures and per-class numbers keep
        tta_logits, _ = classify_files(model, ckpt, paths, device, **how, desc="evaluate (flipped)", tta=True)
        tta, _, _ = classification_metrics(y_true, tta_logits, class_names, cfg["calibration_bins"])
        metrics = {**{k: v for k, v in metrics.items() if k != "per_class"},
                   **{f"tta_{k}": tta[k] for k in ("accuracy", "balanced_accuracy", "loss")},
                   "per_class": metrics["per_class"]}
    # Named after the split measured, the same in `dvc exp show` and MLflow: test/accuracy (or
    # val/accuracy), test/per_class/<class>/f1, ...
    write_json(EVAL_METRICS, flatten({split: metrics}, sep="/"))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "actual", "predicted"])
    for path, t, p in zip(paths, labels, probs.argmax(1)):
        writer.writerow([path, class_names[t], class_names[p]])
    write_text(CONFUSION_CSV, buf.getvalue())

    save_figure(confusion_figure(cm, class_names, f"{split} split: {len(paths)} images, "
                                 f"accuracy {metrics['accuracy']:.3f}"), CONFUSION_PNG)
    raw = torch.softmax(torch.as_tensor(logits, dtype=torch.float64) * temperature, 1).numpy()
    curves = {f"calibrated (T={temperature:.2f}), ECE {metrics['ece']:.3f}": probs.max(1),
              f"uncalibrated, ECE {metrics['ece_uncalibrated']:.3f}": raw.max(1)}
    save_figure(reliability_figure(curves if temperature != 1.0 else dict(list(curves.items())[1:]),
                                   probs.argmax(1) == y_true, cfg["calibration_bins"],
                                   f"Reliability, {split} split ({len(paths)} images)", metrics["chance_ece"]),
                RELIABILITY_PNG)
    worst = confidently_wrong(y_true, probs, cfg["misclassified_images"])
    titles = [f"{Path(paths[i]).name}\ntrue: {class_names[y_true[i]]}\npredicted: {class_names[probs[i].argmax()]} "
              f"({probs[i].max():.0%})" for i in worst]
    n_wrong = int((probs.argmax(1) != y_true).sum())
    save_figure(image_grid(explained(model, ckpt, [paths[i] for i in worst], probs[worst].argmax(1)), titles,
                           title_colors=["firebrick"] * len(worst),
                           title=f"Most confidently wrong: {len(worst)} of {n_wrong} mistakes on {len(paths)} "
                                 f"{split} images\n(heat map: Grad-CAM of the predicted class)"), MISCLASSIFIED_PNG)

    if ckpt.get("mlflow_run_id"):
        tracking.log_evaluation(params, ckpt["mlflow_run_id"], split, metrics,
                                artifacts=[CONFUSION_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG, RELIABILITY_PNG])
    print(per_class_report(metrics, class_names))
    top5 = f", top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""
    print(f"evaluate: {split} accuracy {metrics['accuracy']:.4f}{top5}, macro F1 {metrics['macro_f1']:.4f}, "
          f"ECE {metrics['ece']:.4f} ({metrics['ece_uncalibrated']:.4f} uncalibrated, {metrics['chance_ece']:.4f} "
          f"from perfect calibration by chance) on {len(paths)} images "
          f"-> {EVAL_METRICS}, {CONFUSION_PNG}, {MISCLASSIFIED_PNG}, {RELIABILITY_PNG}")


if __name__ == "__main__":
    run_stage(main)
