"""The inference path's speed-ups change nothing in the answers."""
import pytest
import torch
import torch.nn as nn

from src.inference import one_batch_ahead, prepare_for_inference
from src.networks import build_model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_folded_batchnorm_gives_the_same_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, 7)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    folded, amp_dtype, channels_last = prepare_for_inference(model, torch.device("cpu"), 32, precision="fp32")
    assert amp_dtype is None and not channels_last
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_network_fx_cannot_trace_runs_unfolded():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx can't trace it
                x = -x
            return self.bn(self.conv(x)).mean((2, 3))

    model = Branchy().eval()
    same, _, _ = prepare_for_inference(model, torch.device("cpu"), 16, precision="fp32")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(same(x), model(x))


def test_one_batch_ahead_keeps_order_and_raises_what_the_producer_raised():
    assert list(one_batch_ahead(iter(range(7)))) == list(range(7))
    assert list(one_batch_ahead([])) == []

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(one_batch_ahead(broken()))


def test_compile_auto_only_for_big_folders_on_cpu():
    from src.inference import COMPILE_MIN_FILES, compiled
    model, cpu, cuda = nn.Linear(2, 2), torch.device("cpu"), torch.device("cuda")
    assert compiled(model, "auto", COMPILE_MIN_FILES - 1, cpu) is None
    assert compiled(model, "auto", COMPILE_MIN_FILES, cpu) is not None  # wrapped; compiles at the first call
    assert compiled(model, "auto", 10 * COMPILE_MIN_FILES, cuda) is None  # decoding limits a GPU
    assert compiled(model, True, 1, cpu) is not None and compiled(model, False, 10 ** 6, cpu) is None
