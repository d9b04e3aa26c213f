"""Training knobs: bf16 holds fp32's accuracy; optimizer groups and LR schedules do what params say."""
import math

import pytest
import torch

from src.core.device import cpu_has_bf16, pick_precision, use_channels_last
from src.core.errors import UserError
from src.data.manifest import read_manifest
from src.networks.checkpoint import load_trained_model
from src.networks.resnet import resnet18
from src.training.schedule import EpochPlan, make_scheduler
from src.training.trainer import make_optimizer

from conftest import REPO, env, python, run, set_params, tutorial_logits

CFG = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
       "decay_bn_and_bias": False, "scheduler": "cosine", "warmup_epochs": 1, "epochs": 4, "step_size": 2,
       "gamma": 0.1, "time_budget": 0}


def held_out_accuracy(project):
    """The trained model's fp32 accuracy on val + test (358 images: 1 point is 3.6 of them)."""
    model, ckpt = load_trained_model(project / "models/model.pt")
    rows = [r for r in read_manifest(project / "data/manifest.csv") if r["split"] != "train"]
    paths = [project / r["path"] for r in rows]
    labels = [ckpt["class_names"].index(r["label"]) for r in rows]
    logits = tutorial_logits(model, ckpt, paths)
    return (logits.argmax(1) == torch.tensor(labels)).float().mean().item()


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_learns_the_sample(digits_project):
    """bf16 in the layout it always gets on CPU (auto: channels_last with bf16), forced at 32 px
    (auto starts it at 64): finite gradients and fp32-class accuracy in 2 epochs. (At 16 px oneDNN's
    bf16 once gave NaN gradients; the side-by-side accuracy against fp32 is benchmarks' job.)"""
    project = digits_project
    set_params(project, {"data.image_size": 32, "train.precision": "bf16", "train.channels_last": True})
    out = run([python(), "-m", "src.train"], project).stdout
    assert "(bf16, channels_last" in out
    assert held_out_accuracy(project) > 0.9


def test_weight_decay_skips_batchnorm_and_bias_unless_asked():
    model = resnet18(num_classes=3)
    optimizer = make_optimizer(model, CFG)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])  # conv and fc weights
    assert any(p is model.fc.bias for p in no_decay["params"])
    assert any(p is model.bn1.weight for p in no_decay["params"])
    everything = make_optimizer(model, {**CFG, "optimizer": "adamw", "decay_bn_and_bias": True})
    assert isinstance(everything, torch.optim.AdamW)
    assert len(everything.param_groups[0]["params"]) == len(list(model.parameters()))


def lrs(cfg, steps_per_epoch=2):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["lr"])
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch, EpochPlan(cfg))
    seen = []
    for _ in range(cfg["epochs"] * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("capability, layout", [("avx2", "channels_last"), ("default", "contiguous")])
def test_fp32_convs_run_channels_last_on_an_avx2_only_cpu_and_nowhere_else(capability, layout):
    """ATen's dispatch level, set as `make test-avx2` sets it, in a fresh interpreter (torch reads it
    once, at import): without native bf16, training and inference from 64 px take channels_last on
    an AVX2-only CPU only (faster there; slower with AVX512)."""
    code = ("import torch; from src.core.device import use_channels_last as cl; cpu = torch.device('cpu'); "
            "print(torch.backends.cpu.get_cpu_capability(), cl('auto', cpu, 112), cl('auto', cpu, 32))")
    out = run([python(), "-c", code], cwd=REPO,
              env={**env(), "ATEN_CPU_CAPABILITY": capability, "RESNET_TL_NATIVE_BF16": "0"}).stdout.split()
    assert out == [capability.upper(), str(layout == "channels_last"), "False"]


def test_schedules():
    cosine = lrs(CFG)  # one warmup epoch (2 steps), then cosine over the other 6
    assert cosine[:2] == pytest.approx([0.05, 0.1])
    assert cosine[2] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    step = lrs({**CFG, "scheduler": "step", "warmup_epochs": 0})
    assert step == pytest.approx([0.1] * 4 + [0.01] * 4)
    assert lrs({**CFG, "scheduler": "none", "warmup_epochs": 0}) == pytest.approx([0.1] * 8)


def test_native_bf16_switch_overrides_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("RESNET_TL_NATIVE_BF16", "0")  # fp32; channels_last where the CPU is AVX2-only (test above)
    assert not cpu_has_bf16() and pick_precision("auto", cpu, 224) is None
    monkeypatch.setenv("RESNET_TL_NATIVE_BF16", "1")
    assert pick_precision("auto", cpu, 224) == torch.bfloat16 and use_channels_last("auto", cpu, 224)
    assert pick_precision("auto", cpu, 32) is None  # below 64 px bf16 doesn't pay on any CPU
    monkeypatch.setenv("RESNET_TL_NATIVE_BF16", "yes")
    with pytest.raises(UserError, match="RESNET_TL_NATIVE_BF16='yes' is not allowed; use 0, 1"):
        cpu_has_bf16()
