"""Every data.source: folders, archives, URLs; unsafe archives and wrong checksums refused cleanly."""
import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, SHAPES, env, image_folder, make_project, python, run, set_params


def stage(folder, module, overrides=None):
    """Run `python -m src.<module>` in `folder` (params.yaml from the repo plus overrides), as DVC would."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "params.yaml").exists():
        shutil.copy(REPO / "params.yaml", folder / "params.yaml")
        (folder / ".dvc").mkdir()  # where split keeps its cache of image checks
    set_params(folder, overrides or {})
    return run([python(), "-m", f"src.{module}"], folder, check=False, env={**env(), "PYTHONPATH": str(REPO)})


def one_line_error(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def image_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, fmt)
    return buf.getvalue()


TREE = {  # an archive's members: a single top folder, a nested folder, non-ASCII names, macOS debris
    "photos/ants/a 1.png": image_bytes((200, 0, 0)),
    "photos/ants/field/a2.png": image_bytes((190, 0, 0)),
    "photos/abeilles été/b1.png": image_bytes((0, 0, 200)),
    "photos/abeilles été/b2.png": image_bytes((0, 0, 190)),
    "__MACOSX/photos/ants/._a 1.png": b"\0\5\26\7",
}
EXTRACTED = {"ants/a 1.png", "ants/field/a2.png", "abeilles été/b1.png", "abeilles été/b2.png"}


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_tar(path, members, links=()):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return path


def raw_files(folder):
    """The files ingest put into folder/data/raw, less its record of them."""
    raw = Path(folder) / "data/raw"
    return {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()} - {
        ".ingest.json", "DO_NOT_ADD_FILES_HERE.txt"}


def left_out(folder):
    """{path in the source: reason} of what ingest skipped, from its record."""
    record = json.loads((Path(folder) / "data/raw/.ingest.json").read_text())
    return {s["path"]: s["reason"] for s in record["skipped"]}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_is_extracted_and_unwrapped(tmp_path, kind):
    archive = tmp_path / f"photos.{kind}"
    (write_zip if kind == "zip" else write_tar)(archive, TREE)
    result = stage(tmp_path / "p", "ingest", {"data.source": str(archive)})
    assert result.returncode == 0, result.stderr
    assert raw_files(tmp_path / "p") == EXTRACTED


def test_unsafe_archives_are_refused_or_defused(tmp_path):
    evil = write_zip(tmp_path / "evil.zip", {**TREE, "photos/../../escaped.png": b"x"})
    one_line_error(stage(tmp_path / "p", "ingest", {"data.source": str(evil)}), "escaped.png", "unsafe")
    evil_tar = write_tar(tmp_path / "evil.tar.gz", {**TREE, "../escaped.png": b"x"})
    one_line_error(stage(tmp_path / "p", "ingest", {"data.source": str(evil_tar)}), "unsafe")
    assert not (tmp_path / "p/data/raw").exists() and not list(tmp_path.rglob("escaped.png"))
    links = write_tar(tmp_path / "links.tar.gz", TREE, links=[("photos/ants/passwd.png", "/etc/passwd"),
                                                                ("photos/ants/up.png", "../../../x")])
    assert stage(tmp_path / "p", "ingest", {"data.source": str(links)}).returncode == 0
    assert raw_files(tmp_path / "p") == EXTRACTED  # links dropped, nothing outside touched


def test_local_folder_is_mirrored_without_touching_the_originals(tmp_path):
    source = tmp_path / "my photos"
    for name, data in TREE.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    result = stage(tmp_path / "p", "ingest", {"data.source": "../my photos/photos"})  # relative to the project
    assert result.returncode == 0, result.stderr
    assert raw_files(tmp_path / "p") == EXTRACTED
    original, copy = source / "photos/ants/a 1.png", tmp_path / "p/data/raw/ants/a 1.png"
    # Never a hard link: DVC write-protects (and, with link cache types, adopts) what it caches.
    assert original.stat().st_ino != copy.stat().st_ino and original.read_bytes() == copy.read_bytes()


def test_dvc_keeps_one_copy_of_the_photos_beside_the_originals(tmp_path):
    """After `dvc repro`, data/raw and DVC's cache are one set of files (hard links), the user's
    photos are untouched and writable, and DVC sees nothing changed."""
    source = image_folder(tmp_path / "photos", SHAPES, per_class=4)
    project = make_project(tmp_path / "project", {"data.source": str(source)})
    run(["dvc", "repro", "ingest"], project)
    raw = sorted(p for p in (project / "data/raw").rglob("*") if p.is_file() and p.parent != project / "data/raw")
    cached = {p.stat().st_ino: p for p in (project / ".dvc/cache/files/md5").rglob("*") if p.is_file()}
    assert len(raw) == 12
    for copy in raw:
        original = source / copy.relative_to(project / "data/raw")
        assert copy.stat().st_nlink == 2 and copy.stat().st_ino in cached  # one copy: workspace = cache
        assert cached[copy.stat().st_ino].read_bytes() == original.read_bytes()
        assert original.stat().st_nlink == 1 and os.access(original, os.W_OK)  # the photos stay the user's
    assert "up to date" in run(["dvc", "status", "ingest"], project).stdout


def test_missing_source_is_one_line(tmp_path):
    one_line_error(stage(tmp_path / "p", "ingest", {"data.source": "no/such/folder"}), "no/such/folder")


@pytest.fixture
def http_folder(tmp_path):
    """A folder served on 127.0.0.1 by a real HTTP server in a thread; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_source_is_downloaded_verified_and_extracted(tmp_path, http_folder):
    www, base = http_folder
    archive = write_tar(www / "photos.tar.gz", TREE)
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{base}/photos.tar.gz"
    project = tmp_path / "p"

    one_line_error(stage(project, "ingest", {"data.source": url, "data.sha256": None}), "data.sha256")
    one_line_error(stage(project, "ingest", {"data.source": url, "data.sha256": "0" * 64}), "sha256", good)
    assert not (project / "data/raw").exists()
    assert [p.name for p in (project / "data").iterdir()] == []  # no partial download left either
    one_line_error(stage(project, "ingest", {"data.source": f"{base}/gone.zip", "data.sha256": good}),
                   "download failed")

    result = stage(project, "ingest", {"data.source": url, "data.sha256": good})
    assert result.returncode == 0, result.stderr
    assert raw_files(project) == EXTRACTED
    assert [p.name for p in (project / "data").iterdir()] == ["raw"]
