"""Attacks on `mlflow models serve` of the image model, through a real server on 127.0.0.1, run
once with file paths refused (the default) and once with an allowed folder: the server never
reads a path a client names outside it, decodes nothing over its limits, and answers one row
per input (an error row for a bad one) without a traceback."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import pytest
from PIL import Image

from src.shipping.serving import DEFAULTS, FILES, MAX_BYTES, MAX_PIXELS, MAX_ROWS

from conftest import env, free_port, stop_server, store_uri, wait_until_answers
from test_images import zeros_png

MAX_BYTES_HERE = 1_000_000  # below the default, so a test needs no 20 MB request


class Server(NamedTuple):
    url: str
    allowed: object  # the folder RESNET_TL_SERVE_FILES names, when it is set
    outside: object
    files_allowed: bool
    photo: object  # a test image, and its class
    label: str


@pytest.fixture(scope="module", params=["bytes only", "files allowed"])
def server(request, exported_project, tmp_path_factory):
    project, test, run_id = exported_project
    root = tmp_path_factory.mktemp("serving")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    photo = project / test[0]["path"]
    shutil.copy(photo, allowed / "photo.png")
    shutil.copy(photo, outside / "secret.png")
    for folder in (allowed, outside):
        os.mkfifo(folder / "fifo.png")  # opening one for reading blocks until a writer comes: never here
    (allowed / "link out.png").symlink_to(outside / "secret.png")
    (allowed / "link to fifo.png").symlink_to(outside / "fifo.png")
    files_allowed = request.param == "files allowed"
    variables = {MAX_BYTES: str(MAX_BYTES_HERE), **({FILES: str(allowed)} if files_allowed else {})}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/image_model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env={**env(), "MLFLOW_TRACKING_URI": store_uri(project), **variables},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_answers(process, f"http://127.0.0.1:{port}/ping", "mlflow models serve")
        yield Server(f"http://127.0.0.1:{port}", allowed, outside, files_allowed, photo, test[0]["label"])
    finally:
        stop_server(process)


def ask(server, values, timeout=30):
    """(HTTP status, parsed JSON answer, its text) of one request with a column `image`."""
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}).encode()
    request = urllib.request.Request(f"{server.url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    return status, json.loads(text), text


def b64(data):
    return base64.b64encode(data).decode("ascii")


def test_a_server_path_gets_the_one_error_row_and_is_never_opened(server):
    paths = [server.outside / "secret.png", server.outside / "missing.png", f"{server.allowed}/../outside/secret.png",
             server.allowed / "link out.png", server.outside / "fifo.png", server.allowed / "fifo.png",
             server.allowed / "link to fifo.png", server.allowed / "missing.png", "/etc/hostname", "/etc/hostnamf",
             "../outside/secret.png", "x" * 300 + ".png"]  # a name too long for the filesystem
    status, answer, _ = ask(server, [str(p) for p in paths])  # a FIFO opened would hang it: the timeout fails it
    assert status == 200
    rows = answer["predictions"]
    assert len(rows) == len(paths) and all(row["class"] == "" for row in rows)
    assert len({row["error"] for row in rows}) == 1  # missing, outside, link out, FIFO: the same answer
    assert "base64" in rows[0]["error"] and str(server.outside) not in rows[0]["error"]
    status, answer, _ = ask(server, [str(server.allowed / "photo.png"), "photo.png"])
    for row in answer["predictions"]:
        if server.files_allowed:  # inside the allowed folder, absolute or relative to it
            assert (row["class"], row["error"]) == (server.label, "")
        else:
            assert row["error"] == rows[0]["error"]


def test_a_100_mpx_png_is_refused_from_its_header_in_under_a_second(server):
    bomb = zeros_png(10000, 10000)
    assert len(bomb) < 500_000
    start = time.perf_counter()
    status, answer, _ = ask(server, [b64(bomb)])
    elapsed = time.perf_counter() - start
    (row,) = answer["predictions"]
    assert status == 200 and row["class"] == ""
    assert "100.0 Mpx, over the budget of 50.0 Mpx" in row["error"] and MAX_PIXELS in row["error"]
    assert elapsed < 1, elapsed  # decoding it would take seconds (and 100 MB); the header takes none


def test_a_30_mpx_16_bit_png_is_classified(server):
    """Within the default budget, so decoded: in float32 strips (its memory: test_images.py)."""
    status, answer, _ = ask(server, [b64(zeros_png(6000, 5000, 16))])
    (row,) = answer["predictions"]
    assert status == 200 and row["error"] == "" and row["class"]


def test_an_eps_payload_is_refused_unparsed(server):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, "EPS")
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.format == "EPS"  # a real EPS: Pillow alone would hand it to Ghostscript to draw
    status, answer, _ = ask(server, [b64(buf.getvalue())])
    (row,) = answer["predictions"]
    assert status == 200 and row["class"] == "" and "not an image in a format this project decodes" in row["error"]


def test_a_request_over_the_row_limit_is_refused_and_the_next_one_answered(server):
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    rows = DEFAULTS[MAX_ROWS] + 1
    status, answer, text = ask(server, [b64(tiny.getvalue())] * rows)
    assert status == 400
    assert f"{rows} rows in one request; this server takes at most {DEFAULTS[MAX_ROWS]}" in answer["message"]
    assert MAX_ROWS in answer["message"] and "Traceback" not in text and "stack_trace" not in answer
    status, answer, _ = ask(server, [b64(server.photo.read_bytes())])
    assert status == 200 and answer["predictions"][0]["class"] == server.label


def test_junk_beside_a_good_image_gets_error_rows_and_the_good_one_its_class(server):
    junk = ["a" * 300, "x" * 300, "%%% not base64 %%%", "", b64(b"GIF89a, then nothing"),
            b64(bytes(MAX_BYTES_HERE + 1))]
    status, answer, text = ask(server, [b64(server.photo.read_bytes()), *junk])
    assert status == 200 and "Traceback" not in text
    good, *bad = answer["predictions"]
    assert (good["class"], good["error"]) == (server.label, "")
    assert all(row["class"] == "" and row["error"] for row in bad)
    assert f"limit of {MAX_BYTES_HERE:,} bytes per image" in bad[-1]["error"] and MAX_BYTES in bad[-1]["error"]
