"""Running a trained model: rebuild it from its checkpoint and push images through it.

`classify_files` is the one path from image files to logits that evaluate, predict, training's
validation and the benchmark share: decoding in DataLoader workers (or threads on 2 CPUs),
batched, BatchNorm folded into the convs, inference_mode, bf16 and channels_last where the
hardware gains from them, on a CPU Normalize folded into the first conv and bf16 ReLUs on the
bits (`src.inference.rewrites`), and a bad file never stops the others.
"""
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from src.common import first_line
from src.data.loaders import default_workers
from src.data.transforms import center_crop, eval_crop, resize_size
from src.core.device import Normalizer, RawPixels, RunSettings, pick_precision, use_channels_last
from src.inference.rewrites import fold_normalization, use_bits_relus
from src.images import image_problem, open_rgb, plain_jpeg_pixels
from src.core.process import cpu_count, inference_rewrites


def prepare_for_inference(model, device, image_size, mean_std, precision="auto"):
    """(model, RunSettings) for the fastest inference the hardware allows: eval mode, each
    BatchNorm folded into the conv before it (the same function, one op and one pass over the
    activations fewer per layer), bf16 and channels_last where they pay, on a CPU in bf16 ReLUs
    that work on the bits (`BitsReLU`), and on a CPU Normalize folded into the first conv, so
    batches go in as raw pixel values. `mean_std` is {"mean": ..., "std": ...}.
    The rewrites (`src.inference.rewrites`) are off with RESNET_TL_INFERENCE_REWRITES=0."""
    model = model.eval()
    rewrites = inference_rewrites()
    if rewrites:
        try:
            # A new module tree (the traced graph's own); the caller's model keeps its BatchNorm
            # layers, so deep-copying it first (what inplace=False adds) would only cost time.
            model = fuse(model, inplace=True)
        except Exception:  # a network torch.fx can't trace (data-dependent control flow) runs unfolded
            pass
    amp_dtype = pick_precision(precision, device, image_size)
    on_graph = rewrites and device.type == "cpu" and isinstance(model, torch.fx.GraphModule)
    if on_graph and amp_dtype == torch.bfloat16:
        use_bits_relus(model)
    channels_last = use_channels_last("auto", device, image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pixels = Normalizer(mean_std["mean"], mean_std["std"], device)
    # On a CPU the normalising pass is a few percent of a small model's time; folded into the
    # first conv it is gone. (A GPU does it in no time, and decoding limits it anyway.)
    if on_graph and fold_normalization(model, mean_std["mean"], mean_std["std"], image_size):
        pixels = RawPixels(amp_dtype or torch.float32)
    return model, RunSettings(device, amp_dtype, channels_last, pixels)


COMPILE_MIN_FILES = 30_000


def compiled(model, choice, n_files, device):
    """The model under torch.compile when asked, else None. auto: on CPU from 30,000 files, which
    repay the seconds of compiling (benchmarks/README.md); never on a GPU, where decoding, not
    the model, limits prediction. Freezing makes the weights constants that inductor folds and
    pre-packs (inference only)."""
    if choice is False or (choice == "auto" and (device.type != "cpu" or n_files < COMPILE_MIN_FILES)):
        return None
    return torch.compile(model, dynamic=False, options={"freezing": True})


def forward(model, images, run):
    """fp32 logits of one batch, run as `run` (a RunSettings) says."""
    with run.autocast():
        return model(run.input(images)).float()


def why_unreadable(path, error):
    if not path.exists():
        return "no such file, folder or glob match"
    return image_problem(path) or f"cannot use image ({type(error).__name__}: {error})"


class ImageFiles(Dataset):
    """(uint8 CHW image, "") per file, resized and center-cropped as eval_transform does, or
    (blank image, reason) for a file that can't be read, so one bad file never stops a loader.

    Normalisation happens later, once per batch (on a CPU, in the model's first conv): uint8
    crosses from the workers at a quarter of float32's size, and one vectorised op beats a
    Normalize per image.
    """

    def __init__(self, paths, image_size, keep=False):
        self.paths = [Path(p) for p in paths]
        self.size, self.min_side = image_size, resize_size(image_size)
        self.resize_crop = eval_crop(image_size, to_tensor=False)
        self.blank = np.zeros((image_size, image_size, 3), np.uint8)
        # keep=True: each crop is kept after its first decoding (training validates every epoch).
        self.kept = [None] * len(self.paths) if keep else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        pixels, error = self.pixels(i)
        return torch.from_numpy(pixels).permute(2, 0, 1), error

    def pixels(self, i):
        """(H x W x 3 uint8 array, "") or (blank, reason): the item, as decoded, without torch."""
        if self.kept is None:
            return self.decode(i)
        if self.kept[i] is None:
            pixels, error = self.decode(i)
            self.kept[i] = (np.ascontiguousarray(pixels), error)
        return self.kept[i]

    def decode(self, i):
        try:
            path = self.paths[i]
            pixels = plain_jpeg_pixels(path, min_side=self.min_side)
            if pixels is None:  # not a plain JPEG: Pillow decodes it
                return np.array(self.resize_crop(open_rgb(path, min_side=self.min_side))), ""
            if min(pixels.shape[:2]) == self.min_side:  # Resize would leave it as it is: crop in place
                return center_crop(pixels, self.size), ""
            return np.array(self.resize_crop(Image.fromarray(pixels))), ""
        except Exception as e:  # Pillow raises many kinds for broken files
            return self.blank, why_unreadable(self.paths[i], e)


def inference_workers(choice, n_files, batch_size):
    """Decoding processes: none for a single batch (starting one costs more than it saves), and
    none on 2 CPUs, where a process only steals a core from the model's threads and copies
    every batch between processes; there threads decode each batch (`decoded_batches`)."""
    if choice != "auto":
        return choice
    return default_workers() if n_files > batch_size and cpu_count() > 2 else 0


def batch_bounds(n, batch_size):
    """(start, stop) of each batch. A lone last image joins the batch before it: on a CPU a batch
    of one takes another kernel path, and an image's logits should not depend on where the batch
    boundaries fall (training's validation and evaluate then agree image for image)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def decoded_batches(files, batch_size, threads):
    """(images, errors) per batch of an ImageFiles, each batch decoded by `threads` threads at once.

    The decoders release the GIL, so the threads run in parallel. Decoding while the model runs
    (one batch ahead) was slower on 2 CPUs: the model's threads keep both cores busy, and a
    decoder that preempts one of them stalls the other at its next sync. Each thread takes the next
    image still to do (so none idles while the other has a run of big files) and copies it
    into the batch while it is still in its cache, as N x H x W x C: the layout channels_last
    wants.
    """
    with ThreadPoolExecutor(threads) as pool:
        for start, stop in batch_bounds(len(files), batch_size):
            n = stop - start
            batch, errors = np.empty((n, files.size, files.size, 3), np.uint8), [""] * n
            todo, lock = iter(range(n)), threading.Lock()

            def fill():
                while True:
                    with lock:
                        k = next(todo, None)
                    if k is None:
                        return
                    batch[k], errors[k] = files.pixels(start + k)

            for done in [pool.submit(fill) for _ in range(threads)]:
                done.result()
            yield torch.from_numpy(batch).permute(0, 3, 1, 2), errors


def image_batches(files, batch_size, workers="auto", device=torch.device("cpu"), desc="classify"):
    """(uint8 N x C x H x W images, errors) per batch of an ImageFiles, decoded by threads or
    worker processes (`inference_workers`), with a progress bar on a terminal."""
    workers = inference_workers(workers, len(files), batch_size)
    if workers == 0:
        batches = decoded_batches(files, batch_size, cpu_count())
    else:
        batches = DataLoader(files, batch_sampler=[range(a, b) for a, b in batch_bounds(len(files), batch_size)],
                             num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4)
    # The bar shows only on a terminal (disable=None), so logs and CSVs stay clean.
    return tqdm(batches, total=len(batch_bounds(len(files), batch_size)), desc=desc, unit="batch", leave=False,
                disable=None)


@torch.inference_mode()
def classify_files(model, ckpt, paths, device, batch_size, precision="auto", workers="auto", use_compile=False,
                   desc="classify", tta=False):
    """fp32 logits (one row per file, in order) and per-file errors ("" when fine).

    tta=True: test-time augmentation, the mean of each image's logits and its mirror image's.

    `paths` is a list of files or an `ImageFiles`; `ckpt` gives image_size, mean, std and
    num_classes (a checkpoint, or training's `describe`).
    The rows of unreadable files hold the logits of a blank image: callers skip them.
    """
    size = ckpt["image_size"]
    model, run = prepare_for_inference(model, device, size, ckpt, precision)
    files = paths if isinstance(paths, ImageFiles) else ImageFiles(paths, size)
    fast = compiled(model, use_compile, len(files), device)
    all_logits, errors = [torch.empty(0, ckpt["num_classes"])], []
    for images, batch_errors in image_batches(files, batch_size, workers, device, desc):
        # The last, smaller batch runs uncompiled: a new shape would mean compiling again.
        if fast is not None and len(images) == batch_size:
            try:
                logits = forward(fast, images, run)
            except Exception as e:  # no C++ compiler, an unsupported op, ...: the eager model still works
                print(f"warning: torch.compile failed ({type(e).__name__}: {first_line(e, 120)}); "
                      f"continuing without it", file=sys.stderr)
                fast, logits = None, forward(model, images, run)
        else:
            logits = forward(model, images, run)
        if tta:
            logits = (logits.float() + forward(model, images.flip(-1), run).float()) / 2
        all_logits.append(logits.cpu())
        errors += batch_errors
    return torch.cat(all_logits), errors
