"""How this process runs on this machine: one door for the CPU tuning every stage shares.

- `before_torch()` (called by src/__init__.py, so before any stage or benchmark imports torch):
  OpenMP's idle threads spin less, so they don't take a core from threads that decode images
  between two batches. libgomp reads the setting once, when torch loads it.
- `run_stage(main)`: runs a stage; a UserError becomes one line and exit code 2.
- `start()` (the first call of every stage's and benchmark's main): freed memory is kept for
  reuse, and the environment switches below are checked, so a misspelt value fails at once.

Switches, for the person at the keyboard (environment variables, not params: they change
speed or how a numeric result is reached, never what the pipeline means):
- RESNET_TL_NATIVE_BF16=0|1: treat this CPU as one without (or with) native bf16. torch's own
  check reads the CPU flags, so emulating an AVX2-only machine on a newer one takes this as well
  as ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (`make test-avx2`).
- RESNET_TL_INFERENCE_REWRITES=0: evaluate, predict and training's validation run the model as
  it is, without the inference-only rewrites (BatchNorm folding, Normalize folded into the first
  conv, bits ReLU): for bisecting a numeric surprise.
"""
import ctypes
import os
import platform
import sys

from src.core.errors import UserError
from src.core.files import remove_stale_scratch

NATIVE_BF16 = "RESNET_TL_NATIVE_BF16"
INFERENCE_REWRITES = "RESNET_TL_INFERENCE_REWRITES"


def before_torch():
    """libgomp's default keeps each idle thread spinning for 300,000 rounds after every parallel
    op; 10,000 still span the gaps between one model's ops. A value you set yourself wins."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def start():
    """Process set-up every stage and benchmark does first."""
    native_bf16_override()
    inference_rewrites()
    keep_freed_memory()


def switch(name):
    """An environment switch: None when unset, else True for 1 and False for 0."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise UserError(f"{name}={value!r} is not allowed; use 0, 1 or leave it unset")
    return None if value == "" else value == "1"


def native_bf16_override():
    """RESNET_TL_NATIVE_BF16 as True/False, or None to let the CPU flags decide."""
    return switch(NATIVE_BF16)


def inference_rewrites():
    """Whether inference may rewrite the model (on unless RESNET_TL_INFERENCE_REWRITES=0)."""
    return switch(INFERENCE_REWRITES) is not False


def cpu_count():
    """CPUs this process may use (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decoding_workers(choice, images, batch_size, *, training=False, cached=False, on_cpu=True,
                     processes_per_machine=1):
    """How many processes decode images beside the model: `choice`, unless it is auto. The one
    rule for training's loader and for evaluation, prediction and serving:
    - training from images cached in memory on a CPU: none (the model's threads use every core,
      a worker would only steal one); on a GPU, which leaves the CPU idle, they augment;
    - inference: none for a single batch (starting one costs more than it saves) and none on
      2 CPUs, where a process would steal a core from the model's threads and copy every batch
      (threads decode between batches instead);
    - else the cores left after the model's process(es), at most 16 each (a fast GPU trains
      resnet50 at 224 px faster than 8 processes augment)."""
    if choice != "auto":
        return choice
    spare = min(16, max(1, cpu_count() // processes_per_machine - 1))
    if training:
        return 0 if cached and on_cpu else spare
    return spare if images > batch_size and cpu_count() > 2 else 0


def keep_freed_memory():
    """Let this process reuse the memory it frees instead of handing it back to the kernel.

    glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, so each batch's
    activations come back as new pages the kernel faults in and zeroes, every pass. Kept in the
    heap they are reused. The price is that the process keeps its peak memory until it exits,
    as a pipeline stage does anyway. Returns whether it applied (glibc only).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def run_stage(main):
    """Run a stage's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        remove_stale_scratch()
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
