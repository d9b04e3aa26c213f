"""Stage `train`: fit `arch` on the train split, keep the best-val-accuracy weights.

Writes models/model.pt (best epoch, self-describing), metrics/train.json,
metrics/train_history.csv (one row per epoch, for `dvc plots`), and one MLflow run.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from src import tracking
from src.checkpoint import save_checkpoint
from src.classes import CLASS_INDEX, load_class_names, read_manifest
from src.common import UserError, read_json, run_stage, write_json, write_text
from src.data import (ImageListDataset, default_workers, eval_transform,
                      make_loader, resize_size, rows_for, train_transform)
from src.device import autocast, pick_device, pick_precision, use_channels_last
from src.inference import predict_logits
from src.networks import create_model, preprocessing, set_transfer_phase
from src.params import load_params

MODEL_PATH = Path("models/model.pt")
METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/train_history.csv")
DATA_REPORT = Path("metrics/data_report.json")
CACHE_LIMIT = 20_000  # cache decoded images in memory below this many (train.cache_images=auto)


def load_data(params, class_names, norm):
    data, cfg = params["data"], params["train"]
    rows = read_manifest()
    train_paths, train_labels = rows_for(rows, "train", class_names)
    val_paths, val_labels = rows_for(rows, "val", class_names)
    cache = cfg["cache_images"]
    if cache == "auto":
        cache = len(train_paths) + len(val_paths) <= CACHE_LIMIT
    side = resize_size(data["image_size"])
    train_set = ImageListDataset(train_paths, train_labels, train_transform(
        data["image_size"], cfg["crop_scale"], cfg["hflip"], norm["mean"], norm["std"]), cache, side)
    val_set = ImageListDataset(val_paths, val_labels, eval_transform(data["image_size"], norm["mean"], norm["std"]),
                               cache, side)
    workers = cfg["workers"] if cfg["workers"] != "auto" else (0 if cache else default_workers())
    return train_set, val_set, workers


def make_optimizer(model, cfg):
    decay, no_decay = [], []
    # Frozen parameters are included too: head_first unfreezes them later, and optimizers
    # skip parameters that got no gradient.
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 and not cfg["decay_bn_and_bias"] else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["optimizer"]]
    return optimizer_class(groups, lr=cfg["lr"])


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """Stepped once per batch, so warmup and cosine are smooth even over few epochs."""
    total = cfg["epochs"] * steps_per_epoch
    warmup = cfg["warmup_epochs"] * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg["scheduler"] == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg["scheduler"] == "step":
            return cfg["gamma"] ** ((step // steps_per_epoch) // cfg["step_size"])
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, amp_dtype, channels_last,
                    grad_clip, epoch):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, labels)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged: loss is {loss.item()} at epoch {epoch}; lower train.lr, "
                            f"or set train.precision=fp32 if it happens under bf16/fp16")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * labels.size(0)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.size(0)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    return total_loss / seen, correct / seen


def evaluate(model, loader, criterion, device, amp_dtype, channels_last):
    logits, labels = predict_logits(model, loader, device, amp_dtype, channels_last)
    return criterion(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def main():
    params = load_params()
    cfg = params["train"]
    torch.manual_seed(params["seed"])
    class_names = load_class_names()
    device = pick_device(cfg["device"])
    amp_dtype = pick_precision(cfg["precision"], device, params["data"]["image_size"])
    channels_last = use_channels_last(cfg["channels_last"], device, params["data"]["image_size"])
    model = create_model(params, len(class_names)).to(device)
    norm = preprocessing(params)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    data_report = read_json(DATA_REPORT)
    train_set, val_set, workers = load_data(params, class_names, norm)
    pin = device.type == "cuda"
    generator = torch.Generator().manual_seed(params["seed"])
    train_loader = make_loader(train_set, cfg["batch_size"], shuffle=True, workers=workers, pin_memory=pin,
                               generator=generator)
    val_loader = make_loader(val_set, cfg["batch_size"], workers=workers, pin_memory=pin)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    print(f"train: {params['arch']} on {device} ({amp_dtype or 'fp32'}), {len(train_set)} train / "
          f"{len(val_set)} val images, {len(class_names)} classes")

    history, best = [], {"val_acc": -1.0, "epoch": 0}
    started = time.time()
    # Opened before the first epoch so an unreachable tracking server fails fast.
    with tracking.start_training_run(params, data_report["dataset_digest"]) as run:
        for epoch in range(1, cfg["epochs"] + 1):
            set_transfer_phase(model, params["model"], epoch)  # head_first: unfreeze after model.head_epochs
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                                                    amp_dtype, channels_last, cfg["grad_clip"], epoch)
            val_loss, val_acc = evaluate(model, val_loader, criterion, device, amp_dtype, channels_last)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr}
            history.append(row)
            tracking.log_epoch(row)
            print(f"epoch {epoch}/{cfg['epochs']}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f}")
            if val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}
                save_checkpoint(MODEL_PATH, {
                    "arch": params["arch"], "num_classes": len(class_names), "class_names": class_names,
                    "image_size": params["data"]["image_size"], "mean": norm["mean"],
                    "std": norm["std"], "epoch": epoch, "val_acc": val_acc, "params": params,
                    "mlflow_run_id": run.info.run_id,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                })
        seconds = time.time() - started
        metrics = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
                   "final_train_acc": history[-1]["train_acc"], "epochs_run": len(history),
                   "train_seconds": round(seconds, 1)}
        tracking.finish_training(metrics, history, MODEL_PATH, [CLASS_INDEX, DATA_REPORT],
                                 params["mlflow"]["register_model"])
        write_json(METRICS_PATH, metrics)
        header = list(history[0])
        write_text(HISTORY_PATH, ",".join(header) + "\n" + "".join(
            ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in header) + "\n"
            for r in history))
    print(f"train: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} -> {MODEL_PATH} "
          f"({seconds:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
