"""Training throughput: the train stage's own loop against a bare loop and a plain fp32 loop.

    dvc repro classes                       # the manifest the stage reads
    python -m benchmarks.train_throughput   # params.yaml's settings; --repeats/--arch/--image-size/--batch-size

- stage: src/train.py's load_data, make_loader and train_one_epoch: the real images from disk
  through the stage's loader (decoding cached per train.cache_images, augmentation, batching),
  its precision, channels_last, grad scaler, scheduler and bookkeeping.
- bare: the same model, optimizer, precision and memory format over the same number of images
  already in memory as one tensor: forward, backward, step, nothing else.
- fp32: the bare loop in plain fp32, contiguous (NCHW) memory.
- unfused: the bare loop with torch's default optimizer step (a dozen ops per tensor) instead of
  the fused one the stage takes: what the fused step buys.

Each repeat runs one epoch of each, interleaved, after one warm-up epoch each (oneDNN/cuDNN pick
kernels on first use); the median img/s is reported. The machine's other load shows up as noise:
compare the ratios, which are measured side by side.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from src.core import process
from src.core.device import pick_device
from src.core.params import load_params
from src.data.loaders import make_loader
from src.data.manifest import load_class_names
from src.networks.transfer import create_model
from src.train import load_data, run_settings
from src.training.distributed import Dist
from src.training.schedule import EpochPlan
from src.training.trainer import make_optimizer, make_trainer, train_one_epoch


def fresh_model(params, num_classes, device, channels_last):
    torch.manual_seed(params["seed"])
    model = create_model(params, num_classes).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def bare_epoch(model, optimizer, criterion, images, labels, batch_size, run):
    model.train()
    device = run.device
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(device, non_blocking=True), labels[i:i + batch_size].to(device)
        with run.autocast():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--precision", help="train.precision to use (auto, fp32, bf16, fp16)")
    parser.add_argument("--channels-last", choices=["auto", "true", "false"])
    args = parser.parse_args()
    params = load_params()
    process.start()  # as the stage does
    params["arch"] = args.arch or params["arch"]
    params["data"]["image_size"] = args.image_size or params["data"]["image_size"]
    cfg = params["train"]
    cfg["batch_size"] = args.batch_size or cfg["batch_size"]
    cfg["precision"] = args.precision or cfg["precision"]
    if args.channels_last:
        cfg["channels_last"] = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    size = params["data"]["image_size"]

    device = pick_device(cfg["device"])
    run, _ = run_settings(params, device)
    channels_last = run.channels_last
    class_names = load_class_names()
    started = time.perf_counter()
    train_set, _, workers = load_data(params, class_names, device, Dist())
    prepare_seconds = time.perf_counter() - started
    loader = make_loader(train_set, cfg["batch_size"], shuffle=True, workers=workers,
                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    # The bare loops' images: the same dataset, augmented and normalised once, held as one tensor.
    cpu_run, _ = run_settings(params, torch.device("cpu"))
    images = cpu_run.input(torch.stack([train_set[i][0] for i in range(len(train_set))]))
    labels = torch.tensor(train_set.labels)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])

    stage_model = fresh_model(params, len(class_names), device, channels_last)
    trainer = make_trainer(stage_model, cfg, len(loader), run, EpochPlan(cfg), train_set.labels, len(class_names))
    bare_model = fresh_model(params, len(class_names), device, channels_last)
    bare_opt = make_optimizer(bare_model, cfg)
    fp32_model = fresh_model(params, len(class_names), device, False)
    fp32_opt = make_optimizer(fp32_model, cfg)
    unfused_model = fresh_model(params, len(class_names), device, channels_last)
    unfused_opt = make_optimizer(unfused_model, cfg, fused=False)

    runs = {
        "stage": lambda epoch: train_one_epoch(stage_model, loader, trainer, run, epoch, show_progress=False),
        "bare": lambda epoch: bare_epoch(bare_model, bare_opt, criterion, images, labels, cfg["batch_size"], run),
        "fp32": lambda epoch: bare_epoch(fp32_model, fp32_opt, criterion, images, labels, cfg["batch_size"],
                                         run._replace(amp_dtype=None)),
        "unfused": lambda epoch: bare_epoch(unfused_model, unfused_opt, criterion, images, labels, cfg["batch_size"],
                                            run),
    }
    print(f"{params['arch']} at {size} px, batch {cfg['batch_size']}, {len(train_set)} images per epoch, "
          f"{device} {run.precision_name}{' channels_last' if channels_last else ''}, "
          f"{torch.get_num_threads()} threads, loader workers {workers}, "
          f"images cached: {train_set.images is not None} (decoding took {prepare_seconds:.1f}s once)")
    for fn in runs.values():
        fn(0)  # warm-up
    rates = {name: [] for name in runs}
    for repeat in range(1, args.repeats + 1):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(repeat)
            rates[name].append(len(train_set) / (time.perf_counter() - t))
        print(f"repeat {repeat}: " + ", ".join(f"{n} {r[-1]:.0f} img/s" for n, r in rates.items()))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print("median: " + ", ".join(f"{n} {v:.0f} img/s" for n, v in median.items()))
    print(f"stage/bare = {median['stage'] / median['bare']:.3f}   "
          f"stage/fp32 = {median['stage'] / median['fp32']:.3f}   "
          f"bare/unfused = {median['bare'] / median['unfused']:.3f}")


if __name__ == "__main__":
    main()
