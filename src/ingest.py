"""Stage `ingest`: put the dataset named by data.source into data/raw/<class>/<image>.

Sources:
- `sample`: scikit-learn's handwritten digits (offline), as 32x32 PNGs;
- a local folder of class sub-folders, or one already split (train/ val/ [test/], each of class
  sub-folders; the split stage keeps that split);
- a local .zip or .tar(.gz|.bz2|.xz) archive of such a folder (src/archives.py: bounded);
- an http(s) URL of such an archive, with its sha256 in data.sha256 (src/download.py: bounded,
  checked before extraction).

Nothing of the user's is deleted or swallowed:
- data/raw is ingest's alone. DVC keeps it in place before the stage runs (`persist: true`), and
  ingest stops, deleting nothing, when it holds a file that ingest did not write (its record,
  data/raw/.ingest.json, lists each file and size), naming where photos belong.
- A source inside data/, models/ or .dvc/ (which DVC deletes and replaces), or one holding this
  project's data/ (`.`), is refused before anything is copied.
- Hidden files and folders are skipped; symbolic links are skipped, never followed, in folders
  as in archives; both are listed in the record, and from there in the data report.
- The new data/raw is built in a scratch folder and swapped in atomically, so a kill at any
  point leaves the old one or the new one; a killed run's scratch is removed at the next start.
"""
import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from src.core import process
from src.core.errors import UserError
from src.core.files import SCRATCH_SUFFIX, scratch, write_json
from src.core.params import load_params, redact_url
from src.core.paths import INGEST_RECORD, RAW, RAW_NOTE, from_workspace, hidden, workspace_root
from src.core.process import run_stage
from src.data.archives import LINK_REASON, extract
from src.data.download import check_sha256, download
from src.data.images import file_digest

SAMPLE_SIZE = 32  # the digits are 8x8; stored upscaled so they are viewable pictures
FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone of a whole file (btrfs, XFS)
MANAGED = ("data", "models", ".dvc")  # what DVC deletes, replaces or caches: never a source
WHERE_PHOTOS_GO = "photos belong in their own folder (e.g. photos/<class>/...) named by data.source"


def write_sample(dest):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = Image.fromarray((pixels / 16.0 * 255).round().astype(np.uint8), "L")
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey.resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.BICUBIC).save(folder / f"digit_{i:04d}.png")


def clone_or_copy(src, dst):
    """A copy-on-write clone where the filesystem can (no bytes duplicated), else a plain copy.

    Not a hard link: DVC moves data/raw into its cache and write-protects it there, and with
    a link cache type that would make the user's own photos read-only cache objects.
    """
    try:
        import fcntl

        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        shutil.copystat(src, dst)
    except (ImportError, OSError):  # not Linux, or ext4/tmpfs/another filesystem
        shutil.copy2(src, dst)


def mirror_folder(src, dest, skipped):
    """Recreate src's tree under dest, every regular file cloned or copied; hidden files and
    folders, links and special files are left out and recorded in `skipped` (never followed)."""
    for root, dirs, files in os.walk(src):  # does not descend into linked folders
        rel = Path(root).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(dirs):
            path = Path(root) / name
            if hidden(name) or path.is_symlink():
                dirs.remove(name)
                skipped[(rel / name).as_posix()] = (
                    LINK_REASON if path.is_symlink() else "hidden folder; skipped with all it holds")
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if hidden(name):
                skipped[(rel / name).as_posix()] = "hidden or system file; skipped"
            elif path.is_symlink():
                skipped[(rel / name).as_posix()] = LINK_REASON
            elif not path.is_file():
                skipped[(rel / name).as_posix()] = "not a regular file (a pipe, socket or device); skipped"
            else:
                clone_or_copy(path, dest / rel / name)


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


def recorded_files(raw):
    """{relative path: size} of the files the last ingest wrote into `raw`, from its record."""
    try:
        files = json.loads((raw / INGEST_RECORD.name).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def unrecorded_files(raw):
    """Files (and links) in `raw` that ingest did not write, or that changed size since: a user's."""
    recorded, found = recorded_files(raw), []
    for root, dirs, files in os.walk(raw):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            rel = path.relative_to(raw).as_posix()
            if rel != INGEST_RECORD.name and (path.is_symlink() or recorded.get(rel) != path.lstat().st_size):
                found.append(rel)
    return sorted(found)


def refuse_unrecorded(raw):
    if not raw.is_dir():
        return
    found = unrecorded_files(raw)
    if found and not (raw / INGEST_RECORD.name).is_file():
        raise UserError(f"{raw} holds {len(found)} file(s) and no record of what ingest wrote there (an older "
                        f"ingest's copy, or photos put there by hand), so rerunning ingest could delete photos; "
                        f"{WHERE_PHOTOS_GO}: move any there, then delete {raw} and rerun")
    if found:
        raise UserError(f"{raw} holds {len(found)} file(s) ingest did not write (e.g. {raw / found[0]}), which "
                        f"rerunning it would delete; {WHERE_PHOTOS_GO}: move them there (or delete them if they "
                        f"are copies) and rerun")


NOTE = """This folder is rebuilt from data.source by `dvc repro`; DVC owns it.
Files added here are deleted by `dvc checkout` and `dvc exp run` (`dvc repro` stops instead).
Put your photos in their own folder, one sub-folder per class (e.g. photos/cats/, photos/dogs/),
and point data.source in params.yaml at it.
"""


def write_record(dest, skipped):
    """The note for people, then the record of every file written (with sizes) and left out;
    returns how many files the dataset has."""
    files = {}
    for root, _, names in os.walk(dest):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(dest).as_posix()] = path.stat().st_size
    (dest / RAW_NOTE.name).write_text(NOTE, encoding="utf-8")
    write_json(dest / INGEST_RECORD.name, {
        "files": dict(sorted({**files, RAW_NOTE.name: (dest / RAW_NOTE.name).stat().st_size}.items())),
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped.items())],
    })
    return len(files)


def exchange(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP);
    False where the system or filesystem can't."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif hasattr(libc, "renamex_np"):
        rename_swap = 2
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new, target):
    """Put the folder `new` at `target`; afterwards `new` holds the old `target`, if there was one."""
    if not target.exists():
        new.rename(target)
    elif not exchange(new, target):
        # Two renames: a kill between them leaves no target, so DVC reruns ingest, which starts
        # over (the old folder held only what ingest wrote: DVC has it in its cache).
        aside = new.with_name(new.name.removesuffix(SCRATCH_SUFFIX) + ".old" + SCRATCH_SUFFIX)
        target.rename(aside)
        new.rename(target)
        aside.rename(new)


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
