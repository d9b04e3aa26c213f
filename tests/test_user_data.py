"""Nothing of a user's is deleted or swallowed, and no archive or download runs away with the disk:
photos dropped into data/raw, sources inside the project, links and hidden files, bombs, slow
or endless downloads, and killed runs' leftovers."""
import base64
import hashlib
import http.server
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from test_ingest import EXTRACTED, TREE, left_out, one_line_error, raw_files, stage, write_tar

from src.core.errors import UserError
from src.core.files import remove_stale_scratch, scratch
from src.data import archives
from src.data.download import download

from conftest import REPO, SHAPES, env, image_folder, make_project, python, run, set_params

LINK = archives.LINK_REASON


def data_entries(folder):
    """Everything directly in folder/data: a failed ingest leaves no scratch behind."""
    data = Path(folder) / "data"
    return sorted(p.name for p in data.iterdir()) if data.exists() else []


def dvc_error(result):
    """The one `error: ...` line the stage printed under `dvc repro`."""
    assert result.returncode != 0, result.stdout
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stdout + result.stderr
    return errors[0]


@pytest.fixture
def ingested(tmp_path):
    """A project whose data/raw came from a folder of photos through `dvc repro ingest`."""
    photos = image_folder(tmp_path / "photos", SHAPES, per_class=4)
    project = make_project(tmp_path / "project", {"data.source": str(photos)})
    run(["dvc", "repro", "ingest"], project)
    return project, photos


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_a_photo_dropped_into_data_raw_stops_repro_and_survives(ingested):
    project, photos = ingested
    mine = project / "data/raw/circle/my_new_photo.png"
    mine.write_bytes((photos / "square/square_00.png").read_bytes())
    before = snapshot(project / "data/raw")

    line = dvc_error(run(["dvc", "repro"], project, check=False))  # DVC sees data/raw modified: reruns ingest
    assert "data/raw/circle/my_new_photo.png" in line and "their own folder" in line and "data.source" in line
    assert snapshot(project / "data/raw") == before  # nothing removed, nothing replaced
    assert data_entries(project) == [".gitignore", "raw"]

    mine.rename(photos / "circle/my_new_photo.png")  # where it belongs
    run(["dvc", "repro", "-f", "-s", "ingest"], project)
    assert "circle/my_new_photo.png" in raw_files(project)
    assert "up to date" in run(["dvc", "status", "ingest"], project).stdout


@pytest.mark.parametrize("source", ["data/raw", ".", "models"])
def test_a_source_dvc_manages_or_holding_the_project_stops_with_one_line(ingested, source):
    project, _ = ingested
    before = snapshot(project / "data")
    (project / "models").mkdir()
    set_params(project, {"data.source": source})
    line = dvc_error(run(["dvc", "repro", "ingest"], project, check=False))
    assert f"data.source='{source}'" in line and "their own folder" in line
    assert snapshot(project / "data") == before  # nothing deleted, nothing copied
    assert data_entries(project) == [".gitignore", "raw"]


def test_links_and_hidden_files_of_a_folder_are_skipped_and_reported(tmp_path):
    source = image_folder(tmp_path / "photos", SHAPES, per_class=4)
    (tmp_path / "private.png").write_bytes((source / "circle/circle_00.png").read_bytes())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/x.png").write_bytes(b"x")
    (source / "circle/out.png").symlink_to(tmp_path / "private.png")
    (source / "square/in.png").symlink_to(source / "square/square_00.png")
    (source / "cross/away").symlink_to(tmp_path / "elsewhere")
    (source / ".git/objects").mkdir(parents=True)
    (source / ".git/objects/ab").write_bytes(b"blob")
    (source / "circle/.DS_Store").write_bytes(b"\0")
    (source / ".trash/circle").mkdir(parents=True)
    (source / ".trash/circle/old.png").write_bytes(b"x")

    project = tmp_path / "p"
    assert stage(project, "ingest", {"data.source": str(source)}).returncode == 0
    assert raw_files(project) == {f"{c}/{c}_{i:02d}.png" for c in ("circle", "square", "cross") for i in range(4)}
    result = stage(project, "split")
    assert result.returncode == 0, result.stderr
    report = json.loads((project / "metrics/data_report.json").read_text())
    assert {s["path"]: s["reason"] for s in report["not_ingested"]} == {
        "circle/out.png": LINK, "square/in.png": LINK, "cross/away": LINK,
        ".git": "hidden folder; skipped with all it holds", ".trash": "hidden folder; skipped with all it holds",
        "circle/.DS_Store": "hidden or system file; skipped"}
    assert report["skipped"] == []  # the record and the note in data/raw are no images to report


def zip_with_link(path, members, link, target):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        info = zipfile.ZipInfo(link)
        info.external_attr = (0o120777 << 16)  # a symbolic link, as `zip --symlinks` stores one
        z.writestr(info, target)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_links_and_hidden_members_of_an_archive_are_skipped_and_recorded(tmp_path, kind):
    members = {**TREE, "photos/.unwrap/x.png": b"x", ".unwrap/y.png": b"y"}  # once a traceback
    archive = tmp_path / f"photos.{kind}"
    if kind == "zip":
        zip_with_link(archive, members, "photos/ants/passwd.png", "/etc/passwd")
    else:
        write_tar(archive, members, links=[("photos/ants/passwd.png", "/etc/passwd")])
    result = stage(tmp_path / "p", "ingest", {"data.source": str(archive)})
    assert result.returncode == 0, result.stderr
    assert raw_files(tmp_path / "p") == {"ants/a 1.png", "ants/field/a2.png", "abeilles été/b1.png",
                                         "abeilles été/b2.png"}
    assert left_out(tmp_path / "p") == {
        "photos/ants/passwd.png": LINK, "__MACOSX": "hidden folder; skipped with all it holds",
        "photos/.unwrap": "hidden folder; skipped with all it holds",
        ".unwrap": "hidden folder; skipped with all it holds"}


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    bomb = tmp_path / "photos.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("photos/cats/a.png", b"png")
        with z.open("photos/cats/zeros.png", "w") as member:
            for _ in range(300):
                member.write(zeros)
    assert bomb.stat().st_size < 400_000
    start = time.monotonic()
    result = stage(tmp_path / "p", "ingest", {"data.source": str(bomb)})
    seconds = time.monotonic() - start
    one_line_error(result, "photos.zip", "'photos/cats/zeros.png'", "314,572,800 bytes", "100:1", "extract it yourself")
    assert data_entries(tmp_path / "p") == []  # not even the small member
    assert seconds < 10, seconds  # a process start and the zip's directory: nothing inflated


def test_an_archive_declaring_more_than_the_free_disk_is_refused_before_extraction(tmp_path):
    archive = tmp_path / "photos.tar"
    huge = tarfile.TarInfo("photos/cats/huge.png")
    huge.size = 1 << 50  # a petabyte, declared in the header only
    archive.write_bytes(huge.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    result = stage(tmp_path / "p", "ingest", {"data.source": str(archive)})
    one_line_error(result, "photos.tar", "1,048,576.0 GiB", "free", "extract it yourself")
    assert data_entries(tmp_path / "p") == []


def test_a_dataset_archive_of_tens_of_thousands_of_photos_still_ingests(tmp_path):
    from test_ingest import image_bytes

    n, archive = 20_000, tmp_path / "photos.zip"
    pictures = [image_bytes((i % 256, i // 256 % 256, 0)) for i in range(256)]
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(n):
            z.writestr(f"photos/class{i % 10}/{i:05d}.png", pictures[i % 256])
    start = time.monotonic()
    result = stage(tmp_path / "p", "ingest", {"data.source": str(archive)})
    assert result.returncode == 0, result.stderr
    assert f"ingest: {n} files" in result.stdout
    assert len(raw_files(tmp_path / "p")) == n
    print(f"{n} photos ingested in {time.monotonic() - start:.1f} s")


class Endless(http.server.BaseHTTPRequestHandler):
    """/big: declares 10 MB; /unsized: no Content-Length, 10 MB; /slow: 100 kB, then a byte every 0.1 s."""

    def do_GET(self):
        self.send_response(200)
        if self.path == "/big":
            self.send_header("Content-Length", str(10 << 20))
        self.end_headers()
        try:
            for _ in range(10 if self.path != "/slow" else 0):
                self.wfile.write(bytes(1 << 20))
            if self.path == "/slow":
                self.wfile.write(bytes(100_000))  # a start (past the client's write buffer), then a trickle
            while self.path == "/slow":
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args):
        pass


@pytest.fixture
def endless_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path, limit", [("/big", "download limit"), ("/unsized", "download limit"),
                                         ("/slow", "took over 1 s")])
def test_a_download_over_the_size_cap_or_deadline_stops_with_one_line_and_no_file(tmp_path, endless_server, path,
                                                                                   limit):
    kept = []
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        download(endless_server + path, "0" * 64, tmp_path, keep=kept.append, max_bytes=1 << 20, deadline_s=1)
    assert limit in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("data.source=")
    assert time.monotonic() - start < 5
    assert kept == [] and list(tmp_path.iterdir()) == []


def test_a_killed_download_leaves_a_scratch_file_that_the_next_stage_start_removes(tmp_path, endless_server):
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(project, {"data.source": endless_server + "/slow", "data.sha256": "0" * 64})
    child = subprocess.Popen([python(), "-m", "src.ingest"], cwd=project, env={**env(), "PYTHONPATH": str(REPO)},
                             start_new_session=True)
    try:
        deadline = time.time() + 30
        while not list((project / "data").glob(".download.*.part.tmp")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a few bytes in
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    partial = list((project / "data").glob(".download.*.part.tmp"))  # beside the empty data/raw-to-be
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    one_line_error(stage(project, "split"), "data/raw not found")  # any stage: its start clears the leftovers
    assert data_entries(project) == []


KEEP_SCRATCH = """
import sys, time
from src.core.files import scratch
with scratch(sys.argv[1], ".x.") as tmp:
    tmp.write_text("in progress")
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_stage_start_removes_a_killed_runs_scratch_but_not_a_live_ones(tmp_path):
    child = subprocess.Popen([python(), "-c", KEEP_SCRATCH, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    try:
        live = Path(child.stdout.readline().strip())
        with scratch(tmp_path, ".y.", directory=True) as mine:
            (mine / "f").write_text("x")
        remove_stale_scratch([tmp_path])
        assert live.read_text() == "in progress"  # its process still holds it
        assert not mine.exists()  # nobody holds it any more: a leftover
    finally:
        child.kill()
        child.wait()
    remove_stale_scratch([tmp_path])
    assert list(tmp_path.iterdir()) == []


def test_data_raw_is_swapped_in_one_step(tmp_path):
    from src.core.files import exchange, replace_folder

    new, target = tmp_path / "new", tmp_path / "raw"
    new.mkdir()
    target.mkdir()
    (new / "a").write_text("new")
    (target / "a").write_text("old")
    assert exchange(new, target)  # atomic on this filesystem: a kill sees the old folder or the new one
    assert (target / "a").read_text() == "new" and (new / "a").read_text() == "old"
    replace_folder(new, target)
    assert (target / "a").read_text() == "old" and (new / "a").read_text() == "new"



class NeedsLogin(http.server.BaseHTTPRequestHandler):
    """Serves `archive` only with Basic auth bob:s3cret; /moved redirects to the same path elsewhere."""
    archive = b""
    seen = []

    def do_GET(self):
        auth = self.headers.get("Authorization")
        NeedsLogin.seen.append((self.path, auth))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/photos.tar.gz")
            self.end_headers()
        elif auth == "Basic " + base64.b64encode(b"bob:s3cret").decode():
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.archive)))
            self.end_headers()
            self.wfile.write(self.archive)
        else:
            self.send_response(401)
            self.end_headers()

    def log_message(self, *args):
        pass


def test_credentials_come_from_netrc_and_never_follow_a_redirect(tmp_path):
    archive = write_tar(tmp_path / "photos.tar.gz", TREE)
    NeedsLogin.archive, NeedsLogin.seen = archive.read_bytes(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NeedsLogin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password s3cret\n")
    netrc.chmod(0o600)
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    url = f"http://127.0.0.1:{server.server_address[1]}"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    try:
        def ingest(path, netrc_file):
            set_params(project, {"data.source": url + path, "data.sha256": sha})
            return run([python(), "-m", "src.ingest"], project, check=False,
                       env={**env(), "PYTHONPATH": str(REPO), "NETRC": str(netrc_file)})

        one_line_error(ingest("/photos.tar.gz", tmp_path / "none"), "download failed", "401")
        result = ingest("/photos.tar.gz", netrc)
        assert result.returncode == 0, result.stderr
        assert raw_files(project) == EXTRACTED
        one_line_error(ingest("/moved", netrc), "401")  # localhost is another host: no password sent there
        assert NeedsLogin.seen[-2:] == [("/moved", NeedsLogin.seen[-2][1]), ("/photos.tar.gz", None)]
        assert NeedsLogin.seen[-2][1] is not None
    finally:
        server.shutdown()
        server.server_close()


def test_a_data_raw_without_ingests_record_is_kept_until_the_user_says(tmp_path):
    project = tmp_path / "p"
    image_folder(project / "data/raw", SHAPES, per_class=4)  # an older ingest's copy, or photos put there by hand
    before = snapshot(project / "data/raw")
    source = image_folder(tmp_path / "photos", SHAPES, per_class=4, seed=1)
    one_line_error(stage(project, "ingest", {"data.source": str(source)}), "no record", "delete data/raw")
    assert snapshot(project / "data/raw") == before
