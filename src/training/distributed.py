"""torchrun: joining the process group, and keeping the ranks' buffers, RNG states and weights
in step."""
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as torch_dist

from src.core.errors import UserError
from src.core.process import cpu_count


def check_ranks_agree(model):
    """Every rank must end with the same weights; a parameter DDP did not sync would drift apart."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    totals = [torch.zeros_like(total) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(totals, total)
    if not all(torch.allclose(t, totals[0], rtol=1e-9, atol=0.0) for t in totals):
        raise UserError(f"distributed training went out of sync: the ranks' weights sum to "
                        f"{[t.item() for t in totals]}; please report this with your params.yaml")


def sync_buffers(model):
    """BatchNorm running stats from rank 0 to all: DDP syncs weights, each rank's buffers drift."""
    if torch_dist.is_initialized():
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, 0)


def collective_device():
    """NCCL moves CUDA tensors only; gloo CPU ones."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_shards(part, total, dist):
    """The whole result, in order, on every rank, from each rank's strided share (rank::world_size)."""
    device = collective_device()
    rows = math.ceil(total / dist.world_size)
    padded = torch.zeros((rows, *part.shape[1:]), dtype=part.dtype, device=device)
    padded[:len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, padded)
    whole = torch.empty((total, *part.shape[1:]), dtype=part.dtype)
    for rank, share in enumerate(parts):
        whole[rank::dist.world_size] = share[:len(range(rank, total, dist.world_size))].cpu()
    return whole


def any_rank(flag):
    """True on every rank if `flag` is true on any."""
    value = torch.tensor([int(flag)], device=collective_device())
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item())


def rank0_values(*values):
    """Rank 0's numbers on every rank (e.g. its clock, so every rank plans the same epochs)."""
    if not torch_dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    torch_dist.broadcast(tensor, 0)
    return tuple(tensor.tolist())


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
