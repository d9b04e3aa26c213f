"""`model.pretrained` (none | imagenet | a file), head replacement, freezing and preprocessing."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision
from test_model import randomize_bn

from src.core.errors import UserError
from src.core.params import load_params
from src.networks.checkpoint import save_checkpoint
from src.networks.pretrained import arch_as_trained, normalization
from src.networks.transfer import create_model, set_transfer_phase
from src.training.trainer import make_optimizer

from conftest import REPO, env

IMAGENET_RESNET18 = "resnet18-f37072fd.pth"  # the file name in torchvision's URL for resnet18's weights
# Any download goes through this proxy, a port nobody listens on: "offline", even on a machine with internet.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def params_for(arch="resnet18", pretrained="none", transfer="finetune", head_epochs=0, freeze_bn=True):
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["arch"] = arch
    params["model"] = {"pretrained": str(pretrained), "transfer": transfer, "head_epochs": head_epochs,
                       "freeze_bn": freeze_bn}
    return params


def torchvision_file(path, arch="resnet18"):
    """A torchvision-format ImageNet state dict (1000 classes), as torchvision's own model saves it."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    randomize_bn(model, seed=5)
    state = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def assert_backbone_from(model, state, head):
    ours = model.state_dict()
    backbone = [k for k in state if not k.startswith(head + ".")]
    assert len(backbone) > 50 and all(torch.equal(ours[k], state[k]) for k in backbone)


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("efficientnet_b0", "classifier.1")])
def test_torchvision_file_with_1000_classes_gives_backbone_and_new_10_way_head(tmp_path, arch, head):
    state = torchvision_file(tmp_path / "weights.pth", arch)
    model = create_model(params_for(arch, tmp_path / "weights.pth"), 10)
    assert_backbone_from(model, state, head)
    layer = dict(model.named_modules())[head]
    assert layer.out_features == 10 and state[head + ".weight"].shape[0] == 1000
    assert all(p.requires_grad for p in model.parameters())  # finetune: everything trains


def test_own_checkpoint_as_pretrained_brings_weights_and_preprocessing(tmp_path):
    source = create_model(params_for(), 10)
    randomize_bn(source, seed=6)
    ckpt = tmp_path / "models" / "model.pt"
    save_checkpoint(ckpt, {"arch": "resnet18", "num_classes": 10, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                           "model": source.state_dict()})
    params = params_for(pretrained=ckpt)
    same_classes = create_model(params, 10)  # the head fits: it is loaded too
    assert all(torch.equal(a, b) for a, b in zip(same_classes.state_dict().values(), source.state_dict().values()))
    other_classes = create_model(params, 3)
    assert_backbone_from(other_classes, source.state_dict(), "fc")
    assert other_classes.fc.out_features == 3
    assert normalization(params) == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}


def test_preprocessing_is_that_of_the_archs_weights():
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert normalization(params_for("resnet50", "imagenet")) == imagenet
    assert normalization(params_for("efficientnet_v2_l", "imagenet")) == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_weights_of_another_arch_or_a_missing_file_fail_with_one_line_naming_the_arch_to_use(tmp_path):
    torchvision_file(tmp_path / "r18.pth")
    with pytest.raises(UserError) as e:
        create_model(params_for("resnet34", tmp_path / "r18.pth"), 10)
    assert "\n" not in str(e.value) and "r18.pth does not fit ResNet" in str(e.value)
    assert "missing from the file" in str(e.value)
    with pytest.raises(UserError, match="no such file; use none, imagenet or the path"):
        create_model(params_for(pretrained=tmp_path / "nope.pth"), 10)
    ours = tmp_path / "model.pt"  # one of ours names its arch: the error says which to set
    save_checkpoint(ours, {"arch": "resnet18d", "num_classes": 5, "model": create_model(params_for("resnet18d"), 5)
                           .state_dict()})
    with pytest.raises(UserError, match=r"^\S+model.pt is a resnet18d checkpoint and arch=resnet18: fine-tune it "
                                        r"as trained, with arch=resnet18d \(dvc exp run -S arch=resnet18d\)$"):
        create_model(params_for(pretrained=ours), 10)


def test_a_recipes_arch_gives_way_to_the_arch_our_checkpoint_was_trained_as(tmp_path):
    ours = tmp_path / "model.pt"
    save_checkpoint(ours, {"arch": "resnet18_w32", "num_classes": 5,
                           "model": create_model(params_for("resnet18_w32"), 5).state_dict()})
    from_recipe = arch_as_trained(params_for("resnet18", ours), {"arch": "resnet18"})  # arch: null, filled
    assert from_recipe[0]["arch"] == from_recipe[1]["arch"] == "resnet18_w32"  # trained and recorded as such
    assert create_model(from_recipe[0], 3).fc.in_features == 256
    set_by_user = arch_as_trained(params_for("resnet18", ours), {})
    assert set_by_user[0]["arch"] == "resnet18"  # -S arch=resnet18 stays, and read_weights names the fix
    torchvision_file(tmp_path / "r18.pth")  # a file that names no arch: the recipe's stays
    assert arch_as_trained(params_for("resnet18", tmp_path / "r18.pth"), {"arch": "resnet18"})[0]["arch"] == "resnet18"


class CreatesFile:
    """Unpickling this calls open(path, 'w'): a payload that creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    # The payload works: unpickled the unsafe way, it creates its file.
    pickle.loads(pickle.dumps(CreatesFile(tmp_path / "pwned-control")))
    assert (tmp_path / "pwned-control").exists()

    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": CreatesFile(tmp_path / "pwned")}, evil)
    with pytest.raises(UserError, match="refused with weights_only=True"):
        create_model(params_for(pretrained=evil), 10)
    with pytest.raises(UserError, match="refused with weights_only=True") as e:
        normalization(params_for(pretrained=evil))
    assert not (tmp_path / "pwned").exists()
    # one line naming what to give instead, and none of torch's advice to load it unsafely
    assert str(e.value).endswith("give a torchvision state dict (.pth) or a models/model.pt")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value) and "safe_globals" not in str(e.value)


def test_imagenet_offline_with_empty_cache_fails_fast_with_one_line(tmp_path):
    code = ("from src.core.process import run_stage; from src.networks.transfer import create_model; "
            "from src.core.params import load_params; p = load_params(); p['model']['pretrained'] = 'imagenet'; "
            "p['model']['transfer'] = 'finetune'; run_stage(lambda: create_model(p, 10))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(env(), TORCH_HOME=str(tmp_path), **OFFLINE))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    cache = tmp_path / "hub" / "checkpoints"
    assert IMAGENET_RESNET18 in errors[0] and str(cache) in errors[0], errors[0]
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth" in errors[0]
    assert "copy it to" in errors[0]
    assert not any(cache.iterdir())  # no partial download left behind


def test_imagenet_file_placed_in_torch_home_loads_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    state = torchvision_file(tmp_path / "hub" / "checkpoints" / IMAGENET_RESNET18)
    model = create_model(params_for(pretrained="imagenet"), 10)
    assert_backbone_from(model, state, "fc")
    assert model.fc.out_features == 10


def one_step(model, params):
    """One real optimizer step (train.make_optimizer) on a random batch; what it changed."""
    torch.manual_seed(1)
    optimizer = make_optimizer(model, params["train"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return optimizer, {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_trains_the_head_only(freeze_bn):
    params = params_for(transfer="freeze", freeze_bn=freeze_bn)
    model = create_model(params, 3)
    _, changed = one_step(model, params)
    assert {"fc.weight", "fc.bias"} <= changed
    bn_stats = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed - bn_stats == {"fc.weight", "fc.bias"}  # no backbone weight moved
    assert (not bn_stats) if freeze_bn else ("bn1.running_mean" in bn_stats)


def test_head_first_unfreezes_the_backbone_after_head_epochs():
    params = params_for(transfer="head_first", head_epochs=2)
    model = create_model(params, 3)
    for epoch in (1, 2):
        set_transfer_phase(model, params["model"], epoch)
        optimizer, changed = one_step(model, params)
        assert {k for k in changed if "running" not in k and "batches" not in k} == {"fc.weight", "fc.bias"}
    set_transfer_phase(model, params["model"], 3)
    assert all(p.requires_grad for p in model.parameters())
    # The optimizer made while frozen already holds the backbone: it now trains too.
    before = model.conv1.weight.clone()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.conv1.weight)
    assert model.bn1.training  # BatchNorm no longer held in eval mode
