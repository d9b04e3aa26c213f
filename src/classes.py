"""Stage `classes`: data/class_indices.json, index -> class name, as the tutorial wrote it.

Names are sorted, so the same classes always get the same indices.
"""
import csv

from src import runtime
from src.common import UserError, read_json, run_stage, write_json
from src.paths import CLASS_INDEX, MANIFEST


def read_manifest(path=MANIFEST):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro split` first") from None


def held_out_split(rows):
    """The split evaluate and predict use: test, or val for a pre-split dataset without test/."""
    return "test" if any(r["split"] == "test" for r in rows) else "val"


def load_class_names(path=CLASS_INDEX):
    """The class names in index order."""
    index = read_json(path)
    return [index[str(i)] for i in range(len(index))]


def check_same_classes(checkpoint_classes, path=CLASS_INDEX, what="this checkpoint"):
    """Refuse a checkpoint trained on other classes than the current class index."""
    expected = load_class_names(path)
    if list(checkpoint_classes) != expected:
        raise UserError(
            f"{what} was trained on classes {list(checkpoint_classes)[:6]}... but {path} lists "
            f"{expected[:6]}...; retrain (`dvc repro train`) or use a checkpoint made for these classes")


def main():
    runtime.start()
    names = sorted({row["label"] for row in read_manifest()})
    write_json(CLASS_INDEX, {str(i): name for i, name in enumerate(names)})
    print(f"classes: {len(names)} -> {CLASS_INDEX}")


if __name__ == "__main__":
    run_stage(main)
