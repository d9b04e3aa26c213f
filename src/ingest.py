"""Stage `ingest`: put the dataset named by data.source into data/raw/<class>/<image>.

Sources:
- `sample`: scikit-learn's handwritten digits (offline), as 32x32 PNGs;
- a local folder of class sub-folders, or one already split (train/ val/ [test/], each of class
  sub-folders; the split stage keeps that split);
- a local .zip or .tar(.gz|.bz2|.xz) archive of such a folder;
- an http(s) URL of such an archive, with its sha256 in data.sha256 (checked before extraction).

An archive holding a single top folder (`flowers/daisy/...`) is unwrapped. Extraction refuses
members that would land outside data/raw and drops links. Everything is built in a temporary
folder first, so a failure leaves no partial data/raw.
"""
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from src.core import process
from src.common import UserError, run_stage
from src.images import file_digest
from src.params import load_params
from src.paths import RAW, from_workspace, hidden

SAMPLE_SIZE = 32  # the digits are 8x8; stored upscaled so they are viewable pictures
FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone of a whole file (btrfs, XFS)
SKIPPED_TOP = {"__MACOSX"}  # resource forks macOS adds to zips: never images


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


def mirror_folder(src, dest):
    """Recreate src's tree under dest, every regular file (or link to one) cloned or copied."""
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = Path(root).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if os.path.isfile(Path(root) / name):
                clone_or_copy(Path(root) / name, dest / rel / name)


def check_sha256(actual, expected, source):
    if actual != expected.strip().lower():
        raise UserError(f"data.source={source!r} has sha256 {actual}, but data.sha256 is {expected}; "
                        f"check the URL/file or update data.sha256")


def download(url, expected, folder):
    """Download `url` into a temporary file in `folder`, verifying its sha256 on the way."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download.", suffix=".tmp")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        check_sha256(h.hexdigest(), expected, url)
    except (urllib.error.URLError, OSError, ValueError) as e:
        os.remove(tmp)
        raise UserError(f"data.source={url!r}: download failed ({e}); check the URL and the network") from None
    except BaseException:
        os.remove(tmp)
        raise
    return Path(tmp)


def extract_zip(archive, dest):
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if ".." in parts:
                raise UserError(f"{archive}: member {info.filename!r} would extract outside the folder; "
                                f"refusing an unsafe archive")
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if parts and parts[0] not in SKIPPED_TOP and not is_link:
                z.extract(info, dest)  # strips a leading '/' or drive itself


def extract_tar(archive, dest):
    def safe(member, path):
        if member.name.split("/")[0] in SKIPPED_TOP or member.issym():
            return None  # symbolic links are dropped (a hard link to a member is kept)
        try:
            return tarfile.data_filter(member, path)  # refuses '..', absolute links, devices
        except tarfile.FilterError as e:
            raise UserError(f"{archive}: {e}; refusing an unsafe archive") from None

    with tarfile.open(archive) as t:
        t.extractall(dest, filter=safe)


def unwrap_single_folder(dest):
    """`dest/flowers/<class>/...` -> `dest/<class>/...` when flowers/ is all the archive holds."""
    visible = [p for p in dest.iterdir() if not hidden(p.name)]
    if len(visible) != 1 or not visible[0].is_dir():
        return
    inner = visible[0].rename(dest / ".unwrap")  # a child may share the folder's name
    for child in inner.iterdir():
        child.rename(dest / child.name)
    inner.rmdir()


def extract(archive, dest, source):
    try:
        if zipfile.is_zipfile(archive):
            extract_zip(archive, dest)
        elif tarfile.is_tarfile(archive):
            extract_tar(archive, dest)
        else:
            raise UserError(f"data.source={source!r} is neither a folder nor a .zip/.tar.gz archive; "
                            f"point it at a folder of class sub-folders or such an archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"data.source={source!r}: cannot extract the archive ({e}); is it complete?") from None
    unwrap_single_folder(dest)


def materialise(source, sha256, dest):
    if source == "sample":
        write_sample(dest)
    elif source.startswith(("http://", "https://")):
        if not sha256:
            raise UserError(f"data.source={source!r} is a URL: set data.sha256 to the archive's sha256 "
                            f"(`sha256sum file`) so a changed or corrupt download is caught")
        archive = download(source, sha256, dest.parent)
        try:
            extract(archive, dest, source)
        finally:
            os.remove(archive)
    elif from_workspace(source).is_dir():
        mirror_folder(from_workspace(source), dest)
    elif from_workspace(source).is_file():
        if sha256:
            check_sha256(file_digest(from_workspace(source)), sha256, source)
        extract(from_workspace(source), dest, source)
    else:
        raise UserError(f"data.source={source!r}: no such folder or archive; use `sample`, a folder holding "
                        f"one sub-folder per class, a .zip/.tar.gz, or an http(s) URL")


def main():
    process.start()
    params = load_params()
    source, sha256 = params["data"]["source"], params["data"]["sha256"]
    tmp = RAW.with_name(".raw.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        materialise(source, sha256, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(RAW, ignore_errors=True)
    tmp.rename(RAW)
    n = sum(1 for p in RAW.rglob("*") if p.is_file())
    print(f"ingest: {n} files from {source} in {RAW}")


if __name__ == "__main__":
    run_stage(main)
