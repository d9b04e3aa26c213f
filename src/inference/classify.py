"""Pushing image files through a trained model, as fast as the hardware allows.

`classify_files` is the one path from image files to logits that evaluate, predict, training's
validation and the benchmark share: decoding in DataLoader workers (or threads on 2 CPUs),
batched, BatchNorm folded into the convs, inference_mode, bf16 and channels_last where the
hardware gains from them, on a CPU Normalize folded into the first conv and bf16 ReLUs on the
bits (`src.inference.rewrites`), and a bad file never stops the others.
"""
import sys

import torch
from torch.fx.experimental.optimization import fuse

from src.core.device import Normalizer, RawPixels, RunSettings, pick_precision, use_channels_last
from src.core.errors import first_line
from src.core.process import inference_rewrites
from src.data.loaders import ImageFiles, image_batches
from src.inference.rewrites import fold_normalization, use_bits_relus, use_fp32_head


def prepare_for_inference(model, device, image_size, mean_std, *, precision="auto", precision_param="precision",
                          fold_input=True):
    """(model, RunSettings) for the fastest inference the hardware allows: eval mode, each
    BatchNorm folded into the conv before it (the same function, one op and one pass over the
    activations fewer per layer), bf16 and channels_last where they pay, on a CPU in bf16 ReLUs
    that work on the bits (`BitsReLU`), and on a CPU Normalize folded into the first conv, so
    batches go in as raw pixel values. `mean_std` is {"mean": ..., "std": ...}.
    fold_input=False keeps Normalize out of the first conv: for a model about to be compiled, where
    the folded conv's edge corrections doubled inductor's compile time and ran slower
    (benchmarks/README.md), while inductor fuses a separate Normalize on its own.
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
    amp_dtype = pick_precision(precision, device, image_size, precision_param)
    if amp_dtype is not None:
        use_fp32_head(model)
    on_graph = rewrites and device.type == "cpu" and isinstance(model, torch.fx.GraphModule)
    if on_graph and amp_dtype == torch.bfloat16:
        use_bits_relus(model)
    channels_last = use_channels_last("auto", device, image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pixels = Normalizer(mean_std["mean"], mean_std["std"], device)
    # On a CPU the normalising pass is a few percent of a small model's time; folded into the
    # first conv it is gone. (A GPU does it in no time, and decoding limits it anyway.)
    if on_graph and fold_input and fold_normalization(model, mean_std["mean"], mean_std["std"], image_size):
        pixels = RawPixels(amp_dtype or torch.float32)
    return model, RunSettings(device, amp_dtype, channels_last, pixels)


COMPILE_MIN_FILES = 30_000


def compiles(choice, n_files, device):
    """Whether to torch.compile: when asked; auto: on CPU from 30,000 files, which repay the
    seconds of compiling (benchmarks/README.md); never on a GPU, where decoding, not the model,
    limits prediction."""
    return choice is True or (choice == "auto" and device.type == "cpu" and n_files >= COMPILE_MIN_FILES)


def compiled(model, choice, n_files, device):
    """The model under torch.compile when `compiles`, else None. Freezing makes the weights
    constants that inductor folds and pre-packs (inference only)."""
    if not compiles(choice, n_files, device):
        return None
    return torch.compile(model, dynamic=False, options={"freezing": True})


def forward(model, images, run):
    """fp32 logits of one batch, run as `run` (a RunSettings) says."""
    with run.autocast():
        return model(run.input(images)).float()


@torch.inference_mode()
def classify_files(model, ckpt, paths, device, *, batch_size, precision="auto", precision_param="precision",
                   workers="auto", use_compile=False, desc="classify", tta=False):
    """fp32 logits (one row per file, in order) and per-file errors ("" when fine).

    tta=True: test-time augmentation, the mean of each image's logits and its mirror image's.

    `paths` is a list of files or an `ImageFiles`; `ckpt` gives image_size, mean, std and
    num_classes (a checkpoint, or training's `describe`); `precision_param` names the setting
    `precision` came from, for its messages (evaluate.precision, predict.precision).
    The rows of unreadable files hold the logits of a blank image: callers skip them.
    """
    size = ckpt["image_size"]
    files = paths if isinstance(paths, ImageFiles) else ImageFiles(paths, size)
    model, run = prepare_for_inference(model, device, size, ckpt, precision=precision, precision_param=precision_param,
                                       fold_input=not compiles(use_compile, len(files), device))
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
