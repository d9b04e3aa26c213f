"""Where and in which precision to run: cuda, then mps, then cpu; bf16 where it pays."""
import contextlib

import torch

from src.common import UserError


def pick_device(choice="auto"):
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use auto or cpu")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available; use auto or cpu")
    return torch.device(choice)


def cpu_has_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run natively and a train step is ~2x faster."""
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


# Below this input size a ResNet's stride-2 convs meet 1x1 feature maps, and oneDNN's bf16
# kernels (torch 2.14.1, CPU) then return NaN gradients now and then: seen at 16 px, never at 32.
CPU_FAST_PATH_MIN_SIZE = 32


def pick_precision(choice, device, image_size):
    """The autocast dtype, or None for plain fp32."""
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16() and image_size >= CPU_FAST_PATH_MIN_SIZE:
            return torch.bfloat16
        return None
    if choice == "fp32":
        return None
    if choice == "fp16" and device.type == "cpu":
        raise UserError("train.precision=fp16 is for GPUs; on CPU use bf16, fp32 or auto")
    if choice == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print("warning: this CPU has no native bf16; train.precision=bf16 will be slow")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(choice, device, image_size):
    """channels_last speeds up convs on CUDA tensor cores, and oneDNN's CPU kernels by ~10%."""
    if choice == "auto":
        return device.type == "cuda" or (device.type == "cpu" and image_size >= CPU_FAST_PATH_MIN_SIZE)
    return bool(choice)
