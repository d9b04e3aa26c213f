"""`torchrun --nproc_per_node=2 -m src.train` on CPU (gloo): DDP over both processes, one set of outputs."""
import json
import subprocess

import pytest
import torch

from src.data.manifest import read_manifest

from conftest import REPO, copy_project, env, free_port, image_folder, logged_runs, make_project, python, run

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


def test_torchrun_two_processes_split_the_data_and_write_one_set_of_outputs(tmp_path):
    data = image_folder(tmp_path / "images", per_class=40)
    project = make_project(tmp_path / "project", {"data.source": str(data), "train.batch_size": 8})
    run(["dvc", "repro", "classes"], project)
    distributed = run([python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "src.train"], project)
    out = distributed.stdout
    assert "2 processes" in out
    # Both ranks trained their half of the data; only rank 0 reported epochs.
    n = sum(row["split"] == "train" for row in read_manifest(project / "data/manifest.csv"))
    assert f"rank 0 of 2 trained 2 epochs on its {(n + 1) // 2} of {n} train images" in out
    assert f"rank 1 of 2 trained 2 epochs on its {(n + 1) // 2} of {n} train images" in out
    assert out.count("epoch 1/2:") == 1 and out.count("epoch 2/2:") == 1

    assert sorted(p.name for p in (project / "models").iterdir()) == ["model.pt", "resume.pt"]
    assert not list(project.glob("**/.*.tmp"))
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["epochs_run"] == 2
    last = torch.load(project / "models/resume.pt", weights_only=True)
    assert last["finished"] and not any(k.startswith("module.") for k in last["model"])
    # The global batch and schedule of one process (which reaches 1.0 here): it learns as well.
    assert metrics["best_val_acc"] > 0.8
    assert len(logged_runs(project)) == 1  # none from rank 1


HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: RESNET_TL_TEST_KILL_AT=EPOCH:BATCH kills training there
# Bitwise-repeatable training (as tests/test_resume.py): a resumed run must end exactly where an uninterrupted one does.
DETERMINISTIC = {"train.epochs": 2, "train.batch_size": 16, "train.precision": "fp32", "train.workers": 0,
                 "train.deterministic": True, "train.channels_last": False, "data.val": 0.3,
                 "train.checkpoint_minutes": 0}  # the resume file after every epoch
# The head alone in epoch 1, everything from epoch 2 (killed there): DDP first wraps only the head's
# parameters, so after the unfreeze it must synchronise them all again, or the ranks' backbones
# drift apart (the stage compares the ranks' weights at the end and fails if they differ).
HEAD_FIRST = {"model.transfer": "head_first", "model.head_epochs": 1}
def two_nodes(copies, extra_env=None):
    """`torchrun --nnodes=2` with a c10d rendezvous on 127.0.0.1, each node in its own working copy
    (no shared disk): what two machines would run. Returns (exit code, output) per node."""
    cmd = [python(), "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=resnet-tl-test", "-m", "src.train"]
    nodes = [subprocess.Popen(cmd, cwd=copy, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for copy in copies]
    return [(node.returncode, out) for node, out in ((n, n.communicate(timeout=600)[0]) for n in nodes)]


def rank0_copy(copies):
    """The working copy rank 0 ran in (the rendezvous decides): the one whose resume file is finished."""
    done = [c for c in copies if (c / "models/resume.pt").exists()
            and torch.load(c / "models/resume.pt", weights_only=True)["finished"]]
    assert len(done) == 1, done
    return done[0]


def single_process_val(project):
    """(val loss, val accuracy) of model.pt's weights as training validated them, in one process."""
    from src.data.loaders import ImageFiles
    from src.data.manifest import load_class_names, read_manifest, rows_for
    from src.networks.checkpoint import load_trained_model
    from src.train import evaluate
    model, ckpt = load_trained_model(project / "models/model.pt")
    with torch.no_grad():  # undo the temperature folded into the head: the weights training validated
        model.fc.weight *= ckpt["temperature"]
        model.fc.bias *= ckpt["temperature"]
    paths, labels = rows_for(read_manifest(project / "data/manifest.csv"), "val",
                             load_class_names(project / "data/class_indices.json"))
    return evaluate(model, ckpt, (ImageFiles([project / p for p in paths], ckpt["image_size"]), torch.tensor(labels)),
                    torch.device("cpu"), 16)[:2]


def test_two_nodes_without_shared_disk_resume_after_a_kill_where_an_uninterrupted_run_ends(tmp_path):
    data = image_folder(tmp_path / "images", per_class=30)
    prepared = make_project(tmp_path / "prepared", {"data.source": str(data), **DETERMINISTIC, **HEAD_FIRST})
    run(["dvc", "repro", "classes"], prepared)
    reference = [copy_project(prepared, tmp_path / f"ref{i}") for i in range(2)]
    results = two_nodes(reference)
    assert [code for code, _ in results] == [0, 0], results
    expected = torch.load(rank0_copy(reference) / "models/resume.pt", weights_only=True)

    copies = [copy_project(prepared, tmp_path / f"node{i}") for i in range(2)]
    killed = two_nodes(copies, {"RESNET_TL_TEST_KILL_AT": "2:2", "PYTHONPATH": str(HOOKS)})
    assert all(code != 0 for code, _ in killed)
    holders = [c for c in copies if (c / "models/resume.pt").exists()]
    assert len(holders) == 1  # only rank 0 wrote, on its own node's disk

    resumed = two_nodes(copies)
    assert [code for code, _ in resumed] == [0, 0], resumed
    assert any("every rank resumes from epoch 1" in out for _, out in resumed), resumed
    final = torch.load(rank0_copy(copies) / "models/resume.pt", weights_only=True)
    for key in expected["model"]:
        assert torch.equal(final["model"][key], expected["model"][key]), key
    def numbers(history):  # all but the clock
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]
    assert numbers(final["history"]) == numbers(expected["history"])

    # Each rank scored half of val; together exactly what one process measures for the same weights.
    where = rank0_copy(copies)
    loss, accuracy = single_process_val(where)
    metrics = json.loads((where / "metrics/train.json").read_text())
    assert accuracy == metrics["best_val_acc"] and loss == pytest.approx(metrics["best_val_loss"], rel=1e-6)
