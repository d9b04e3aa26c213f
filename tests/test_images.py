"""Every image mode loads as the right RGB picture; every bad file gets a reason, never a traceback;
only allow-listed formats within a pixel budget are decoded, from a file or from bytes alike."""
import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.image_files import EvalPixels, eval_crop_pixels
from src.data.images import (
    FORMATS,
    ImageRefused,
    PixelBudget,
    check_image,
    decode,
    image_problem,
    is_image_name,
    open_image,
    open_rgb,
    to_grey8,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width=20000, height=10000):
    """A valid PNG header claiming 200 Mpx, more than Pillow's decompression-bomb limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + png_chunk(b"IEND", b""))


def zeros_png(width, height, bit_depth=8):
    """A valid grey PNG of zeros, compressed a row at a time: 100 Mpx take ~100 KB and the pixels are
    never in memory, here or in a test's subprocess."""
    squeeze = zlib.compressobj(9)
    row = bytes(1 + width * bit_depth // 8)  # filter byte 0, then the zero samples
    idat = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def encoded(img, fmt, **options):
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


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


def test_only_allow_listed_formats_are_parsed_whatever_pillow_could_open():
    picture = Image.new("RGB", (20, 12), (200, 30, 60))
    for fmt in FORMATS:
        data = encoded(picture, fmt)
        assert open_rgb(data).size == (20, 12) and decode(data)[1] == fmt, fmt
    for fmt in ("EPS", "ICO", "PCX", "TGA", "SGI", "IM", "PDF"[:0] or "DDS"):
        data = encoded(picture, fmt)
        with Image.open(io.BytesIO(data)) as img:  # Pillow, left to itself, would parse it
            assert img.format == fmt
        with pytest.raises(Image.UnidentifiedImageError):
            decode(data)
        reason, _ = check_image(io.BytesIO(data).getvalue())
        assert reason.startswith("not an image in a format this project decodes (JPEG, PNG"), (fmt, reason)


def test_a_pixel_budget_refuses_an_image_from_its_header_naming_its_knob():
    bomb = zeros_png(10000, 10000)  # 100 Mpx in ~100 KB
    assert len(bomb) < 500_000
    start = time.perf_counter()
    with pytest.raises(ImageRefused, match=r"10000 x 10000 px = 100.0 Mpx, over the budget of 50.0 Mpx \(KNOB\)"):
        decode(bomb, budget=PixelBudget(50_000_000, "KNOB"))
    assert time.perf_counter() - start < 0.5  # decoding 100 Mpx would take seconds
    assert "over the budget" in check_image(bomb, PixelBudget(50_000_000, "KNOB"))[0]
    assert "Pillow's decompression-bomb limit" in image_problem(bomb_png())  # 200 Mpx: over Pillow's own ceiling
    # Pillow's own warning is no longer silenced: a budget above ~89 Mpx lets it speak.
    with pytest.warns(Image.DecompressionBombWarning), open_image(bomb, PixelBudget(120_000_000, "KNOB")) as img:
        assert img.size == (10000, 10000)


def test_bytes_and_paths_give_the_same_pixels(tmp_path):
    names = list(write_mode_images(tmp_path))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg", quality=90)
    for name in names + ["photo.jpg"]:
        path = tmp_path / name
        assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(open_rgb(path.read_bytes()))), name
        from_path, from_bytes = EvalPixels([path], 32).pixels(0), EvalPixels([path.read_bytes()], 32).pixels(0)
        assert from_path[1] == from_bytes[1] == "" and np.array_equal(from_path[0], from_bytes[0]), name


def test_empty_and_missing_inputs_get_their_own_reasons(tmp_path):
    assert EvalPixels([b""], 32).pixels(0)[1] == "empty file (0 bytes)"
    assert EvalPixels([tmp_path / "gone.png"], 32).pixels(0)[1] == "no such file, folder or glob match"


def test_high_bit_depth_grey_is_scaled_in_float32_strips_as_in_float64_at_once():
    rng = np.random.default_rng(0)
    cases = [("I;16", rng.integers(0, 65536, (700, 600), dtype=np.uint16)),  # taller than one strip
             ("I", rng.integers(-50, 70000, (30, 20), dtype=np.int32)),
             ("I", rng.integers(0, 256, (30, 20)).astype(np.int32)),
             ("F", rng.random((30, 20), dtype=np.float32)), ("F", rng.random((30, 20), dtype=np.float32) * 300)]
    for mode, values in cases:
        img = Image.fromarray(values, mode) if mode != "I;16" else Image.fromarray(values)
        assert img.mode == mode
        a = values.astype(np.float64)
        hi = 65535.0 if mode == "I;16" or a.max() > 255 else 1.0 if mode == "F" and a.max() <= 1 else 255.0
        want = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)  # the float64 formula it replaces
        got = np.asarray(to_grey8(img))
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1, mode


def test_a_30_mpx_16_bit_png_decodes_at_under_4_bytes_a_pixel():
    """Peak memory of the decoding alone, in a fresh process: VmHWM, the most this process's memory
    ever held (ru_maxrss would also count the parent's memory at the fork)."""
    script = """
import re, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_images import zeros_png
from src.data.images import PixelBudget
from src.data.image_files import EvalPixels
peak = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
EvalPixels([zeros_png(64, 64, 16)], 224).pixels(0)  # the decoders loaded
data = zeros_png(6000, 5000, 16)  # 30 Mpx, built a row at a time
before = peak()
pixels, error = EvalPixels([data], 224, PixelBudget(50_000_000, "x")).pixels(0)
print(repr(error), pixels.shape, (peak() - before) / 30e6)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split(" ", 1)
    error, rest = out[0], out[1].rsplit(" ", 1)
    assert error == "''" and rest[0] == "(224, 224, 3)", out
    assert 2 <= float(rest[1]) < 4, out  # 2: the 16-bit pixels themselves, so the measure saw the decoding


def test_the_crop_is_torchvisions_eval_crop_pixel_for_pixel():
    from src.data.transforms import eval_crop
    rng = np.random.default_rng(0)
    for width, height in [(256, 256), (301, 256), (256, 333), (300, 200), (255, 257), (120, 90), (37, 500), (37, 37)]:
        rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        grey = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        for size in (32, 224):
            for img in (rgb, grey):
                want = np.asarray(eval_crop(size, to_tensor=False)(img.convert("RGB")))
                assert np.array_equal(eval_crop_pixels(img, size), want), (width, height, size, img.mode)


def test_an_aspect_ratio_that_would_blow_up_in_the_resize_is_refused():
    sliver = encoded(Image.new("L", (20000, 1)), "PNG")  # 20,000 px, resized to 37 x 740,000
    pixels, error = EvalPixels([sliver], 32, PixelBudget(1_000_000, "KNOB")).pixels(0)
    assert "resized to 740000 x 37 px" in error and "(KNOB)" in error and not pixels.any()


def test_a_failing_file_is_decoded_once(tmp_path, monkeypatch):
    whole = encoded(Image.new("RGB", (64, 64), RED), "PNG")
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real(*a, **k))
    _, error = EvalPixels([tmp_path / "truncated.png"], 32).pixels(0)
    assert "truncated" in error or "corrupt" in error, error
    assert len(opened) == 1
