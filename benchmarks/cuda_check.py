"""The CUDA training path, measured: resnet50 at 224 px, AMP + channels_last + cudnn.benchmark.

    python benchmarks/cuda_check.py                      # on a machine with a GPU (~2-3 minutes)
    python benchmarks/cuda_check.py --data DIR           # real photos (class sub-folders) instead of generated JPEGs
    python benchmarks/cuda_check.py --cpu --image-size 32 --steps 3 --arch resnet18   # smoke test without a GPU

Prints img/s of training on synthetic tensors already on the GPU (the ceiling), of training fed by
the project's real loader (JPEG decode + RandomResizedCrop in worker processes, pinned memory,
non_blocking copies), of the loader alone, and real/synthetic. Without a GPU it says so and exits 0.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.data import ImageListDataset, default_workers, make_loader, train_transform  # noqa: E402
from src.device import autocast, configure, pick_precision  # noqa: E402
from src.images import is_image_name  # noqa: E402
from src.networks import build_model  # noqa: E402
from src.train import PRECISION_NAMES  # noqa: E402


def photo_like_jpegs(root, count, seed=0):
    """Smooth random 500x375 JPEGs: decode cost like camera photos' thumbnails (ImageNet's median size)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        path = root / f"{i % 10}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def step(model, optimizer, scaler, criterion, images, labels, amp_dtype, device):
    with autocast(device, amp_dtype):
        loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--data", help="a folder of class sub-folders of images (default: generated JPEGs)")
    parser.add_argument("--workers", type=int, default=None, help="default: sized to the machine")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the model")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (a smoke test of this script)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU visible; nothing measured (use --cpu for a smoke test)")
        return
    device = torch.device("cpu" if args.cpu else "cuda")
    configure(device, deterministic=False)  # cudnn.benchmark, TF32
    amp_dtype = pick_precision("auto", device, args.image_size)
    model = build_model(args.arch, 10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    train_model = torch.compile(model) if args.compile else model
    batch, steps = args.batch_size, args.steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.arch} at {args.image_size} px, batch {batch}, {name}, {PRECISION_NAMES[amp_dtype]}, "
          f"channels_last{', compiled' if args.compile else ''}")

    # Synthetic: tensors already on the device, the ceiling for this model and precision.
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(3):
        step(train_model, optimizer, scaler, criterion, x, y, amp_dtype, device)  # cudnn autotuning, compile
    seconds = timed(lambda: [step(train_model, optimizer, scaler, criterion, x, y, amp_dtype, device)
                             for _ in range(steps)], device)
    synthetic = steps * batch / seconds

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            paths = sorted(p for p in Path(args.data).rglob("*") if p.is_file() and is_image_name(p))
            if not paths:
                sys.exit(f"cuda_check: no images under {args.data}")
        else:
            paths = photo_like_jpegs(Path(tmp), min(2048, batch * (steps + 3)))
        classes = sorted({p.parent.name for p in paths})
        labels = [classes.index(p.parent.name) % 10 for p in paths]
        workers = default_workers() if args.workers is None else args.workers
        dataset = ImageListDataset(paths, labels, train_transform(args.image_size))
        loader = make_loader(dataset, batch, shuffle=True, workers=workers, pin_memory=device.type == "cuda",
                             drop_last=True)

        def real_epochs(train):
            done = 0
            while done < steps:
                for images, target in loader:
                    if done == steps:
                        break
                    if train:
                        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                        step(train_model, optimizer, scaler, criterion, images,
                             target.to(device, non_blocking=True), amp_dtype, device)
                    done += 1

        real_epochs(train=False)  # start the workers, warm the page cache
        loader_only = steps * batch / timed(lambda: real_epochs(train=False), device)
        real = steps * batch / timed(lambda: real_epochs(train=True), device)
    print(f"synthetic {synthetic:.0f} img/s | real loader + training {real:.0f} img/s | "
          f"loader alone {loader_only:.0f} img/s ({workers} workers, {len(paths)} images)")
    print(f"real/synthetic = {real / synthetic:.3f}" + (
        "   (loader-bound: more workers or cache_images)" if loader_only < synthetic else ""))


if __name__ == "__main__":
    main()
