"""Stage `classes`: data/class_indices.json, index -> class name, as the tutorial wrote it.

Names are sorted, so the same classes always get the same indices.
"""
from src.core import process
from src.core.files import write_json
from src.core.paths import CLASS_INDEX
from src.core.process import run_stage
from src.data.manifest import read_manifest


def main():
    process.start()
    names = sorted({row["label"] for row in read_manifest()})
    write_json(CLASS_INDEX, {str(i): name for i, name in enumerate(names)})
    print(f"classes: {len(names)} -> {CLASS_INDEX}")


if __name__ == "__main__":
    run_stage(main)
