"""Every file the stages share, named once (dvc.yaml lists the same paths), and the rules for
where the workspace is and which files are hidden.

Paths are relative to the directory a stage runs in: the workspace, or under
`dvc exp run --temp/--queue` a throw-away copy of it.
"""
import os
from pathlib import Path

RAW = Path("data/raw")                          # ingest: one folder per class
INGEST_RECORD = RAW / ".ingest.json"            # ingest: the files it wrote (and sizes), what it left out
RAW_NOTE = RAW / "DO_NOT_ADD_FILES_HERE.txt"    # ingest: says where photos go, to whoever opens data/raw
MANIFEST = Path("data/manifest.csv")            # split: path, label, split, sha256
DATA_REPORT = Path("metrics/data_report.json")  # split: counts, skipped files, duplicates
CLASS_INDEX = Path("data/class_indices.json")   # classes: index -> class name
MODEL = Path("models/model.pt")                 # train: the best epoch's weights
RESUME = Path("models/resume.pt")               # train: the last epoch's full state (not a DVC output)
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/train_history.csv")
EVAL_METRICS = Path("metrics/eval.json")
CONFUSION_CSV = Path("metrics/confusion.csv")
CONFUSION_PNG = Path("metrics/confusion.png")
MISCLASSIFIED_PNG = Path("metrics/misclassified.png")
RELIABILITY_PNG = Path("metrics/reliability.png")  # evaluate: calibration before and after temperature scaling
PREDICTIONS = Path("data/predictions.csv")
ONNX_MODEL = Path("models/model.onnx")            # export: fp32, uint8 images in, probabilities out
ONNX_INT8_MODEL = Path("models/model.int8.onnx")  # export: the same, int8 (static, calibrated)
EXPORT_METRICS = Path("metrics/export.json")      # export: onnxruntime against PyTorch


def workspace_root():
    """The real workspace: under `dvc exp run --temp/--queue` the stage runs in a copy that DVC
    deletes afterwards, and DVC_ROOT points back at the workspace (for the MLflow store, the
    image-check cache, and relative paths the user wrote in params.yaml)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def from_workspace(path):
    """A path from params.yaml: absolute as given, relative ones from the workspace root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else workspace_root() / path


def hidden(name):
    """Files and folders that are never data: dot-files (.DS_Store, ._photo.jpg), macOS archive
    debris and Windows' thumbnail caches."""
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")
