"""DataLoaders and the one rule for how many processes decode images."""
from torch.utils.data import DataLoader

from src.core.process import cpu_count


def default_workers(processes_per_machine=1):
    """Decoding processes: the cores left after the training process(es), at most 16 each
    (a fast GPU trains resnet50 at 224 px faster than 8 processes augment)."""
    return min(16, max(1, cpu_count() // processes_per_machine - 1))


def make_loader(dataset, batch_size, shuffle=False, workers=0, pin_memory=False, sampler=None, generator=None,
                drop_last=False, persistent=True):
    # Persistent workers skip re-forking (and re-copying a cached dataset) every epoch;
    # 4 batches in flight per worker hide decoding jitter behind the training step.
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=generator, drop_last=drop_last,
    )


def loader_workers(choice, cached, device, processes_per_machine=1):
    """Decoding/augmenting processes. With cached images and a CPU model, none: the model's
    threads use every core, and a worker would only steal one. A GPU leaves the CPU idle, so
    workers augment there even from the cache (one process can't augment as fast as a GPU trains)."""
    if choice != "auto":
        return choice
    return 0 if cached and device.type == "cpu" else default_workers(processes_per_machine)
