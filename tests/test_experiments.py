"""Queued experiments run two at a time land in the workspace's MLflow store with the numbers
`dvc exp show` reports, and a `mlflow server` on that store serves them."""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from src.core.params import flatten
from src.networks.checkpoint import load_trained_model

from conftest import (
    commit_data_stages,
    env,
    free_port,
    image_folder,
    logged_runs,
    make_project,
    run,
    stop_server,
    store_uri,
    use_store,
    wait_until_answers,
)

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out

EXPERIMENTS = {"r18": "resnet18", "r18d": "resnet18d"}  # ResNet-D: the same cost, another network
LR = {"r18d": 0.001}  # one knob set beside the recipe: it wins over the recipe's (0.002)


def experiments_shown(project):
    """{experiment name: its `dvc exp show --json` data} for every experiment of the baseline."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            for r in exp.get("revs", []):
                data = r.get("data") or {}
                name = data.get("name") or r.get("name") or exp.get("name")
                found[name] = data
    return found


def finished(project, names):
    """The experiments among `names` that have their git ref (a cheap check: `dvc queue status` is a
    DVC start-up, seconds of a core that the queued trainings need)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    return {n for n in names if any(ref.endswith("/" + n) for ref in refs)}


def wait_for_queue(project, names, timeout=900):
    deadline, status, checked = time.time() + timeout, "", 0.0
    while time.time() < deadline:
        done = finished(project, names) == set(names)
        if done or time.time() - checked > 20:  # DVC's own word now and then: has one failed?
            status, checked = run(["dvc", "queue", "status"], project).stdout, time.time()
            if "Failed" in status:
                failed = [n for n in names if any(n in line and "Failed" in line for line in status.splitlines())]
                logs = [run(["dvc", "queue", "logs", n], project, check=False).stdout[-6000:] for n in failed]
                raise AssertionError(f"a queued experiment failed:\n{status}\n" + "\n".join(logs))
            lines = [line for line in status.splitlines() if any(n in line for n in names)]
            if done and len(lines) == len(names) and all("Success" in line for line in lines):
                return
        time.sleep(1)
    raise AssertionError(f"queue still busy after {timeout}s:\n{status}")


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """A project whose two queued experiments ran with `dvc queue start -j 2`."""
    root = tmp_path_factory.mktemp("queue")
    images = image_folder(root / "images")
    project = make_project(root / "project", {"data.source": str(images), "train.epochs": 1})
    commit_data_stages(project)
    for name, arch in EXPERIMENTS.items():
        # r18d: a knob beside the recipe, and its network logged (loaded below; logging one takes
        # seconds of a training, so r18 does not)
        extra = ["-S", f"train.lr={LR[name]}", "-S", "mlflow.log_model=true"] if name in LR else []
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"arch={arch}", *extra], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    try:
        wait_for_queue(project, list(EXPERIMENTS))
    finally:
        run(["dvc", "queue", "stop", "--kill"], project, check=False)
    return project


def store_runs(project):
    """{run name: run} of the workspace's store."""
    return {r.info.run_name: r for r in logged_runs(project)}


def test_queued_parallel_runs_land_in_workspace_store_with_dvc_numbers(queued):
    shown = experiments_shown(queued)
    runs = store_runs(queued)
    assert set(runs) == set(EXPERIMENTS), runs.keys()
    client = use_store(queued)
    baseline = run(["git", "rev-parse", "HEAD"], queued).stdout.strip()
    for name, arch in EXPERIMENTS.items():
        logged, data = runs[name], shown[name]
        assert logged.data.params["arch"] == arch == data["params"]["params.yaml"]["data"]["arch"]
        assert logged.data.params["train.epochs"] == "1"
        assert logged.data.tags["dvc_exp_name"] == name
        assert logged.data.tags["dvc_exp_baseline_rev"] == baseline
        assert len(logged.data.tags["git_commit"]) == 40
        assert len(logged.data.tags["dataset_digest"]) == 64
        history = client.get_metric_history(logged.info.run_id, "curves/val_acc")
        assert [m.step for m in history] == [1]
        # Every metric DVC shows for the experiment is in the MLflow run with the same value.
        # Every headline metric DVC shows for the experiment is in the MLflow run, with the same
        # name (test/accuracy) and value; per-class numbers are a table artifact there.
        for path in ("metrics/train.json", "metrics/eval.json"):
            dvc_metrics = flatten(data["metrics"][path]["data"])
            assert dvc_metrics, path
            for key, value in dvc_metrics.items():
                if key.startswith("recipe."):  # the knobs the recipe filled: the run's params say the same
                    param = "recipe" if key == "recipe.name" else key.removeprefix("recipe.")
                    assert logged.data.params[param] == str(value), (name, key)
                elif "/per_class/" not in key:
                    assert logged.data.metrics[key] == pytest.approx(value, rel=1e-12), (name, key)
        recipe = flatten(data["metrics"]["metrics/train.json"]["data"])
        assert recipe["recipe.name"] == "digits" and recipe["recipe.train.optimizer"] == "adam"
        assert ("recipe.train.lr" in recipe) == (name not in LR)  # set by -S: not the recipe's
        assert float(logged.data.params["train.lr"]) == LR.get(name, 0.002)
        assert "test/accuracy" in logged.data.metrics
        # Artifacts on disk at the workspace root, not in the deleted temp copy.
        artifacts = Path(logged.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(queued / "mlartifacts")
        for rel in ("checkpoint/model.pt", "plots/training_curves.png", "class_indices.json",
                    "data_report.json", "confusion.csv"):
            assert (artifacts / rel).stat().st_size > 0, rel
    assert runs["r18"].data.tags["dataset_digest"] == runs["r18d"].data.tags["dataset_digest"]  # same images
    assert not list((queued / ".dvc/tmp/exps").glob("*/mlflow.db"))


def test_exp_apply_restores_weights_of_the_run_and_its_mlflow_model_predicts_alike(queued):
    run(["dvc", "exp", "apply", "r18d"], queued)
    ckpt = torch.load(queued / "models/model.pt", weights_only=True)
    logged = store_runs(queued)["r18d"]
    assert ckpt["arch"] == "resnet18d" and ckpt["mlflow_run_id"] == logged.info.run_id
    artifacts = Path(logged.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "checkpoint/model.pt").read_bytes() == (queued / "models/model.pt").read_bytes()
    loaded = mlflow.pytorch.load_model(logged.data.tags["model_uri"])
    reference, _ = load_trained_model(queued / "models/model.pt")
    batch = torch.randn(4, 3, ckpt["image_size"], ckpt["image_size"])
    with torch.inference_mode():
        assert torch.equal(loaded(batch).argmax(1), reference(batch).argmax(1))


def test_mlflow_server_on_the_store_lists_both_runs(queued):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri(queued),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=queued, env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_answers(server, f"{url}/health", "mlflow server")

        def api(endpoint, body=None):
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", method="POST" if body else "GET",
                                             data=json.dumps(body).encode() if body else None,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.load(r)

        experiment = api("experiments/get-by-name?experiment_name=resnet-transfer")["experiment"]
        found = api("runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        by_name = {r["info"]["run_name"]: r for r in found}
        assert set(by_name) == set(EXPERIMENTS)
        for name, arch in EXPERIMENTS.items():
            params = {p["key"]: p["value"] for p in by_name[name]["data"]["params"]}
            metrics = {m["key"] for m in by_name[name]["data"]["metrics"]}
            assert params["arch"] == arch and {"curves/val_acc", "test/accuracy"} <= metrics
    finally:
        stop_server(server)
