"""Reading data/manifest.csv (split's output) and data/class_indices.json (classes' output)."""
import csv

from src.core.errors import UserError
from src.core.files import read_json
from src.core.paths import CLASS_INDEX, MANIFEST


def rows_for(rows, split, class_names):
    """Paths and label indices of one split of the manifest."""
    index = {name: i for i, name in enumerate(class_names)}
    chosen = [r for r in rows if r["split"] == split]
    return [r["path"] for r in chosen], [index[r["label"]] for r in chosen]


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
