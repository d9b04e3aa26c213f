"""Extract a dataset archive (.zip, .tar, .tar.gz/.bz2/.xz) within bounds, links and hidden files left out.

Before anything is written, from the headers alone: the member count, the declared total size
against the free disk, and the compression ratio (per member for zip; for a tar, whose
compression spans the whole stream, the declared total against the archive's size). A bomb is
refused before it costs disk; a tar's headers are checked one by one, each before the reader
moves on to decompress the next member. While extracting, no member writes more than it
declared. Members that would land outside the destination (`../x`) refuse the archive.

Symbolic links and hidden members (dot-files, `__MACOSX/`) are skipped, never followed, and
returned as {path in the archive: reason} for the data report, as a folder source's are.
"""
import shutil
import tarfile
import zipfile
from pathlib import PurePosixPath

from src.core.errors import UserError
from src.core.paths import hidden

MAX_MEMBERS = 2_000_000   # ImageNet-1k's 1.28 M training photos fit in one archive
MAX_RATIO = 100           # photos barely compress (JPEG ~1:1); zeros deflate ~1000:1, bzip2 far more
RATIO_FLOOR = 16 << 20    # below this many bytes, any ratio is harmless (a flat 8x8 PNG in a zip)
DISK_SPARE = 1 << 30      # left free after extraction or a download, for DVC, MLflow and the models
CHUNK = 1 << 20

LINK_REASON = "symbolic link; links are not followed (put the file itself in its class folder)"


def gib(n):
    return f"{n / (1 << 30):,.1f} GiB"


def ensure_free_space(folder, needed, what):
    """Refuse, in one line, to write `needed` bytes into `folder` unless DISK_SPARE stays free."""
    free = shutil.disk_usage(folder).free
    if needed > free - DISK_SPARE:
        raise UserError(f"{what} needs {gib(needed)} but {folder} has {gib(free)} free (keeping {gib(DISK_SPARE)} "
                        f"spare); free some disk space first")


def refuse(name, problem):
    raise UserError(f"{name}: {problem}; refusing to extract it (if you trust it, extract it yourself "
                    f"and point data.source at the folder)")


class Bounds:
    """The running tally of an archive's headers, refused the moment it goes over a limit."""

    def __init__(self, archive, dest, name):
        self.name, self.dest = name, dest
        self.size = archive.stat().st_size
        self.free = shutil.disk_usage(dest).free
        self.count = self.total = 0

    def add(self, name, size, compressed=None):
        self.count += 1
        self.total += size
        if self.count > MAX_MEMBERS:
            refuse(self.name, f"more than {MAX_MEMBERS:,} members")
        if self.total > self.free - DISK_SPARE:
            refuse(self.name, f"its members declare {gib(self.total)} or more, but {self.dest} has "
                                 f"{gib(self.free)} free (keeping {gib(DISK_SPARE)} spare)")
        if compressed is not None and size > RATIO_FLOOR and size > MAX_RATIO * max(compressed, 1):
            refuse(self.name, f"member {name!r} declares {size:,} bytes from {compressed:,} compressed, "
                                 f"over the {MAX_RATIO}:1 limit")
        if self.total > RATIO_FLOOR and self.total > MAX_RATIO * self.size:
            refuse(self.name, f"its members declare {self.total:,} bytes or more from a {self.size:,}-byte "
                                 f"archive, over the {MAX_RATIO}:1 limit")


def member_parts(name, member):
    """A member's path as parts, without a leading '/'; refuses '..' anywhere."""
    parts = [p for p in PurePosixPath(member.replace("\\", "/")).parts if p not in ("/", ".")]
    if ".." in parts:
        raise UserError(f"{name}: member {member!r} would extract outside the folder; refusing an unsafe archive")
    return parts


def skip_reason(parts, is_link, skipped):
    """Whether a member is left out; if so, it is recorded in `skipped` (a hidden folder once)."""
    for i, part in enumerate(parts):
        if hidden(part):
            is_folder = i < len(parts) - 1
            skipped["/".join(parts[:i + 1])] = ("hidden folder; skipped with all it holds" if is_folder
                                                else "hidden or system file; skipped")
            return True
    if is_link:
        skipped["/".join(parts)] = LINK_REASON
        return True
    return False


def copy_bounded(src, dst, declared, name, member):
    written = 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        written += len(chunk)
        if written > declared:
            refuse(name, f"member {member!r} holds more than the {declared:,} bytes it declares")
        dst.write(chunk)


def extract_zip(archive, dest, skipped, name):
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        bounds = Bounds(archive, dest, name)
        for info in infos:
            bounds.add(info.filename, info.file_size, info.compress_size)
        for info in infos:
            parts = member_parts(name, info.filename)
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if not parts or skip_reason(parts, is_link, skipped):
                continue
            target = dest.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                copy_bounded(src, dst, info.file_size, name, info.filename)


def extract_tar(archive, dest, skipped, name):
    def safe(member, path):
        parts = member_parts(name, member.name)
        if not parts or skip_reason(parts, member.issym(), skipped):
            return None  # (a hard link to another member is kept: it is a copy of that member)
        try:
            return tarfile.data_filter(member, path)  # refuses absolute links, devices, links out
        except tarfile.FilterError as e:
            raise UserError(f"{name}: {e}; refusing an unsafe archive") from None

    with tarfile.open(archive) as t:
        bounds = Bounds(archive, dest, name)
        members = []
        for member in t:  # each header is checked before the next one is read (and this one's data skipped)
            bounds.add(member.name, member.size if member.isreg() else 0)
            members.append(member)
        # tarfile writes exactly each member's declared size: the size is the format's framing.
        t.extractall(dest, members=members, filter=safe)


def unwrap_single_folder(dest):
    """`dest/flowers/<class>/...` -> `dest/<class>/...` when flowers/ is all the archive holds."""
    entries = list(dest.iterdir())
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
        return
    # Renamed first, as a child may share the folder's name; hidden members were never
    # extracted, so the hidden name is free.
    inner = entries[0].rename(dest / ".unwrap")
    for child in inner.iterdir():
        child.rename(dest / child.name)
    inner.rmdir()


def extract(archive, dest, source):
    """Extract `archive` into the empty folder `dest`; {member path: reason} of what was left out.
    Messages name it as data.source=`source` (a URL already without its secrets)."""
    skipped, name = {}, f"data.source={source!r}"
    try:
        if zipfile.is_zipfile(archive):
            extract_zip(archive, dest, skipped, name)
        elif tarfile.is_tarfile(archive):
            extract_tar(archive, dest, skipped, name)
        else:
            raise UserError(f"data.source={source!r} is neither a folder nor a .zip/.tar.gz archive; "
                            f"point it at a folder of class sub-folders or such an archive")
        unwrap_single_folder(dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"data.source={source!r}: cannot extract the archive ({e}); is it complete?") from None
    return skipped
