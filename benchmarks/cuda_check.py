"""The CUDA training path, measured: resnet50 at 224 px, AMP + channels_last + cudnn.benchmark.

    python -m benchmarks.cuda_check                      # on a machine with a GPU (~2 minutes)
    python -m benchmarks.cuda_check --data DIR           # real photos (class sub-folders) instead of generated JPEGs
    python -m benchmarks.cuda_check --compile            # torch.compile the model too
    python -m benchmarks.cuda_check --cpu --image-size 32 --steps 3 --arch resnet18   # smoke test without a GPU

Both measurements run src/train.py's own `train_one_epoch` (its autocast, grad scaler, scheduler,
non-finite checks and bookkeeping):
  synthetic  over batches of random tensors already on the GPU: the ceiling for this model
  real       over the stage's own loader (`load_data`: JPEG decode, cache_images=auto,
             RandomResizedCrop + flip + normalise in worker processes, pinned memory, non_blocking)
and the loader alone; prints img/s of each and real/synthetic. Without a GPU it says so and exits 0.
"""
import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from src.core import process
from src.core.device import Normalizer, RunSettings, configure, pick_precision
from src.core.params import load_params
from src.core.paths import MANIFEST
from src.data.images import is_image_name
from src.data.loaders import make_loader
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from src.networks.factory import build_model
from src.train import load_data
from src.training.distributed import Dist
from src.training.schedule import EpochPlan, make_scheduler
from src.training.trainer import Trainer, make_optimizer, train_one_epoch


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


def write_manifest(paths, classes):
    """data/manifest.csv in the current folder, every image in train: what the stage reads."""
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    with open(MANIFEST, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "sha256"])
        writer.writerows([str(p.resolve()), p.parent.name, "train", ""] for p in paths)


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
    parser.add_argument("--steps", type=int, default=100, help="batches per measurement (one epoch)")
    parser.add_argument("--data", help="a folder of class sub-folders of images (default: generated JPEGs)")
    parser.add_argument("--workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="loader processes: auto (the stage's rule, the default) or a number")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the model")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (a smoke test of this script)")
    args = parser.parse_args()
    process.start()
    if not args.cpu and not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU visible; nothing measured (use --cpu for a smoke test)")
        return
    device = torch.device("cpu" if args.cpu else "cuda")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = params["train"]
    params["arch"], params["data"]["image_size"] = args.arch, args.image_size
    cfg.update(batch_size=args.batch_size, hflip=0.5, crop_scale=[0.08, 1.0], optimizer="sgd", lr=0.01,
               workers=args.workers)
    configure(device, deterministic=False)  # cudnn.benchmark, TF32
    amp_dtype = pick_precision("auto", device, args.image_size)
    model = build_model(args.arch, 10).to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    run = RunSettings(device, amp_dtype, True, Normalizer(IMAGENET_MEAN, IMAGENET_STD, device))
    train_model = torch.compile(model) if args.compile else model
    batch, steps = args.batch_size, args.steps
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.arch} at {args.image_size} px, batch {batch}, {name}, {run.precision_name}, "
          f"channels_last{', compiled' if args.compile else ''}, torch {torch.__version__}")

    def epoch(batches, number=0):
        scheduler = make_scheduler(optimizer, cfg, len(batches), EpochPlan({**cfg, "epochs": 1, "time_budget": 0}))
        trainer = Trainer(criterion, optimizer, scheduler, scaler, 0.0)
        train_one_epoch(train_model, batches, trainer, run, number, show_progress=False)

    # Synthetic: uint8 batches already on the device, the ceiling for this model and precision.
    x = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    epoch([(x, y)] * 3)  # cudnn autotuning, compile
    synthetic = steps * batch / timed(lambda: epoch([(x, y)] * steps), device)

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            paths = sorted(p for p in Path(args.data).rglob("*") if p.is_file() and is_image_name(p))
            if not paths:
                sys.exit(f"cuda_check: no images under {args.data}")
        else:
            paths = photo_like_jpegs(Path(tmp) / "images", min(2048, batch * steps))
        classes = sorted({p.parent.name for p in paths})[:10]
        paths = [p for p in paths if p.parent.name in classes]
        paths = (paths * (batch * steps // len(paths) + 1))[:batch * steps]  # one epoch = `steps` batches
        os.chdir(tmp)
        write_manifest(paths, classes)
        started = time.perf_counter()
        train_set, _, workers = load_data(params, classes, device, Dist())
        prepare = time.perf_counter() - started
        loader = make_loader(train_set, batch, shuffle=True, workers=workers, pin_memory=device.type == "cuda",
                             drop_last=True)
        steps = len(loader)
        for _ in loader:  # start the workers, warm the page cache
            pass
        loader_only = steps * batch / timed(lambda: [None for _ in loader], device)
        epoch(loader)  # the loader's first real epoch feeding the model
        real = steps * batch / timed(lambda: epoch(loader, 1), device)
    print(f"synthetic {synthetic:.0f} img/s | real loader + training {real:.0f} img/s | "
          f"loader alone {loader_only:.0f} img/s ({workers} workers, {len(paths)} images per epoch, "
          f"cached: {train_set.images is not None}, caching took {prepare:.1f}s)")
    print(f"real/synthetic = {real / synthetic:.3f}" + (
        "   (loader-bound: more CPU cores or workers)" if loader_only < synthetic else ""))


if __name__ == "__main__":
    main()
