"""The model's input without torch: images (files, or bytes in memory) decoded, resized and
center-cropped exactly as the eval transform does it (torchvision's Resize + CenterCrop on PIL
images, which call PIL's resize and crop: the tests compare them pixel for pixel), and batched.

The served model (`src.shipping.serving`) and `predict --backend onnx|int8` run on this alone, so they
load neither torch nor torchvision; `src.data.loaders.ImageFiles` adds the torch Dataset on top.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from src.data.images import PILLOW_BUDGET, decode, plain_jpeg_pixels, why_not_decoded


def resize_size(image_size):
    """Eval-time resize before the center crop: 256 for 224, as ImageNet training used."""
    return int(round(image_size * 256 / 224))


def resized_shape(width, height, side):
    """(width, height) that torchvision's Resize(side) gives: the shorter side `side`, the longer
    one scaled and truncated, as its `_compute_resized_output_size`."""
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)
    return (side, new_long) if width <= height else (new_long, side)


def center_crop(pixels, size):
    """CenterCrop (torchvision's rounding) of an H x W x 3 uint8 array: a view, no copy."""
    height, width = pixels.shape[:2]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return pixels[top:top + size, left:left + size]


def eval_crop_pixels(picture, size, budget=PILLOW_BUDGET):
    """A decoded L or RGB picture, Resize(resize_size(size)) + CenterCrop(size)'d as the eval
    transform does it: a size x size x 3 uint8 array. A grey picture is resized as grey and its
    value copied into the three channels, which is what resizing its RGB conversion gives (the
    same filter on three equal channels) at a third of the work and memory. A picture whose
    aspect ratio would blow up in the resize (1 x 100,000 px to 256 x 25,600,000) is refused."""
    width, height = resized_shape(picture.width, picture.height, resize_size(size))
    budget.check(width, height, f"{picture.width} x {picture.height} px image resized to")
    if (width, height) != picture.size:  # torchvision leaves an image of the right size as it is
        picture = picture.resize((width, height), Image.BILINEAR)
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    pixels = np.array(picture.crop((left, top, left + size, top + size)))
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels


class EvalPixels:
    """(H x W x 3 uint8 crop, "") per image source (a path or bytes), as the eval transform makes
    it, or (blank image, reason) for one that can't be used, so one bad image never stops the
    others. Each source is decoded once: the reason comes from that decoding's error."""

    def __init__(self, sources, image_size, budget=PILLOW_BUDGET, keep=False):
        self.sources, self.budget = list(sources), budget
        self.size, self.min_side = image_size, resize_size(image_size)
        self.blank = np.zeros((image_size, image_size, 3), np.uint8)
        # keep=True: each crop is kept after its first decoding (training validates every epoch).
        self.kept = [None] * len(self.sources) if keep else None

    def __len__(self):
        return len(self.sources)

    def pixels(self, i):
        """(H x W x 3 uint8 array, "") or (blank, reason): the item, as decoded."""
        if self.kept is None:
            return self.decode(i)
        if self.kept[i] is None:
            pixels, error = self.decode(i)
            self.kept[i] = (np.ascontiguousarray(pixels), error)
        return self.kept[i]

    def decode(self, i):
        source = self.sources[i]
        try:
            pixels = plain_jpeg_pixels(source, self.min_side, self.budget)
            if pixels is None:  # not a plain JPEG: Pillow decodes it
                return eval_crop_pixels(decode(source, self.min_side, self.budget)[0], self.size, self.budget), ""
            if min(pixels.shape[:2]) == self.min_side:  # Resize would leave it as it is: crop in place
                return center_crop(pixels, self.size), ""
            return eval_crop_pixels(Image.fromarray(pixels), self.size, self.budget), ""
        except FileNotFoundError:
            return self.blank, "no such file, folder or glob match"
        except Exception as e:  # Pillow raises many kinds for broken files
            return self.blank, why_not_decoded(e)


def batch_bounds(n, batch_size):
    """(start, stop) of each batch. A lone last image joins the batch before it: on a CPU a batch
    of one takes another kernel path, and an image's logits should not depend on where the batch
    boundaries fall (training's validation and evaluate then agree image for image)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))


def pixel_batches(files, batch_size, threads):
    """(N x H x W x 3 uint8 images, errors) per batch of an EvalPixels, each batch decoded by
    `threads` threads at once.

    The decoders release the GIL, so the threads run in parallel. Decoding while the model runs
    (one batch ahead) was slower on 2 CPUs: the model's threads keep both cores busy, and a
    decoder that preempts one of them stalls the other at its next sync. Each thread takes the next
    image still to do (so none idles while the other has a run of big files) and copies it
    into the batch while it is still in its cache, as N x H x W x C: the layout channels_last
    and the ONNX model want.
    """
    with ThreadPoolExecutor(threads) as pool:
        for start, stop in batch_bounds(len(files), batch_size):
            n = stop - start
            batch, errors = np.empty((n, files.size, files.size, 3), np.uint8), [""] * n
            todo, lock = iter(range(start, stop)), threading.Lock()
            for done in [pool.submit(fill, files, todo, lock, batch, errors, start) for _ in range(min(threads, n))]:
                done.result()
            yield batch, errors


def fill(files, todo, lock, batch, errors, start):
    """One decoding thread: take the next image still to do, put it at its place in the batch."""
    while True:
        with lock:
            i = next(todo, None)
        if i is None:
            return
        batch[i - start], errors[i - start] = files.pixels(i)


def progress(batches, files, batch_size, desc):
    """`batches` with a progress bar, shown only on a terminal (disable=None), so logs and CSVs stay clean."""
    from tqdm import tqdm
    return tqdm(batches, total=len(batch_bounds(len(files), batch_size)), desc=desc, unit="batch", leave=False,
                disable=None)
