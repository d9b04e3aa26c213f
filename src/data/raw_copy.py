"""data/raw, ingest's copy of the dataset and nobody else's: a source folder mirrored into it
(clones, not links; hidden files, links and special files left out), the record of every file
written, and the refusal to rebuild it while it holds a file ingest did not write."""
import json
import os
import shutil
from pathlib import Path

from src.core.errors import UserError
from src.core.files import write_json
from src.core.paths import INGEST_RECORD, RAW_NOTE, hidden
from src.data.archives import LINK_REASON

WHERE_PHOTOS_GO = "photos belong in their own folder (e.g. photos/<class>/...) named by data.source"


FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone of a whole file (btrfs, XFS)


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
