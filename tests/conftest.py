"""Shared test helpers: a throw-away copy of the project as its own git + DVC repo."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
PROJECT_FILES = ["src", "dvc.yaml", "params.yaml", "tune.yaml", ".dvcignore", ".gitignore", ".dvc/config",
                 ".dvc/.gitignore"]

# MLflow models this project logs (the pt2 network, the models-from-code image model) load without
# unpickling anything: every MLflow load in the tests, in process or in a server, proves it.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs the pipeline through real dvc (`make test-fast` skips it)")


HEAVY_SESSION_SETUPS = {"exported_project"}  # built once per run, not once per test process


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs two test processes (pytest-xdist, `--dist loadgroup`): tests that share a
    heavy set-up (a module-scoped fixture, or the exported project) go to the same process, so
    each set-up is still built once. Modules with slow tests go first (each module's tests kept
    together, in order): handed out last, a minute-long test kept one process busy while the
    other had nothing left to do."""
    has_slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in has_slow)  # stable: the rest stays in order
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        defs = defs.name2fixturedefs if defs else {}
        if HEAVY_SESSION_SETUPS & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("exported"))
        elif any(d[-1].scope == "module" for d in defs.values() if d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True)
def started_where_pytest_started():
    """Every test starts in the directory pytest started in, whatever the one before it did (the
    order of tests differs between runs and processes)."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.hookimpl(trylast=True)  # after xdist's own hook has named each item after its group
def pytest_collection_finish(session):
    """Stop if pytest-xdist ignored the groups (it did with pytest 9): every heavy set-up would be
    built once per process, silently."""
    grouped = [i for i in session.items if i.get_closest_marker("xdist_group")]
    if getattr(session.config.option, "loadgroup", False) and grouped and "@" not in grouped[0].nodeid:
        raise pytest.UsageError("pytest-xdist's --dist loadgroup ignores the test groups with this pytest: "
                                "install requirements-dev.txt's versions")


# Tiny settings: the whole pipeline in seconds on 2 cores (the digits recipe, as today's tests
# expect, whatever the source: the photo recipe trains for 3 minutes).
TINY = {
    "recipe": "digits",
    "data.image_size": 16,
    "train.epochs": 2,
    "train.batch_size": 64,
    "evaluate.batch_size": 256,
    "mlflow.log_model": False,  # seconds per training; the tests that load a run's network turn it on
}


def env():
    e = dict(os.environ, DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
             GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
             GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    # Stages run `python`: make it this interpreter, whatever PATH says.
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def run(cmd, cwd, check=True, **kwargs):
    """Run a command like a user would; on failure show everything it printed."""
    result = subprocess.run(cmd, cwd=cwd, env=kwargs.pop("env", env()), capture_output=True, text=True,
                            shell=isinstance(cmd, str), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def set_params(project, overrides):
    """Write dotted overrides ({'train.lr': 0.1}) into project/params.yaml."""
    path = Path(project) / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest, overrides=None):
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    set_params(dest, {**TINY, **(overrides or {})})
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "project"], dest)
    return dest


def commit_data_stages(project):
    """Ingest, split and classes reproduced and committed, as README says before experiments (two
    at once that both ran them would write one run-cache entry together, and DVC fails one)."""
    run(["dvc", "repro", "classes"], project)
    run("git add -A && git commit -qm data", project)
    return project


@pytest.fixture
def project(tmp_path):
    """A fresh git + DVC copy of this project with tiny params, committed."""
    return make_project(tmp_path / "project")


def copy_project(project, dest):
    """A copy of a test project (git repo, DVC cache, outputs) to change without touching the original."""
    shutil.copytree(project, dest, symlinks=True)
    return Path(dest)


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory):
    """The sample (digits) through ingest, split and classes, once for the session (ingesting and
    checking 1797 images is the same work for every test that trains on them). Read-only: use
    `digits_project` to train."""
    project = make_project(tmp_path_factory.mktemp("digits") / "project")
    run(["dvc", "repro", "classes"], project)
    return project


@pytest.fixture
def digits_project(digits_prepared, tmp_path):
    """A fresh copy of the project, tiny params, with the digits ingested, split and indexed: ready to train."""
    return copy_project(digits_prepared, tmp_path / "project")


def python():
    return sys.executable


SHAPES = ["circle", "square", "cross"]  # class names of the shape-like folders several tests share


def image_folder(dest, classes=3, per_class=12, size=20, seed=0, fmt="png"):
    """A tiny photo-like dataset: dest/<class>/<class>_<i>.<fmt>, every image distinct (per-image noise).

    `classes`: a count (class0, class1, ...) or the names; `per_class`: one count for all, or one per
    class. Each class has its own colour (the first three: red, green, blue channel), and past three
    classes a white bar in its own place: learnable in an epoch or two, decoded in no time. Folders made
    by two calls share pictures unless their seeds differ.
    """
    import numpy as np
    from PIL import Image

    names = [f"class{c}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    assert len(counts) == len(names), (names, counts)
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(zip(names, counts)):
        folder = Path(dest) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
            pixels[:, :, c % 3] += 150
            if c >= 3:  # three colours: further classes also get a bar, its column set by the class
                column = (c // 3) * size // (len(names) // 3 + 2)
                pixels[:, column:column + max(1, size // 8)] = 255
            Image.fromarray(pixels).save(folder / f"{name}_{i:02d}.{fmt}")
    return Path(dest)


def store_uri(workspace):
    """The workspace's MLflow store, where the stages log by default (sqlite:///<workspace>/mlflow.db)."""
    return f"sqlite:///{Path(workspace) / 'mlflow.db'}"


def use_store(workspace):
    """Point this process's mlflow at the workspace's store; an MlflowClient on it."""
    import mlflow

    mlflow.set_tracking_uri(store_uri(workspace))
    return mlflow.MlflowClient()


def logged_runs(workspace, experiment="resnet-transfer"):
    """The runs of the workspace's store in `experiment` (params.yaml's mlflow.experiment), newest first."""
    import mlflow

    use_store(workspace)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def free_port():
    """A TCP port on 127.0.0.1 nothing listens on (for a test server, or for one that isn't there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(server, url, what, timeout=180):
    """Return once `url` answers 200; fail with the server's stderr if it exits first."""
    deadline = time.time() + timeout
    while True:
        assert server.poll() is None, f"{what} exited: {server.stderr.read().decode()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline, f"{what} did not answer {url}"
        time.sleep(1)


def stop_server(server):
    """SIGTERM the server's process group (started with start_new_session=True), then SIGKILL."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def tutorial_logits(model, ckpt, paths, batch_size=256):
    """fp32 logits the tutorial's way: each image through the float eval transform (Resize,
    CenterCrop, ToTensor, Normalize), then the plain model: an independent check of the fast path."""
    import torch
    from PIL import Image

    from src.data.transforms import eval_transform

    transform = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])
    model.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start:start + batch_size]:
                with Image.open(path) as img:
                    batch.append(transform(img.convert("RGB")))
            logits.append(model(torch.stack(batch)).float())
    return torch.cat(logits)


@pytest.fixture(scope="session")
def exported_project(tmp_path_factory):
    """(project, test-split manifest rows, MLflow run id): one tiny project trained and exported
    through `dvc repro export`, committed and tagged as an artifact version (what `dvc artifacts
    get` looks up); shared by the export and serving tests."""
    import csv

    root = tmp_path_factory.mktemp("export")
    image_folder(root / "images", SHAPES, per_class=16, size=40)
    project = make_project(root / "project", {
        "data.source": str(root / "images"), "data.image_size": 32, "data.eval_image_size": 40, "data.val": 0.2,
        "data.test": 0.25,
        "train.epochs": 4, "train.batch_size": 8, "export.calibration_images": 16, "mlflow.register_model": "shapes"})
    run(["dvc", "repro", "export"], project)
    run("git add -A && git commit -qm trained && git tag -a resnet-classifier@v0.1.0 -m v0.1.0", project)
    with open(project / "data/manifest.csv", newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    (run_info,) = logged_runs(project)
    return project, test, run_info.info.run_id


def postgres_bin():
    """PostgreSQL's server binaries (Debian puts them in /usr/lib/postgresql/<version>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or (
        [Path(shutil.which("initdb"))] if shutil.which("initdb") else [])
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 in a temporary folder, for the session. It refuses to run
    as root, so under root it runs as the `postgres` user. Yields a function: database name -> URL."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL's server binaries are missing: `make test` installs them (Debian's postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="resnet-tl-pg-", dir="/tmp"))  # not under root's 0700 pytest folder
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    run([*as_user, bin_dir / "initdb", "-A", "trust", "-U", "postgres", "-D", folder / "data"], folder)
    run([*as_user, bin_dir / "pg_ctl", "-D", folder / "data", "-l", folder / "log", "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], folder)

    def database(name):
        run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name], folder)
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"
    try:
        yield database
    finally:
        run([*as_user, bin_dir / "pg_ctl", "-D", folder / "data", "-m", "fast", "stop"], folder, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def team_mlflow(postgres, tmp_path_factory):
    """A team's MLflow server as README starts it (`make team-server`): PostgreSQL backend, artifacts
    proxied into a folder. Yields (tracking URI, artifact folder)."""
    artifacts = tmp_path_factory.mktemp("team-artifacts")
    port = free_port()
    server = subprocess.Popen(["make", "-s", "-C", str(REPO), "team-server", f"DB={postgres('mlflow')}",
                               f"ARTIFACTS={artifacts}", "HOST=127.0.0.1", f"PORT={port}", "WORKERS=1"],
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(server, f"{uri}/health", "mlflow server")
        yield uri, artifacts
    finally:
        stop_server(server)
