"""Opening any image file as an RGB picture, and saying why a file can't be used."""
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, not left black


def is_image_name(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(img):
    """Any Pillow mode (L, LA, P, RGBA, CMYK, I;16, F, ...) as 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grey: scale the full range into 0..255 instead of clipping to white.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")


def open_rgb(path):
    """Decode the whole file, apply its EXIF rotation and return an RGB image.

    Raises an exception (of any kind Pillow throws) if the file is not a usable image;
    `image_problem` turns that into a reason.
    """
    with warnings.catch_warnings():
        # Pillow warns above ~89 Mpx and raises above twice that: treat both as "too large".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)


def image_problem(path):
    """None if `path` decodes to a picture, else a short reason why it can't be used."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        img = open_rgb(path)
        if img.width < 1 or img.height < 1:
            return "image has no pixels"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return f"too large to decode safely ({str(e).split('.')[0]})"
    except Image.UnidentifiedImageError:
        return "not an image Pillow can read (wrong extension or unsupported format)"
    except OSError as e:
        return f"corrupt or truncated image ({e})"
    except Exception as e:  # Pillow raises many kinds for broken files
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None
