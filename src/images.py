"""Opening any image file as an RGB picture, and saying why a file can't be used."""
import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from src.paths import hidden

try:  # libjpeg-turbo without Pillow's overhead; optional: without it Pillow decodes everything
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheels
    simplejpeg = None

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
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


def to_rgb(img):
    """Any Pillow mode (1, L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...) as 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit, 32-bit or float grey: scale the full range into 0..255 instead of clipping to white.
        a = np.asarray(img, dtype=np.float64)
        top = a.max() if a.size else 0
        hi = 65535.0 if img.mode.startswith("I;16") or top > 255 else 1.0 if img.mode == "F" and top <= 1 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, img)
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def open_rgb(path, min_side=None):
    """Decode the file, apply its EXIF rotation and return an RGB image.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    Pillow's draft mode) as long as its shorter side stays >= min_side: for a caller that
    shrinks it anyway, a 3000 px photo then decodes several times faster.
    Raises an exception (of any kind Pillow throws) if the file is not a usable image;
    `check_image` turns that into a reason.
    """
    with warnings.catch_warnings():
        # Pillow warns above ~89 Mpx and refuses above ~179 Mpx (its decompression-bomb guard).
        # 108 Mpx phone photos sit between the two, so only the refusal counts.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if min_side and img.format == "JPEG":
                img.draft(None, draft_request(img.width, img.height, min_side))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block must not cost a good picture: keep it unrotated
                pass
            return to_rgb(img)


def draft_request(width, height, min_side):
    """The size to ask Pillow's draft mode for: the image scaled so its shorter side is min_side.
    Pillow then decodes at 1/2, 1/4 or 1/8 where that stays at least this big."""
    scale = min_side / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def plain_jpeg_pixels(path, min_side=None):
    """`open_rgb`'s pixels as an H x W x 3 uint8 array if `path` is a plain JPEG, else None.

    A JPEG that Pillow would decode at full size, in colour or grey, with no EXIF block (so
    nothing to rotate) goes to simplejpeg: the same libjpeg-turbo with the same settings
    (identical pixels; the tests compare them) with less overhead per call, and it holds no
    GIL, so two threads decode twice as fast. Everything else (PNG, CMYK,
    EXIF, draft-scaled, broken files) is left to Pillow: None.
    """
    if simplejpeg is None:
        return None
    data = Path(path).read_bytes()
    if data[:3] != b"\xff\xd8\xff" or b"Exif\x00\x00" in data:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        request = draft_request(width, height, min_side) if min_side else (width, height)
        drafted = min(width // request[0], height // request[1]) >= 2  # Pillow's own rule
        if colorspace in ("YCbCr", "Gray") and not drafted and width * height <= Image.MAX_IMAGE_PIXELS:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:  # a broken file: Pillow says what is wrong
        pass
    return None


def check_image(path):
    """(None, format such as 'JPEG') if `path` decodes to a picture, else (a short reason, None)."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)", None
        with Image.open(path) as probe:  # the header only: the format name
            fmt = probe.format
        img = open_rgb(path)
        if img.width < 1 or img.height < 1:
            return "image has no pixels", None
    except Image.DecompressionBombError as e:
        size = str(e).split(" could be")[0].rstrip(",")
        return f"too large to decode safely: {size} (Pillow's decompression-bomb limit)", None
    except Image.UnidentifiedImageError:
        return "not an image Pillow can read (wrong extension or unsupported format)", None
    except OSError as e:
        return f"corrupt or truncated image ({e})", None
    except Exception as e:  # Pillow raises many kinds for broken files
        return f"cannot decode image ({type(e).__name__}: {e})", None
    return None, fmt


def image_problem(path):
    """None if `path` decodes to a picture, else a short reason why it can't be used."""
    return check_image(path)[0]
