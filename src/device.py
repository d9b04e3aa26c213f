"""Where and in which precision to run: cuda, then mps, then cpu; bf16 where it pays."""
import contextlib
import ctypes
import os
import platform
import sys
from typing import NamedTuple

import torch

from src.common import UserError


def pick_device(choice="auto", param="train.device"):
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{param}=cuda but no CUDA GPU is visible; use auto or cpu")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{param}=mps but MPS is not available; use auto or cpu")
    return torch.device(choice)


# Set to 0 to treat this CPU as one without native bf16 (1: as one with it). torch's own check
# reads the CPU's flags, so emulating an AVX2-only machine on a newer one takes this as well as
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (`make test-avx2`).
NATIVE_BF16_ENV = "RESNET_TL_NATIVE_BF16"


def cpu_has_bf16():
    """AVX512-BF16 or AMX: bf16 matmuls run natively, and bf16 pays on this CPU."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UserError(f"{NATIVE_BF16_ENV}={forced!r} is not allowed; use 0, 1 or leave it unset")
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


# Below 32 px a ResNet's stride-2 convs meet 1x1 feature maps, and oneDNN's bf16 kernels
# (torch 2.14.1, CPU) then return NaN gradients now and then (seen at 16 px). Up to 32 px
# bf16 and channels_last also don't pay on CPU (resnet18, batch 64, 2 cores: fp32 456 img/s,
# bf16 434); from 64 px they do (fp32 189, bf16 + channels_last 279).
CPU_FAST_PATH_MIN_SIZE = 64


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
        # On CPU it pays with bf16 only (fp32 at 64 px: 171 img/s channels_last vs 189 NCHW).
        return device.type == "cuda" or (device.type == "cpu" and image_size >= CPU_FAST_PATH_MIN_SIZE
                                         and cpu_has_bf16())
    return bool(choice)


def cpu_count():
    """CPUs this process may use (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Dist(NamedTuple):
    """Where this process stands under torchrun; rank 0 of 1 when run plainly."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); returns (Dist, this rank's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), device
    dist = Dist(int(os.environ["RANK"]), world_size, int(os.environ["LOCAL_RANK"]),
                int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
        backend = "nccl"
    elif device.type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 per process; share the machine's cores instead.
        torch.set_num_threads(max(1, cpu_count() // dist.local_world_size))
        backend = "gloo"
    else:
        raise UserError(f"train.device={device.type} cannot train under torchrun; use cuda or cpu")
    torch.distributed.init_process_group(backend)
    return dist, device


def configure(device, deterministic):
    """Backend switches: cuDNN autotuning (fast) unless bitwise repeatable runs are asked for."""
    if deterministic:
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        # TF32 matmuls on Ampere+ for the fp32 parts (loss, optimizer): ~free speed.
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic


def keep_freed_memory():
    """Let this process reuse the memory it frees instead of handing it back to the kernel.

    glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, so each
    batch's activations (resnet18, batch 64, 224 px: 100 MB for the first layer alone) come
    as new pages the kernel faults in and zeroes, every pass. Kept in the heap they are
    reused: inference went from 4.5 to 3.2 ms per image on 2 cores. The price is that the
    process keeps its peak memory until it exits, as a pipeline stage does anyway.
    Returns whether it applied (glibc only; elsewhere nothing changes).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
