"""The inference path's speed-ups change nothing in the answers."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from src.core.device import Normalizer, RawPixels, RunSettings
from src.data.loaders import ImageFiles, decoded_batches
from src.inference.classify import forward, prepare_for_inference
from src.inference.rewrites import (
    BitsReLU,
    Fp32Head,
    MeanPaddedPixelConv,
    NormalizedInputConv,
    fold_normalization,
    fold_normalization_for_uint8,
    use_fp32_head,
)
from src.networks.factory import build_model

MEAN_STD = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
CPU = torch.device("cpu")


def as_given(model):
    """The model run as it is: fp32, NCHW, normalised input."""
    plain = RunSettings(CPU, None, False, Normalizer(**MEAN_STD, device=CPU))
    return lambda images: forward(model.eval(), images, plain)


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
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    folded, run = prepare_for_inference(model, CPU, 32, MEAN_STD, precision="fp32")
    assert run.amp_dtype is None and not run.channels_last and isinstance(run.pixels, RawPixels)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    # For a model about to be compiled, Normalize stays a separate step (inductor fuses it itself).
    for_compile, compile_run = prepare_for_inference(model, CPU, 32, MEAN_STD, precision="fp32", fold_input=False)
    assert not isinstance(compile_run.pixels, RawPixels)
    with torch.inference_mode():
        want = as_given(model)(images)
        assert torch.allclose(forward(folded, images, run), want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(forward(for_compile, images, compile_run), want, atol=1e-4, rtol=1e-4)


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
    same, _ = prepare_for_inference(model, CPU, 16, MEAN_STD, precision="fp32")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(same(x), model(x))


def test_bits_relu_gives_torch_relus_values_nan_and_inf_included():
    special = torch.tensor([1.5, -2.0, 0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                            1e-40, -1e-40, 3e38, -3e38, 2.0 ** -126, -(2.0 ** -126)])
    for x in (special.bfloat16(), torch.randn(4, 8, 5, 5).bfloat16(), torch.randn(100)):
        want = torch.relu(x)
        for inplace in (False, True):
            given = x.clone()
            got = BitsReLU(inplace)(given)
            assert got.dtype == x.dtype and torch.equal(got.isnan(), want.isnan())
            assert torch.equal(got[~want.isnan()], want[~want.isnan()])
            assert (got.data_ptr() == given.data_ptr()) == inplace  # in place only when asked, as nn.ReLU
            if not inplace:
                assert torch.equal(given.isnan(), x.isnan()) and torch.equal(given[~x.isnan()], x[~x.isnan()])


def test_bf16_inference_on_cpu_swaps_relus_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    fast, run = prepare_for_inference(model, CPU, 64, MEAN_STD, precision="bf16")
    plain, _ = prepare_for_inference(model, CPU, 64, MEAN_STD, precision="fp32")
    assert run.amp_dtype == torch.bfloat16
    assert any(isinstance(m, BitsReLU) for m in fast.modules())
    assert not any(type(m) is nn.ReLU for m in fast.modules())
    assert not any(isinstance(m, BitsReLU) for m in (*model.modules(), *plain.modules()))  # the caller's: untouched
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        got = forward(fast, images, run)
        # The plain ReLUs' model in the same precision and memory format (channels_last only where
        # bf16 is native: oneDNN's NCHW and NHWC bf16 kernels round differently).
        layout = torch.channels_last if run.channels_last else torch.contiguous_format
        assert isinstance(fast.fc, Fp32Head) and use_fp32_head(plain)  # the head in fp32 in both
        want = forward(plain.to(memory_format=layout), images, run)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])  # first convs: 7x7 stride 2 pad 3; 3x3 stride 2 pad 1
def test_normalization_folded_into_the_first_conv_gives_the_same_logits_from_raw_pixels(arch, monkeypatch):
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    for size in (64, 37):  # 37: odd, the bottom and right edges differ from the top and left
        folded, run = prepare_for_inference(model, CPU, size, MEAN_STD, precision="fp32")
        assert run.pixels == RawPixels(torch.float32)  # raw pixel values in
        assert sum(isinstance(m, NormalizedInputConv) for m in folded.modules()) == 1
        with monkeypatch.context() as switch:  # the switch for bisecting: the model as it is
            switch.setenv("RESNET_TL_INFERENCE_REWRITES", "0")
            plain, plain_run = prepare_for_inference(model, CPU, size, MEAN_STD, precision="fp32")
        assert plain is model and isinstance(plain_run.pixels, Normalizer)
        for shape in ((size, size), (size + 9, size + 4)):  # the size folded for, and another
            images = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8)
            with torch.inference_mode():
                want, got = forward(plain, images, plain_run), forward(folded, images, run)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_uint8_input_conv_pads_with_the_mean_pixel_and_gives_the_normalised_logits(arch):
    """The int8 export's source graph (`src.shipping.onnx_export.pixel_model`). With a mean of whole pixel
    levels its padding is exact, so it is the same function; ImageNet's mean is rounded."""
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    images = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8)
    for mean, atol in (((128 / 255, 64 / 255, 200 / 255), 1e-5), (MEAN_STD["mean"], 3e-3)):
        pixels_in = torch.fx.experimental.optimization.fuse(model)
        assert fold_normalization_for_uint8(pixels_in, mean, MEAN_STD["std"])
        (conv,) = [m for m in pixels_in.modules() if isinstance(m, MeanPaddedPixelConv)]
        assert conv.mean_pixel == [round(255 * m) for m in mean]
        with torch.inference_mode():
            want = forward(model, images, RunSettings(CPU, None, False, Normalizer(mean, MEAN_STD["std"], CPU)))
            got = pixels_in(images)
        assert torch.allclose(got, want, rtol=1e-4, atol=atol * want.abs().max().item())


def test_normalization_is_not_folded_where_the_input_feeds_more_than_a_plain_conv():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + x.mean((1, 2, 3))[:, None]

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    assert not fold_normalization(torch.fx.symbolic_trace(TwoUses()), mean, std, 8)
    reflecting = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    assert not fold_normalization(torch.fx.symbolic_trace(reflecting), mean, std, 8)
    assert not fold_normalization(nn.Sequential(nn.Conv2d(3, 4, 3)), mean, std, 8)  # not traced: left alone


def test_threaded_batches_hold_every_file_in_order_laid_out_for_channels_last(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 37), (37, 37), (80, 60), (37, 50), (64, 64), (45, 90), (37, 37)]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1], quality=90)
    (tmp_path / "broken.jpg").write_bytes(paths[0].read_bytes()[:300])
    paths.insert(3, tmp_path / "broken.jpg")
    files = ImageFiles(paths, 32)  # Resize to 37 px, then CenterCrop 32: some crop in place, some resize
    batches = list(decoded_batches(files, 3, threads=2))
    assert [len(images) for images, _ in batches] == [3, 3, 2]  # 8 files, batch 3: the last one smaller
    images = torch.cat([images for images, _ in batches])
    errors = [e for _, batch_errors in batches for e in batch_errors]
    assert images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
    assert [bool(e) for e in errors] == [False] * 3 + [True] + [False] * 4
    for i, (image, error) in enumerate(files[k] for k in range(len(files))):
        assert torch.equal(images[i], image) and errors[i] == error  # the same as one at a time


def test_importing_the_project_shortens_openmp_spinning_unless_set():
    root = Path(__file__).resolve().parents[1]
    code = "import os, src, torch; print(os.environ['GOMP_SPINCOUNT'])"
    for preset, want in ((None, "10000"), ("123", "123")):
        env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
        if preset:
            env["GOMP_SPINCOUNT"] = preset
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split() == [want]


def test_compile_auto_only_for_big_folders_on_cpu():
    from src.inference.classify import COMPILE_MIN_FILES, compiled
    model, cpu, cuda = nn.Linear(2, 2), torch.device("cpu"), torch.device("cuda")
    assert compiled(model, "auto", COMPILE_MIN_FILES - 1, cpu) is None
    assert compiled(model, "auto", COMPILE_MIN_FILES, cpu) is not None  # wrapped; compiles at the first call
    assert compiled(model, "auto", 10 * COMPILE_MIN_FILES, cuda) is None  # decoding limits a GPU
    assert compiled(model, True, 1, cpu) is not None and compiled(model, False, 10 ** 6, cpu) is None
