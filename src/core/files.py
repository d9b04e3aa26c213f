"""Files written so that a crash never leaves half of one: atomic writes, locked scratch files,
and the clean-up of those a killed run left behind."""
import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from src.core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: temporary files are not locked, so none is ever judged stale
    fcntl = None

# Our temporary files and folders end so (`*.tmp` is git-ignored); DVC's own end in a plain
# `.tmp`, which is why the clean-up matches this longer suffix only.
SCRATCH_SUFFIX = ".part.tmp"
# Where stages write through temporary files: each stage start clears the stale ones here.
SCRATCH_FOLDERS = (Path("data"), Path("models"), Path("metrics"), Path(".dvc/tmp"))


def _try_lock(fd):
    """Take an exclusive lock on an open file or folder; False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def scratch(folder, prefix, directory=False):
    """Yield the path of a new temporary file (or folder) in `folder`, named `<prefix>*.part.tmp`.

    This process holds a lock on it until the block ends, so a scratch path nobody holds is
    a killed run's leftover, which the next stage start removes. The block removes or renames
    it; a path still there afterwards stays for that clean-up.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=SCRATCH_SUFFIX)
        fd = os.open(tmp, os.O_RDONLY)
    else:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=SCRATCH_SUFFIX)
    try:
        if fcntl:
            _try_lock(fd)  # a brand-new name: nobody else can hold it
        yield Path(tmp)
    finally:
        os.close(fd)  # the lock goes with it (it follows the file, wherever it was renamed to)


def remove_stale_scratch(folders=SCRATCH_FOLDERS):
    """Remove the temporary files and folders of killed runs: those in `folders` that no live
    process holds. A run in progress (another stage, `python -m src.predict` by hand) keeps its own."""
    if fcntl is None:
        return
    for folder in folders:
        for path in Path(folder).glob(f".*{SCRATCH_SUFFIX}"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # gone meanwhile, or a link to nowhere
            try:
                if not _try_lock(fd):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    A crash (even SIGKILL) leaves the old file intact: readers never see half a file.
    """
    path = Path(path)
    with scratch(path.parent, f".{path.name}.") as tmp:
        try:
            yield tmp
            # mkstemp makes owner-only files; give the result the permissions a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage that writes it first (`dvc repro`)") from None


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
