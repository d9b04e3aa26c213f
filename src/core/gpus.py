"""One GPU per experiment on a machine with several: `dvc queue start -j 4` on a 4-GPU machine
puts its 4 experiments on 4 GPUs.

The rule, for device `auto` (and `cuda`) when CUDA shows several GPUs:
1. under torchrun, each process takes its LOCAL_RANK's GPU;
2. else the process claims a GPU nobody claims: the visible GPUs are tried from the most free
   memory down, and the first whose claim (an flock on a file named after the GPU's UUID, in
   $RESNET_TL_GPU_CLAIMS or the system's temp folder) it gets is its own until it exits;
3. with every GPU claimed (more workers than GPUs), the one with the most free memory.
CUDA_VISIBLE_DEVICES is respected: only the GPUs it names are seen and claimed, by UUID, so two
workers with different CUDA_VISIBLE_DEVICES orderings still never share a claimed GPU.
"""
import fcntl
import os
import tempfile
from pathlib import Path

_held = {}  # claim files this process holds open (closing one would release the GPU)


def claims_folder():
    return Path(os.environ.get("RESNET_TL_GPU_CLAIMS") or Path(tempfile.gettempdir()) / "resnet-tl-gpu-claims")


def claim(gpu_id, folder=None):
    """True if this process now holds `gpu_id` (or already did); the claim ends with the process."""
    if gpu_id in _held:
        return True
    folder = Path(folder or claims_folder())
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{gpu_id}.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    _held[gpu_id] = handle
    return True


def choose(gpus, local_rank=None, folder=None):
    """The index to use among `gpus`, a list of (uuid, free bytes) in CUDA's visible order."""
    if local_rank is not None:
        return local_rank
    if len(gpus) == 1:
        return 0
    by_free = sorted(range(len(gpus)), key=lambda i: -gpus[i][1])
    return next((i for i in by_free if claim(gpus[i][0], folder)), by_free[0])


def pick_gpu():
    """This process's CUDA device index by the rule above."""
    import torch

    count = torch.cuda.device_count()
    local_rank = os.environ.get("LOCAL_RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if count == 1 or local_rank is not None:
        return choose([None] * count, int(local_rank) if local_rank is not None else None)
    gpus = [(str(torch.cuda.get_device_properties(i).uuid), torch.cuda.mem_get_info(i)[0]) for i in range(count)]
    return choose(gpus)
