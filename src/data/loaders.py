"""Batches for torch: the training loader, and the image files that evaluation reads (uint8
crops as the eval transform makes them, decoded by threads or DataLoader processes as
`src.core.process.decoding_workers` rules)."""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from src.core.process import cpu_count, decoding_workers
from src.data.image_files import EvalPixels, batch_bounds, pixel_batches, progress
from src.data.images import PILLOW_BUDGET


def make_loader(dataset, batch_size, shuffle=False, workers=0, pin_memory=False, sampler=None, generator=None,
                drop_last=False, persistent=True):
    # Persistent workers skip re-forking (and re-copying a cached dataset) every epoch;
    # 4 batches in flight per worker hide decoding jitter behind the training step.
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=generator, drop_last=drop_last,
    )


class ImageFiles(EvalPixels, Dataset):
    """(uint8 CHW image tensor, "") per file, resized and center-cropped as eval_transform does, or
    (blank image, reason) for a file that can't be read, so one bad file never stops a loader
    (`src.data.image_files.EvalPixels`, as a torch Dataset).

    Normalisation happens later, once per batch (on a CPU, in the model's first conv): uint8
    crosses from the workers at a quarter of float32's size, and one vectorised op beats a
    Normalize per image.
    """

    def __init__(self, paths, image_size, budget=PILLOW_BUDGET, keep=False):
        super().__init__([Path(p) for p in paths], image_size, budget, keep)
        self.paths = self.sources

    def __getitem__(self, i):
        pixels, error = self.pixels(i)
        return torch.from_numpy(pixels).permute(2, 0, 1), error


def decoded_batches(files, batch_size, threads):
    """(uint8 N x C x H x W images, errors) per batch, decoded by threads (`src.data.image_files.pixel_batches`);
    permuted from N x H x W x C with no copy, the memory layout channels_last wants."""
    for batch, errors in pixel_batches(files, batch_size, threads):
        yield torch.from_numpy(batch).permute(0, 3, 1, 2), errors


def image_batches(files, batch_size, workers="auto", device=torch.device("cpu"), desc="classify"):
    """(uint8 N x C x H x W images, errors) per batch of an ImageFiles, decoded by threads or
    worker processes (`src.core.process.decoding_workers`), with a progress bar on a terminal."""
    workers = decoding_workers(workers, len(files), batch_size)
    if workers == 0:
        batches = decoded_batches(files, batch_size, cpu_count())
    else:
        batches = DataLoader(files, batch_sampler=[range(a, b) for a, b in batch_bounds(len(files), batch_size)],
                             num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4)
    return progress(batches, files, batch_size, desc)
