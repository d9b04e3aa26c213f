"""Running a trained model: rebuild it from its checkpoint and push images through it.

`classify_files` is the one path from image files to logits that evaluate, predict, training's
validation and the benchmark share: decoding in DataLoader workers (or threads on 2 CPUs),
batched, BatchNorm folded into the convs, inference_mode, bf16 and channels_last where the
hardware gains from them, on a CPU Normalize folded into the first conv and bf16 ReLUs on the
bits (`src.fast_layers`), and a bad file never stops the others.
"""
import sys
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader, Dataset

from src.checkpoint import load_checkpoint
from src.common import first_line
from src.device import Normalizer, RawPixels, RunSettings, pick_precision, use_channels_last
from src.fast_layers import fold_normalization, use_bits_relus
from src.images import PILLOW_BUDGET
from src.networks import build_model
from src.pixels import EvalPixels, batch_bounds, decoding_processes, pixel_batches, progress
from src.runtime import cpu_count, inference_rewrites


def load_trained_model(path, device="cpu"):
    """(model in eval mode, checkpoint metadata) from one of this project's checkpoints."""
    ckpt = load_checkpoint(path)
    with torch.device("meta"):  # no random init of weights the checkpoint replaces (slow for big networks)
        model = build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"], assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer kept out of state_dicts
        model = build_model(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt


def prepare_for_inference(model, device, image_size, mean_std, precision="auto"):
    """(model, RunSettings) for the fastest inference the hardware allows: eval mode, each
    BatchNorm folded into the conv before it (the same function, one op and one pass over the
    activations fewer per layer), bf16 and channels_last where they pay, on a CPU in bf16 ReLUs
    that work on the bits (`BitsReLU`), and on a CPU Normalize folded into the first conv, so
    batches go in as raw pixel values. `mean_std` is {"mean": ..., "std": ...}.
    The rewrites (`src.fast_layers`) are off with RESNET_TL_INFERENCE_REWRITES=0."""
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


class ImageFiles(EvalPixels, Dataset):
    """(uint8 CHW image tensor, "") per file, resized and center-cropped as eval_transform does, or
    (blank image, reason) for a file that can't be read, so one bad file never stops a loader
    (`src.pixels.EvalPixels`, as a torch Dataset).

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
    """(uint8 N x C x H x W images, errors) per batch, decoded by threads (`src.pixels.pixel_batches`);
    permuted from N x H x W x C with no copy, the memory layout channels_last wants."""
    for batch, errors in pixel_batches(files, batch_size, threads):
        yield torch.from_numpy(batch).permute(0, 3, 1, 2), errors


def image_batches(files, batch_size, workers="auto", device=torch.device("cpu"), desc="classify"):
    """(uint8 N x C x H x W images, errors) per batch of an ImageFiles, decoded by threads or
    worker processes (`decoding_processes`), with a progress bar on a terminal."""
    workers = decoding_processes(workers, len(files), batch_size)
    if workers == 0:
        batches = decoded_batches(files, batch_size, cpu_count())
    else:
        batches = DataLoader(files, batch_sampler=[range(a, b) for a, b in batch_bounds(len(files), batch_size)],
                             num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4)
    return progress(batches, files, batch_size, desc)


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
