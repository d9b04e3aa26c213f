"""Where and how tensors run: cuda, then mps, then cpu; bf16 and channels_last where they pay;
how a uint8 batch becomes the model's input.

`RunSettings` carries the per-run choices (device, autocast dtype, memory format, input scaling)
through training, validation, evaluation and prediction as one object.
"""
import contextlib
import math
import os
from typing import NamedTuple, Optional, Union

import torch

from src.core.errors import UserError
from src.core.gpus import pick_gpu
from src.core.process import native_bf16_override


def pick_device(choice="auto", param="train.device"):
    """auto: cuda (one GPU per process where there are several: `src.core.gpus`), then mps, then cpu."""
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", pick_gpu())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{param}=cuda but no CUDA GPU is visible; use auto or cpu")
    if choice == "cuda":
        return torch.device("cuda", pick_gpu())
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{param}=mps but MPS is not available; use auto or cpu")
    return torch.device(choice)


def cpu_has_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run natively, and bf16 pays on this CPU.
    RESNET_TL_NATIVE_BF16 overrides the CPU flags (`src.core.process`)."""
    forced = native_bf16_override()
    if forced is not None:
        return forced
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


# Below 32 px a ResNet's stride-2 convs meet 1x1 feature maps, and oneDNN's bf16 kernels then
# return NaN gradients now and then (seen at 16 px). Up to 32 px bf16 and channels_last also
# don't pay on CPU; from 64 px they do (benchmarks/README.md).
CPU_FAST_PATH_MIN_SIZE = 64


def pick_precision(choice, device, image_size, param="train.precision"):
    """The autocast dtype, or None for plain fp32. `param` names the setting in messages."""
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16() and image_size >= CPU_FAST_PATH_MIN_SIZE:
            return torch.bfloat16
        return None
    if choice == "fp32":
        return None
    if choice == "fp16" and device.type == "cpu":
        raise UserError(f"{param}=fp16 is for GPUs; on CPU use bf16, fp32 or auto")
    if choice == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print(f"warning: this CPU has no native bf16; {param}=bf16 will be slow")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def cpu_is_avx2_only():
    """An x86 CPU without AVX512, as torch dispatches its kernels (ATEN_CPU_CAPABILITY=avx2 emulates one)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def use_channels_last(choice, device, image_size):
    """channels_last speeds up convs on CUDA tensor cores, oneDNN's bf16 CPU kernels, and its fp32
    ones on AVX2-only CPUs; with AVX512 its fp32 convs are slower in it (benchmarks/README.md)."""
    if choice == "auto":
        return device.type == "cuda" or (device.type == "cpu" and image_size >= CPU_FAST_PATH_MIN_SIZE
                                         and (cpu_has_bf16() or cpu_is_avx2_only()))
    return bool(choice)


def pixel_normalization(mean, std, dtype=torch.float32):
    """ToTensor + Normalize(mean, std) of 0..255 pixel values as x * scale + shift per channel:
    (scale, shift) = (1 / (255 std), -mean / std), each shaped 1 x C x 1 x 1. The one place this
    arithmetic is written: the training batches, the folded first conv and the ONNX graph use it."""
    mean, std = (torch.tensor(v, dtype=dtype).view(1, -1, 1, 1) for v in (mean, std))
    return 1 / (255 * std), -mean / std


def mean_pixel(mean):
    """The 0..255 pixel whose normalised value is 0 (per channel, rounded)."""
    return [int(round(255 * m)) for m in mean]


class Normalizer:
    """ToTensor + Normalize(mean, std) for a whole uint8 batch, as one op: x * scale + shift."""

    def __init__(self, mean, std, device):
        self.scale, self.shift = (t.to(device) for t in pixel_normalization(mean, std))

    def __call__(self, images):
        if not images.is_contiguous(memory_format=torch.channels_last) or images.is_contiguous():
            return torch.addcmul(self.shift, images.float(), self.scale)  # two passes, not four
        # In memory a channels_last batch is N x H x W x C: per-channel constants along a last
        # dimension of 3 vectorise poorly, so the pixels are viewed 64 (or fewer) to a row and
        # the constants tiled to match (the same numbers, about twice as fast).
        n, c, h, w = images.shape
        per_row = math.gcd(h * w, 64)
        rows = images.permute(0, 2, 3, 1).reshape(-1, c * per_row)
        out = torch.addcmul(self.shift.view(c).repeat(per_row), rows, self.scale.view(c).repeat(per_row))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)


class RawPixels(NamedTuple):
    """The batch's 0..255 values as floats of `dtype` (exact in bf16), for a model that
    normalises in its own first conv (`src.inference.rewrites.fold_normalization`)."""
    dtype: torch.dtype = torch.float32

    def __call__(self, images):
        return images.to(self.dtype)


class RunSettings(NamedTuple):
    """Where and how one run's tensors go: device, autocast dtype (None: fp32), memory format,
    and how uint8 batches become the model's input (`Normalizer` or `RawPixels`)."""
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    pixels: Union[Normalizer, RawPixels]

    def input(self, images):
        """A loader's batch as the model takes it: on the device, in the memory format, scaled.
        A float batch (already normalised) passes unscaled."""
        images = images.to(self.device, non_blocking=True)
        # Converted while still uint8: a quarter of the bytes to move.
        images = images.contiguous(memory_format=torch.channels_last if self.channels_last
                                   else torch.contiguous_format)
        return self.pixels(images) if images.dtype == torch.uint8 else images

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def precision_name(self):
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]


def configure(device, deterministic):
    """Backend switches: cuDNN autotuning (fast) unless bitwise repeatable runs are asked for."""
    if deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the GPU picked for this process, also for code that says "cuda"
        torch.backends.cudnn.benchmark = not deterministic
        # TF32 matmuls on Ampere+ for the fp32 parts (loss, optimizer): ~free speed.
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
