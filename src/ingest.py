"""Stage `ingest`: put the dataset named by data.source into data/raw/<class>/<image>.

Sources: `sample` (scikit-learn's handwritten digits, offline) or a local folder, either
of class sub-folders or already split (train/ val/ [test/], each of class sub-folders; the
layout is kept and the split stage keeps that split). Files are hard-linked where the
filesystem allows, so a large local folder is not copied byte for byte.
"""
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from src.common import UserError, run_stage
from src.params import load_params

RAW = Path("data/raw")
SAMPLE_SIZE = 32  # the digits are 8x8; stored upscaled so they are viewable pictures


def write_sample(dest):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray((pixels / 16.0 * 255).round().astype(np.uint8), "L")
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey.resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.BICUBIC).save(folder / f"digit_{i:04d}.png")


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy instead
        shutil.copy2(src, dst)


def mirror_folder(src, dest):
    """Recreate src's tree under dest with every regular file linked (or copied)."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = Path(root).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if os.path.isfile(Path(root) / name):
                link_or_copy(Path(root) / name, dest / rel / name)


def materialise(source, dest):
    if source == "sample":
        write_sample(dest)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        mirror_folder(path, dest)
        return
    raise UserError(
        f"data.source={source!r}: no such folder; use `sample` or a folder holding one sub-folder per class"
    )


def main():
    params = load_params()
    tmp = RAW.with_name(".raw.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        materialise(params["data"]["source"], tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(RAW, ignore_errors=True)
    tmp.rename(RAW)
    n = sum(1 for p in RAW.rglob("*") if p.is_file())
    print(f"ingest: {n} files from {params['data']['source']} in {RAW}")


if __name__ == "__main__":
    run_stage(main)
