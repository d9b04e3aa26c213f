"""Training survives SIGKILL: a rerun continues from the last completed epoch and ends with
exactly the weights an uninterrupted run ends with (CPU, fp32, deterministic)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.core.params import load_params
from src.networks.checkpoint import load_checkpoint, save_checkpoint
from src.training.resume import fingerprint, load_resume

from conftest import REPO, env, image_folder, logged_runs, make_project, run, set_params, use_store

HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: RESNET_TL_TEST_KILL_AT=EPOCH:BATCH kills training there
pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


# With the photo recipe's random parts on: augmentation policy, erasing, MixUp/CutMix, weight EMA.
DETERMINISTIC = {"train.epochs": 2, "train.batch_size": 16, "train.precision": "fp32", "train.workers": 0,
                 "train.deterministic": True, "train.channels_last": False, "train.patience": 0,
                 "train.augment": "trivialaugment", "train.random_erasing": 0.25, "train.mixup": 0.2,
                 "train.cutmix": 1.0, "train.ema_decay": 0.9}


def state_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(tmp_path):
    data = image_folder(tmp_path / "images", per_class=30)
    project = make_project(tmp_path / "project", {"data.source": str(data), **DETERMINISTIC})
    run(["dvc", "repro", "train"], project)  # train.checkpoint_minutes: 1, far longer than this run
    uninterrupted = state_of(project / "models/resume.pt")
    assert uninterrupted["finished"] and uninterrupted["epoch"] == 2  # the last epoch is always written
    best_uninterrupted = load_checkpoint(project / "models/model.pt")

    # A finished run is never resumed: a forced rerun trains from epoch 1; kill it mid-epoch 2.
    kill = {**env(), "RESNET_TL_TEST_KILL_AT": "2:3", "PYTHONPATH": str(HOOKS)}
    killed = run(["dvc", "repro", "-f", "-s", "train"], project, check=False, env=kill)
    assert killed.returncode != 0
    assert "resuming" not in killed.stdout
    assert state_of(project / "models/resume.pt")["finished"]  # epoch 1 was within the minute: not written

    set_params(project, {"train.checkpoint_minutes": 0})  # every epoch (the math is the same)
    killed = run(["dvc", "repro", "-f", "-s", "train"], project, check=False, env=kill)
    assert killed.returncode != 0
    partial = state_of(project / "models/resume.pt")
    assert partial["epoch"] == 1 and not partial["finished"]

    # `dvc repro` deletes the stage's outputs, then the stage continues after epoch 1.
    resumed = run(["dvc", "repro", "train"], project)
    assert "resuming after epoch 1" in resumed.stdout
    final = state_of(project / "models/resume.pt")
    assert final["finished"] and final["epoch"] == 2
    assert_same_weights(final["model"], uninterrupted["model"])
    assert_same_weights(final["ema"], uninterrupted["ema"])
    assert_same_weights(final["optimizer"]["state"][0], uninterrupted["optimizer"]["state"][0])
    def numbers(history):  # all but the clock
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert numbers(final["history"]) == numbers(uninterrupted["history"])
    best = load_checkpoint(project / "models/model.pt")
    assert best["epoch"] == best_uninterrupted["epoch"]
    assert_same_weights(best["model"], best_uninterrupted["model"])
    history = (project / "metrics/train_history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history] == ["epoch", "1", "2"]

    # The killed run and its continuation are one MLflow run with one value per epoch.
    runs = logged_runs(project)
    assert len(runs) == 3  # the uninterrupted run, the one killed before any write, the killed and continued one
    continued = next(r for r in runs if r.info.run_id == final["mlflow_run_id"])
    assert continued.info.status == "FINISHED"
    steps = use_store(project).get_metric_history(continued.info.run_id, "curves/val_acc")
    assert sorted(m.step for m in steps) == [1, 2]
    assert best["mlflow_run_id"] == final["mlflow_run_id"]


def test_resume_file_is_ignored_for_other_params_or_data(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "images", per_class=4)
    project = make_project(tmp_path / "project", {"data.source": str(data)})
    run(["dvc", "repro", "classes"], project)
    monkeypatch.chdir(project)  # restored after the test (later tests run where pytest started)
    params = load_params()
    files = ["data/manifest.csv", "data/class_indices.json", "metrics/data_report.json"]
    fp = fingerprint(params, files, 1)
    save_checkpoint("models/resume.pt", {"fingerprint": fp, "finished": False, "epoch": 1})
    assert load_resume("models/resume.pt", fp)["epoch"] == 1
    params["train"]["checkpoint_minutes"] = 5  # when to write, not what is trained: still resumes
    assert fingerprint(params, files, 1) == fp
    params["train"]["lr"] *= 2
    assert fingerprint(params, files, 1) != fp
    assert fingerprint(load_params(), files, 2) != fp  # another process count
    with open("data/manifest.csv", "a") as f:
        f.write("extra,row,train\n")
    assert fingerprint(load_params(), files, 1) != fp
    save_checkpoint("models/resume.pt", {"fingerprint": fp, "finished": True, "epoch": 3})
    assert load_resume("models/resume.pt", fp) is None


SLOW_SAVE = """
import sys, torch
from src.networks.checkpoint import save_checkpoint
save_checkpoint(sys.argv[1], {"epoch": 1, "model": {"w": torch.ones(3)}})
print("first written", flush=True)
# Many small tensors make the second write take seconds: time to kill it half-way.
save_checkpoint(sys.argv[1], {"epoch": 2, "model": {str(i): torch.zeros(64) for i in range(60000)}})
print("second written", flush=True)
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "models" / "model.pt"
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "first written"
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until the second write is on disk, half done
            partial = [p for p in path.parent.glob(".model.pt.*.tmp") if p.stat().st_size > 0]
            if partial:
                break
            time.sleep(0.01)
        assert partial, "the second write never started"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert partial[0].exists()  # killed mid-write: the temporary file is left, half written
    previous = load_checkpoint(path)
    assert previous["epoch"] == 1 and torch.equal(previous["model"]["w"], torch.ones(3))
