"""The loaders' image path: the augmentation, uint8 batches normalised on the device, decoding."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from src.core.device import Normalizer, RunSettings
from src.data import images
from src.data.images import open_rgb, plain_jpeg_pixels
from src.data.loaders import ImageFiles
from src.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomResizedCropFlip,
    eval_crop,
    eval_transform,
    to_uint8_tensor,
)


def photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def test_whole_image_crop_is_a_plain_resize_and_flip_mirrors_it():
    img = photo(96, 96)
    whole = to_uint8_tensor(RandomResizedCropFlip(32, scale=(1, 1), ratio=(1, 1), hflip=0.0)(img))
    assert whole.dtype == torch.uint8 and whole.shape == (3, 32, 32)
    assert torch.equal(whole, to_uint8_tensor(img.resize((32, 32), Image.BILINEAR)))
    flipped = to_uint8_tensor(RandomResizedCropFlip(32, scale=(1, 1), ratio=(1, 1), hflip=1.0)(img))
    assert torch.equal(flipped, whole.flip(-1))


def test_crops_follow_the_scale_and_ratio_ranges_and_the_torch_seed():
    augment = RandomResizedCropFlip(32, scale=(0.2, 0.5), ratio=(3 / 4, 4 / 3))
    torch.manual_seed(0)
    boxes = [augment.crop_box(200, 150, torch.rand(10, 4).tolist()) for _ in range(500)]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 150
        w, h = right - left, bottom - top
        assert 0.2 * 0.97 <= w * h / (200 * 150) <= 0.5 * 1.03
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert len(set(boxes)) > 400  # really random
    img = photo(200, 150)
    torch.manual_seed(1)
    first = [to_uint8_tensor(augment(img)) for _ in range(3)]
    torch.manual_seed(1)
    assert all(torch.equal(a, to_uint8_tensor(augment(img))) for a in first)  # resumable: torch's RNG state decides


def test_impossible_crop_falls_back_to_a_centered_crop_within_the_ratio():
    augment = RandomResizedCropFlip(16, scale=(2.0, 3.0), hflip=0.0)  # never fits: fallback
    assert augment.crop_box(100, 20, torch.rand(10, 4).tolist()) == (36, 0, 63, 20)  # 27x20 ~ 4/3
    assert augment.crop_box(30, 30, torch.rand(10, 4).tolist()) == (0, 0, 30, 30)


@pytest.mark.parametrize("size", [64, 97])  # 64: pixels tiled 64 to a row; 97: 97 x 97 has no factor 2
def test_uint8_batch_normalised_on_the_device_equals_totensor_normalize(size):
    images = [photo(120, 90, seed) for seed in range(4)]
    expected = torch.stack([eval_transform(size)(img) for img in images])
    batch = torch.stack([eval_crop(size)(img) for img in images])
    assert batch.dtype == torch.uint8
    run = RunSettings(torch.device("cpu"), None, True, Normalizer(IMAGENET_MEAN, IMAGENET_STD, "cpu"))
    got = run.input(batch)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=1e-5)
    plain = run._replace(channels_last=False).input(batch.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous() and torch.allclose(plain, expected, atol=1e-5)  # NCHW when not channels_last
    floats = run.input(expected)  # an already-normalised float batch passes unscaled
    assert torch.equal(floats, expected)


def decode_rgb(path, min_side=None):
    """What ImageFiles decodes: simplejpeg's pixels for a plain JPEG, else Pillow's."""
    pixels = plain_jpeg_pixels(path, min_side)
    return pixels if pixels is not None else np.array(open_rgb(path, min_side))


def jpeg_variants(folder):
    """name -> path: JPEGs of every kind decode_rgb meets, and a PNG."""
    img = photo(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    saves = {"plain.jpg": {}, "progressive.jpg": {"progressive": True}, "444.jpg": {"subsampling": 0},
             "rotated.jpg": {"exif": exif}}
    paths = {}
    for name, options in saves.items():
        paths[name] = folder / name
        img.save(paths[name], quality=90, **options)
    for name, mode in [("grey.jpg", "L"), ("cmyk.jpg", "CMYK")]:
        paths[name] = folder / name
        img.convert(mode).save(paths[name], quality=90)
    paths["big.jpg"] = folder / "big.jpg"
    photo(1600, 1200).save(paths["big.jpg"], quality=90)
    paths["image.png"] = folder / "image.png"
    img.save(paths["image.png"])
    return paths


def test_decode_rgb_gives_exactly_pillows_pixels_and_uses_simplejpeg_where_that_is_the_same(tmp_path, monkeypatch):
    paths = jpeg_variants(tmp_path)
    fast = []
    real = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda data, **kw: fast.append(1) or real(data, **kw))
    for name, path in paths.items():
        fast.clear()
        for min_side in (None, 256):
            got = decode_rgb(path, min_side)
            assert got.dtype == np.uint8 and got.flags.writeable
            assert np.array_equal(got, np.asarray(open_rgb(path, min_side))), (name, min_side)
        # simplejpeg for plain colour/grey JPEGs; Pillow for CMYK, EXIF rotation, draft scaling, PNG
        expected = {"plain.jpg": 2, "progressive.jpg": 2, "444.jpg": 2, "grey.jpg": 2, "big.jpg": 1}.get(name, 0)
        assert len(fast) == expected, name
    assert decode_rgb(paths["rotated.jpg"]).shape == (300, 200, 3)  # upright, as open_rgb
    broken = tmp_path / "truncated.jpg"
    broken.write_bytes(paths["plain.jpg"].read_bytes()[:2000])
    with pytest.raises(OSError, match="truncated"):
        decode_rgb(broken)  # Pillow's error, as open_rgb gives


def test_image_files_crop_exactly_as_the_eval_transform(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(256, 256), (301, 256), (256, 333), (300, 200), (255, 257), (120, 90)]):
        paths.append(tmp_path / f"{i}.jpg")
        photo(w, h, seed=i).save(paths[-1], quality=90)
    files = ImageFiles(paths, 224)
    for i, path in enumerate(paths):
        image, error = files[i]
        assert error == "" and torch.equal(image, eval_crop(224)(open_rgb(path))), path.name


def test_keeping_freed_memory_stops_page_faults_on_reused_batches():
    script = """
import resource, sys, torch
from src.core.process import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):  # the heap grows for the first 6-9 rounds (small blocks land after the big one), then settles
    x = torch.ones(64 << 20, dtype=torch.uint8); del x
before = faults()
for _ in range(4):
    x = torch.ones(64 << 20, dtype=torch.uint8); del x
print(applied, faults() - before)
"""
    results = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        applied, faults = out.stdout.split()
        results[mode] = (applied == "True", int(faults))
    if not results["keep"][0]:
        pytest.skip("not glibc: nothing to change")
    assert results["default"][1] > 4 * 16384 * 0.9  # every 64 MB block faulted in anew: 16,384 pages
    assert results["keep"][1] < 1000  # reused


def test_jpeg_decodes_at_reduced_size_only_as_far_as_min_side_allows(tmp_path):
    path = tmp_path / "big.jpg"
    photo(1600, 1200).save(path, quality=90)
    assert open_rgb(path).size == (1600, 1200)
    small = open_rgb(path, min_side=256)
    assert small.size == (400, 300)  # 1/4 scale; 1/8 would be 150 px < 256
    assert open_rgb(path, min_side=1000).size == (1600, 1200)
    # The same picture: resized to the same size, the two agree closely.
    reference = transforms.functional.resize(open_rgb(path), [300, 400])
    diff = np.abs(np.asarray(small, dtype=float) - np.asarray(reference, dtype=float))
    assert diff.mean() < 3
    png = tmp_path / "big.png"
    photo(1600, 1200).save(png)
    assert open_rgb(png, min_side=256).size == (1600, 1200)  # only JPEGs have draft mode


def test_loader_workers_keep_a_gpu_fed_but_leave_cpu_cores_to_the_model():
    from src.core.process import decoding_workers
    def training(cached, device):
        return decoding_workers("auto", 1000, 64, training=True, cached=cached, on_cpu=device == "cpu")
    assert training(True, "cpu") == 0  # cached, CPU model: no process
    assert training(True, "cuda") >= 1  # cached, GPU: augment in workers
    assert training(False, "cpu") >= 1  # decoding from disk
    assert decoding_workers(3, 1000, 64, training=True, cached=True) == 3  # an explicit number wins
    assert decoding_workers("auto", 64, 64) == 0  # inference on one batch: no process
