"""Opening an image, from a file or from bytes in memory, as an RGB picture, safely; and saying
why one can't be used.

Safely: only the parsers of FORMATS ever see the data (Pillow's other ~35, EPS and its
Ghostscript among them, are never reached, whatever a file's name or first bytes say), and an
image's size is read from its header and checked against a pixel budget before a pixel is
decoded. Pillow's own bomb check stays on: above ~89 Mpx it warns, above ~179 Mpx it refuses.
"""
import contextlib
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from src.core.paths import hidden

try:  # libjpeg-turbo without Pillow's overhead; optional: without it Pillow decodes everything
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheels
    simplejpeg = None

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# The formats decoded, in Pillow's names: the photo and web formats, TIFF (scans, microscopes), and
# PPM/PGM (uncompressed, nothing to exploit). A JPEG with several pictures opens as "MPO".
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, not left black


def skip_reason_for_name(path):
    """Why a file is not even looked at because of its name, or None if it may be an image."""
    if hidden(path.name):
        return "hidden or system file (.DS_Store, ._name, Thumbs.db); ignored"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({path.suffix or 'none'}); ignored"
    return None


def file_digest(path):
    """sha256 of a file's bytes: an image's identity (duplicates, splits, cached checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_image_name(path):
    return skip_reason_for_name(path) is None


class ImageRefused(ValueError):
    """An image not decoded on purpose (empty, too many pixels); the message says why."""


@dataclass(frozen=True)
class PixelBudget:
    """The most pixels an image may have to be decoded, and the knob that raises it (named in refusals)."""
    pixels: int
    knob: str

    def check(self, width, height, what="image"):
        if width * height > self.pixels:
            raise ImageRefused(f"too large to decode safely: {what} {width} x {height} px = "
                               f"{pixel_count(width * height)}, over the budget of {pixel_count(self.pixels)} "
                               f"({self.knob})")


def pixel_count(n):
    return f"{n / 1e6:.1f} Mpx" if n >= 100_000 else f"{n:,} px"


# Pillow's own ceiling: it refuses more pixels than this whatever the budget says.
PILLOW_BUDGET = PixelBudget(2 * Image.MAX_IMAGE_PIXELS, "Pillow's decompression-bomb limit")


@contextlib.contextmanager
def open_image(source, budget=PILLOW_BUDGET):
    """Pillow's lazy image (header read, no pixel decoded) of a path or of in-memory bytes: only
    the FORMATS parsers ever see the data, and its size is within `budget`."""
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    with io.BytesIO(source) if in_memory else open(source, "rb") as f:
        if f.seek(0, io.SEEK_END) == 0:
            raise ImageRefused("empty file (0 bytes)")
        f.seek(0)
        with Image.open(f, formats=FORMATS) as img:
            budget.check(img.width, img.height)
            yield img


EXIF_ORIENTATION = 0x0112
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # ImageOps.exif_transpose's table


def exif_orientation(img):
    """The EXIF (or XMP) orientation tag, 1 (as stored) when absent or unreadable: a broken EXIF
    block must not cost a good picture."""
    try:
        return img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return 1


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
STRIP_PIXELS = 1 << 18  # high-bit-depth pixels converted at a time


def to_grey8(img):
    """A 16-bit, 32-bit or float grey image as 8-bit L, its full range scaled into 0..255 instead
    of clipped to white. In float32, a strip of rows at a time: the only full-size copy is the
    1-byte result (a float64 copy of a 30 Mpx image alone was 240 MB)."""
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    strips = [(top, min(top + rows, img.height)) for top in range(0, img.height, rows)]

    def strip(top, bottom):
        return np.asarray(img.crop((0, top, img.width, bottom)), dtype=np.float32)

    if img.mode.startswith("I;16"):
        hi = 65535.0
    else:
        top = max((float(strip(*s).max()) for s in strips), default=0.0)
        hi = 65535.0 if top > 255 else 1.0 if img.mode == "F" and top <= 1 else 255.0
    grey = Image.new("L", img.size)
    for top, bottom in strips:
        scaled = np.clip(strip(top, bottom) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        grey.paste(Image.fromarray(scaled, "L"), (0, top))
    return grey


def to_picture(img):
    """Any Pillow mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) as 8-bit L (grey ones) or RGB:
    grey stays one byte a pixel until the caller has shrunk it (`to_rgb` after)."""
    if img.mode in HIGH_BIT_MODES:
        return to_grey8(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, img)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")  # convert() would copy an RGB image


def to_rgb(img):
    """Any Pillow mode as 8-bit RGB (grey: the same value in each channel)."""
    img = to_picture(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(source, min_side=None, budget=PILLOW_BUDGET):
    """(picture in L or RGB, upright, format such as 'JPEG') of a path or in-memory bytes.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    Pillow's draft mode) as long as its shorter side stays >= min_side: for a caller that
    shrinks it anyway, a 3000 px photo then decodes several times faster.
    Raises ImageRefused, or an exception of any kind Pillow throws, if it is not a usable image;
    `why_not_decoded` turns that into a reason.
    """
    with open_image(source, budget) as img:
        fmt = img.format
        if min_side and fmt == "JPEG":
            img.draft(None, draft_request(img.width, img.height, min_side))
        img.load()
        orientation = exif_orientation(img)
        # Converted before the rotation: a 16-bit image is rotated as 8-bit, never copied at full depth.
        picture = to_picture(img)
    del img  # a high-bit-depth original is freed before the next full-size copy
    if orientation in TRANSPOSE:
        picture = picture.transpose(TRANSPOSE[orientation])
    return picture, fmt


def open_rgb(source, min_side=None, budget=PILLOW_BUDGET):
    """The image at a path, or in bytes, decoded upright as RGB (see `decode`)."""
    return to_rgb(decode(source, min_side, budget)[0])


def draft_request(width, height, min_side):
    """The size to ask Pillow's draft mode for: the image scaled so its shorter side is min_side.
    Pillow then decodes at 1/2, 1/4 or 1/8 where that stays at least this big."""
    scale = min_side / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def plain_jpeg_pixels(source, min_side=None, budget=PILLOW_BUDGET):
    """`open_rgb`'s pixels as an H x W x 3 uint8 array if `source` (a path or bytes) is a plain
    JPEG within `budget`, else None.

    A JPEG that Pillow would decode at full size, in colour or grey, with no EXIF block (so
    nothing to rotate) goes to simplejpeg: the same libjpeg-turbo with the same settings
    (identical pixels; the tests compare them) with less overhead per call, and it holds no
    GIL, so two threads decode twice as fast. Everything else (PNG, CMYK, EXIF, draft-scaled,
    over the budget, broken files) is left to Pillow (`open_rgb`, which says what is wrong): None.
    """
    if simplejpeg is None:
        return None
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    if data[:3] != b"\xff\xd8\xff" or b"Exif\x00\x00" in data:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        request = draft_request(width, height, min_side) if min_side else (width, height)
        drafted = min(width // request[0], height // request[1]) >= 2  # Pillow's own rule
        if colorspace in ("YCbCr", "Gray") and not drafted and width * height <= budget.pixels:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:  # a broken file: Pillow says what is wrong
        pass
    return None


def why_not_decoded(error):
    """A short reason for an exception `decode` raised."""
    if isinstance(error, ImageRefused):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        size = str(error).split(" could be")[0].rstrip(",")
        return f"too large to decode safely: {size} ({PILLOW_BUDGET.knob})"
    if isinstance(error, Image.UnidentifiedImageError):
        return (f"not an image in a format this project decodes ({', '.join(FORMATS)}): wrong extension "
                f"or unsupported format")
    if isinstance(error, OSError):
        return f"corrupt or truncated image ({error})"
    return f"cannot decode image ({type(error).__name__}: {error})"  # Pillow raises many kinds for broken files


def check_image(path, budget=PILLOW_BUDGET):
    """(None, format such as 'JPEG') if `path` decodes to a picture within `budget`, else (a short
    reason, None)."""
    try:
        picture, fmt = decode(path, budget=budget)
        if picture.width < 1 or picture.height < 1:
            return "image has no pixels", None
    except Exception as e:
        return why_not_decoded(e), None
    return None, fmt


def image_problem(path, budget=PILLOW_BUDGET):
    """None if `path` decodes to a picture, else a short reason why it can't be used."""
    return check_image(path, budget)[0]
