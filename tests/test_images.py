"""Every image mode loads as the right RGB picture; every bad file gets a reason, never a traceback."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.images import image_problem, is_image_name, open_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width=20000, height=10000):
    """A valid PNG header claiming 200 Mpx, more than Pillow's decompression-bomb limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + png_chunk(b"IEND", b""))


def write_mode_images(folder):
    """{file name: (expected size, {(x, y): expected RGB})}, one file per awkward mode."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    Image.new("L", (16, 16), 100).save(folder / "grey.png")
    expect["grey.png"] = ((16, 16), {(3, 3): (100, 100, 100)})
    Image.new("LA", (16, 16), (0, 0)).save(folder / "grey alpha.png")  # fully transparent black
    expect["grey alpha.png"] = ((16, 16), {(3, 3): WHITE})
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 16))  # right half: palette entry 1 (red); left half entry 0, transparent
    pal.save(folder / "palette.gif", transparency=0)
    expect["palette.gif"] = ((16, 16), {(2, 2): WHITE, (12, 2): RED})
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(folder / "half transparent.png")
    expect["half transparent.png"] = ((16, 16), {(3, 3): (255, 127, 127)})
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)  # pure cyan
    expect["cmyk.jpg"] = ((16, 16), {(3, 3): (0, 255, 255)})
    deep = np.zeros((16, 16), np.uint16)
    deep[:, 8:] = 65535
    deep[8:, :8] = 32768
    Image.fromarray(deep).save(folder / "sixteen bit.png")
    expect["sixteen bit.png"] = ((16, 16), {(2, 2): (0, 0, 0), (12, 2): WHITE, (2, 12): (128, 128, 128)})
    wide = Image.new("RGB", (40, 20), RED)
    wide.paste(BLUE, (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write portrait shots
    wide.save(folder / "rotated.jpg", exif=exif, quality=95)
    expect["rotated.jpg"] = ((20, 40), {(10, 5): RED, (10, 35): BLUE})  # shown: red on top, blue below
    return expect


def write_bad_files(folder):
    """{file name: words its skip reason must contain}, made from Pillow output and raw bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (64, 64), RED).save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "really text.png").write_text("this is not a picture\n")
    (folder / "phone.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64))  # HEIC, named .jpg
    (folder / "huge.png").write_bytes(bomb_png())
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(32))
    (folder / "notes.txt").write_text("taken on holiday\n")
    return {"empty.jpg": "empty", "truncated.jpg": "truncated", "really text.png": "not an image",
            "phone.jpg": "not an image", "huge.png": "too large", ".DS_Store": "hidden",
            "notes.txt": "not an image file extension"}


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_every_mode_loads_as_the_right_rgb_picture(tmp_path):
    for name, (size, pixels) in write_mode_images(tmp_path).items():
        assert image_problem(tmp_path / name) is None, name
        img = open_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == size, (name, img.mode, img.size)
        for xy, rgb in pixels.items():
            assert close(img.getpixel(xy), rgb), (name, xy, img.getpixel(xy), rgb)


def test_every_bad_file_gets_a_reason(tmp_path):
    for name, words in write_bad_files(tmp_path).items():
        path = tmp_path / name
        reason = image_problem(path) if is_image_name(path) else "not an image file extension / hidden"
        assert reason and words in reason, (name, reason)


@pytest.mark.parametrize("name, ok", [("a.JPG", True), ("b.jpeg", True), ("c.webp", True), ("._a.jpg", False),
                                      (".DS_Store", False), ("Thumbs.db", False), ("x.heic", False)])
def test_image_names(name, ok):
    assert is_image_name(Path(name)) == ok
