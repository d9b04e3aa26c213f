"""`torchrun --nproc_per_node=2 -m src.train` on CPU (gloo): DDP over both processes, one set of outputs."""
import json

import pytest
import torch

from conftest import image_folder, logged_runs, make_project, python, run

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


def test_torchrun_two_processes_match_single_process(digits_project):
    project = digits_project
    single = run([python(), "-m", "src.train"], project)
    single_metrics = json.loads((project / "metrics/train.json").read_text())
    assert "rank" not in single.stdout

    distributed = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "src.train"], project)
    out = distributed.stdout
    assert "2 processes" in out
    # Both ranks trained their half of the data; only rank 0 reported epochs.
    assert "rank 0 of 2 trained 2 epochs on its 720 of 1439 train images" in out
    assert "rank 1 of 2 trained 2 epochs on its 720 of 1439 train images" in out
    assert out.count("epoch 1/2:") == 1 and out.count("epoch 2/2:") == 1

    assert sorted(p.name for p in (project / "models").iterdir()) == ["model.pt", "resume.pt"]
    assert not list(project.glob("**/.*.tmp"))
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["epochs_run"] == 2
    last = torch.load(project / "models/resume.pt", weights_only=True)
    assert last["finished"] and not any(k.startswith("module.") for k in last["model"])
    # Same global batch and schedule: the accuracy stays close to one process's.
    assert abs(metrics["best_val_acc"] - single_metrics["best_val_acc"]) <= 0.05, (metrics, single_metrics)
    assert metrics["best_val_acc"] > 0.8

    runs = logged_runs(project)
    assert len(runs) == 2  # one per training, none from rank 1


def test_torchrun_head_first_unfreezes_on_every_rank_in_step(tmp_path):
    # The backbone starts frozen, so DDP first wraps only the head; after the unfreeze every
    # parameter must be synchronised again, or the ranks' backbones drift apart (the stage
    # compares the ranks' weights at the end and fails if they differ). What is learnt doesn't
    # matter here: a few tiny images, not the digits.
    images = image_folder(tmp_path / "images")
    project = make_project(tmp_path / "project", {"data.source": str(images), "model.transfer": "head_first",
                                                  "model.head_epochs": 1})
    run(["dvc", "repro", "classes"], project)
    out = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "src.train"], project).stdout
    assert "rank 0 of 2 trained 2 epochs" in out and "rank 1 of 2 trained 2 epochs" in out
    assert "out of sync" not in out
