"""Other architectures and ImageNet transfer learning through real `dvc exp run`.

On a few tiny image files rather than the 1797 digits: a ResNeXt-50 epoch over the digits
takes minutes on 2 busy cores, and what is tested here is that the pipeline runs these
models end to end, not how well they learn.
"""
import json

import pytest
import torch
import torchvision
from test_pretrained import IMAGENET_RESNET18, OFFLINE

from conftest import env, image_folder, run

pytestmark = pytest.mark.slow  # trains through real dvc: `make test-fast` leaves it out


@pytest.fixture
def images(tmp_path):
    """3 classes x 10 distinct 16 px PNGs, each class its own tint."""
    return image_folder(tmp_path / "images", classes=3, per_class=10, size=16)


def test_resnext_and_efficientnet_run_as_experiments(project, images):
    for arch in ("resnext50_32x4d", "efficientnet_b0"):
        # To train: its validation scores val through evaluate's own path (BatchNorm folding, ...).
        run(["dvc", "exp", "run", "-S", f"arch={arch}", "-S", "train.epochs=1", "-S", f"data.source={images}",
             "-n", arch, "train"], project)
        train = json.loads((project / "metrics/train.json").read_text())
        assert train["epochs_run"] == 1 and 0 <= train["best_val_acc"] <= 1 and train["temperature"] > 0
        ckpt = torch.load(project / "models/model.pt", weights_only=True)
        assert ckpt["arch"] == arch and ckpt["num_classes"] == 3


def test_imagenet_pretrained_offline_fails_before_training_then_loads_from_torch_home(project, images, tmp_path):
    torch_home = tmp_path / "torch"
    offline = dict(env(), TORCH_HOME=str(torch_home), **OFFLINE)
    overrides = ["-S", f"data.source={images}", "-S", "model.pretrained=imagenet", "-S", "model.transfer=head_first",
                 "-S", "model.head_epochs=1"]

    failed = run(["dvc", "exp", "run", "train", *overrides], project, check=False, env=offline)
    assert failed.returncode != 0
    assert f"error: model.pretrained=imagenet: {IMAGENET_RESNET18} is not in {torch_home / 'hub' / 'checkpoints'}" \
        in failed.stderr + failed.stdout
    assert not (project / "models/model.pt").exists()  # nothing trained
    assert "epoch 1" not in failed.stdout

    torch.save(torchvision.models.resnet18(weights=None).state_dict(),
               torch_home / "hub" / "checkpoints" / IMAGENET_RESNET18)
    done = run(["dvc", "exp", "run", "train", *overrides], project, env=offline)
    assert f"with weights from {torch_home / 'hub' / 'checkpoints' / IMAGENET_RESNET18}; new 3-way head" in done.stdout
    assert json.loads((project / "metrics/train.json").read_text())["epochs_run"] == 2
