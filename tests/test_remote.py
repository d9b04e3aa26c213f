"""Data and weights travel through a DVC remote: push, clone, pull, byte for byte."""
import pytest

from conftest import image_folder, make_project, run

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


def tracked_files(root):
    """{relative path: bytes} of the DVC-tracked data and weights."""
    files = [p for folder in ("data/raw",) for p in (root / folder).rglob("*") if p.is_file()]
    files += [root / "data/manifest.csv", root / "data/class_indices.json", root / "models/model.pt"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_push_clone_pull_gives_identical_data_and_weights(tmp_path):
    images = image_folder(tmp_path / "images", per_class=6)
    project = make_project(tmp_path / "project", {"data.source": str(images), "train.epochs": 1})
    run(["dvc", "repro", "train"], project)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", "trained, with a remote"], project)
    run(["dvc", "push"], project)
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models/model.pt").exists()  # git alone carries no data or weights
    run(["dvc", "pull", "--with-deps", "train"], clone)  # all a user runs `dvc pull` for, up to the weights

    original = tracked_files(project)
    assert len(original) > 10 and any(k.startswith("data/raw/") for k in original)
    assert tracked_files(clone) == original
    status = run(["dvc", "status", "--with-deps", "train"], clone).stdout
    assert "up to date" in status, status  # the pulled outputs match dvc.lock: nothing to rerun
