"""Stage `ingest`: put the dataset named by data.source into data/raw/<class>/<image>.

Sources:
- `sample`: scikit-learn's handwritten digits (offline), as 32x32 PNGs;
- a local folder of class sub-folders, or one already split (train/ val/ [test/], each of class
  sub-folders; the split stage keeps that split);
- a local .zip or .tar(.gz|.bz2|.xz) archive of such a folder (src/data/archives.py: bounded);
- an http(s) URL of such an archive, with its sha256 in data.sha256 (src/data/download.py: bounded,
  checked before extraction).

Nothing of the user's is deleted or swallowed:
- data/raw is ingest's alone (`src.data.raw_copy`). DVC keeps it in place before the stage
  runs (`persist: true`), and ingest stops, deleting nothing, when it holds a file that ingest
  did not write (its record, data/raw/.ingest.json, lists each file and size), naming where
  photos belong.
- A source inside data/, models/ or .dvc/ (which DVC deletes and replaces), or one holding this
  project's data/ (`.`), is refused before anything is copied.
- Hidden files and folders are skipped; symbolic links are skipped, never followed, in folders
  as in archives; both are listed in the record, and from there in the data report.
- The new data/raw is built in a scratch folder and swapped in atomically, so a kill at any
  point leaves the old one or the new one; a killed run's scratch is removed at the next start.
"""
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from src.core import process
from src.core.errors import UserError
from src.core.files import replace_folder, scratch
from src.core.params import load_params, redact_url
from src.core.paths import INGEST_RECORD, RAW, from_workspace, workspace_root
from src.core.process import run_stage
from src.data.archives import extract
from src.data.download import check_sha256, download
from src.data.images import file_digest
from src.data.raw_copy import WHERE_PHOTOS_GO, mirror_folder, refuse_unrecorded, write_record

SAMPLE_SIZE = 32  # the digits are 8x8; stored upscaled so they are viewable pictures
MANAGED = ("data", "models", ".dvc")  # what DVC deletes, replaces or caches: never a source


def write_sample(dest):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray((pixels / 16.0 * 255).round().astype(np.uint8), "L")
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey.resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.BICUBIC).save(folder / f"digit_{i:04d}.png")


def check_source_location(path, source):
    """Refuse a source DVC manages (inside data/, models/, .dvc/) or one holding this project's data/."""
    real = path.resolve()
    for root in {workspace_root(), Path.cwd().resolve()}:  # the workspace, and a `dvc exp --temp` copy
        for name in MANAGED:
            for managed in {root / name, (root / name).resolve()}:
                if real == managed or managed in real.parents:
                    raise UserError(f"data.source={source!r} is inside {name}/, which DVC manages (it deletes and "
                                    f"replaces what is there); {WHERE_PHOTOS_GO}")
        for data in {root / "data", (root / "data").resolve()}:
            if real in data.parents:
                raise UserError(f"data.source={source!r} holds this project's data/ (ingest would copy the project "
                                f"into itself); {WHERE_PHOTOS_GO}")


def materialise(source, sha256, local, dest):
    """Write the dataset into the empty folder `dest`; {path in the source: reason} of what was left out."""
    if source == "sample":
        write_sample(dest)
        return {}
    if local is None:
        if not sha256:
            raise UserError(f"data.source={redact_url(source)!r} is a URL: set data.sha256 to the archive's sha256 "
                            f"(`sha256sum file`) so a changed or corrupt download is caught")
        return download(source, sha256, dest.parent, keep=lambda archive: extract(archive, dest, redact_url(source)))
    if local.is_dir():
        skipped = {}
        mirror_folder(local, dest, skipped)
        return skipped
    if local.is_file():
        if sha256:
            check_sha256(file_digest(local), sha256, source)
        return extract(local, dest, source)
    raise UserError(f"data.source={source!r}: no such folder or archive; use `sample`, a folder holding "
                    f"one sub-folder per class, a .zip/.tar.gz, or an http(s) URL")


def main():
    process.start()
    params = load_params()
    source, sha256 = params["data"]["source"], params["data"]["sha256"]
    local = None if source == "sample" or source.startswith(("http://", "https://")) else from_workspace(source)
    if local is not None:
        check_source_location(local, source)
    refuse_unrecorded(RAW)
    with scratch(RAW.parent, f".{RAW.name}.", directory=True) as tmp:
        try:
            skipped = materialise(source, sha256, local, tmp)
            n = write_record(tmp, skipped)
            replace_folder(tmp, RAW)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the new folder after a failure, else the old data/raw
    print(f"ingest: {n} files from {redact_url(source)} in {RAW}"
          + (f"; {len(skipped)} links or hidden files left out (listed in {INGEST_RECORD})" if skipped else ""))


if __name__ == "__main__":
    run_stage(main)
