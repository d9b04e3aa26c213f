"""Stage `train`: fit `arch` on the train split, keep the best-val-accuracy weights.

Writes models/model.pt (best epoch, self-describing), metrics/train.json,
metrics/train_history.csv (one row per epoch, for `dvc plots`), and one MLflow run.

models/resume.pt holds the last completed epoch: weights plus everything to continue
(optimizer, scheduler, grad scaler, RNG states, best-so-far, history, MLflow run id). It is
not a DVC output, so DVC does not delete it before rerunning a stage that was killed; a rerun
with the same params and data continues from it. It is marked finished when training ends.

Distributed: `torchrun --nproc_per_node=N -m src.train` trains with DistributedDataParallel;
train.batch_size stays the global batch (split across processes); rank 0 alone writes and logs.
"""
import contextlib
import copy
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from src import tracking
from src.checkpoint import (describe, fingerprint, load_resume, rng_state, save_checkpoint, set_rng_state,
                            weights)
from src.classes import CLASS_INDEX, MANIFEST, load_class_names, read_manifest
from src.common import UserError, read_json, run_stage, write_json, write_text
from src.data import ImageListDataset, default_workers, make_loader, resize_size, rows_for, train_transform
from src.device import (autocast, configure, init_distributed, keep_freed_memory, pick_device, pick_precision,
                        use_channels_last)
from src.inference import ImageFiles, classify_files, norm_tensors, to_input
from src.networks import create_model, preprocessing, set_transfer_phase
from src.params import load_params

MODEL_PATH = Path("models/model.pt")
RESUME_PATH = Path("models/resume.pt")
METRICS_PATH = Path("metrics/train.json")
HISTORY_PATH = Path("metrics/train_history.csv")
DATA_REPORT = Path("metrics/data_report.json")
CACHE_LIMIT = 20_000  # cache decoded images in memory below this many (train.cache_images=auto)
# Tests only: "EPOCH:BATCH" makes the stage SIGKILL itself there, to prove resuming works.
KILL_AT = os.environ.get("RESNET_TL_TEST_KILL_AT")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def load_data(params, class_names, device, processes_per_machine=1):
    """(train dataset, val images and labels, loader workers).

    The val images are read exactly as evaluate reads them (`ImageFiles`), so the val accuracy
    that picks the best epoch is the one evaluate reports for these weights on the same split.
    """
    data, cfg = params["data"], params["train"]
    rows = read_manifest()
    train_paths, train_labels = rows_for(rows, "train", class_names)
    val_paths, val_labels = rows_for(rows, "val", class_names)
    cache = cfg["cache_images"]
    if cache == "auto":
        cache = len(train_paths) + len(val_paths) <= CACHE_LIMIT
    side = resize_size(data["image_size"])
    train_set = ImageListDataset(train_paths, train_labels,
                                 train_transform(data["image_size"], cfg["crop_scale"], cfg["hflip"]), cache, side)
    val = (ImageFiles(val_paths, data["image_size"], keep=cache), torch.tensor(val_labels, dtype=torch.long))
    return train_set, val, loader_workers(cfg["workers"], cache, device, processes_per_machine)


def loader_workers(choice, cached, device, processes_per_machine=1):
    """Decoding/augmenting processes. With cached images and a CPU model, none: the model's
    threads use every core, and a worker would only steal one. A GPU leaves the CPU idle, so
    workers augment there even from the cache (a 224 px crop costs ~1 ms: one process can't
    feed a GPU)."""
    if choice != "auto":
        return choice
    return 0 if cached and device.type == "cpu" else default_workers(processes_per_machine)


def make_optimizer(model, cfg):
    decay, no_decay = [], []
    # Frozen parameters are included too: head_first unfreezes them later, and optimizers
    # skip parameters that got no gradient.
    for p in model.parameters():
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


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, amp_dtype, channels_last,
                    norm, grad_clip, epoch, show_progress=True):
    model.train()
    # Sums stay on the device: reading them every batch would stall a GPU's queue (so would
    # making a tensor from a Python number there: it waits for the queue to drain).
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    seen = 0
    check_every = 1 if device.type == "cpu" else 50  # a non-finite check syncs a GPU
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
               disable=not show_progress)
    for step, (images, labels) in enumerate(bar, 1):
        if KILL_AT == f"{epoch}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        images = to_input(images, device, norm, channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        totals += torch.stack([loss.detach().double() * labels.size(0), (logits.argmax(1) == labels).sum().double()])
        seen += labels.size(0)
        if step % check_every == 0 or step == len(loader):
            loss_sum, correct = totals.tolist()
            if not math.isfinite(loss_sum):
                raise UserError(f"training diverged: loss is {loss_sum} at epoch {epoch}; lower train.lr, "
                                f"or set train.precision=fp32 if it happens under bf16/fp16")
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    totals = torch.cat([totals, torch.tensor([seen], dtype=torch.float64, device=device)])
    if torch_dist.is_initialized():
        torch_dist.all_reduce(totals)  # every rank's share of the epoch
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / seen, correct / seen


def evaluate(model, info, val, device, batch_size):
    """(val loss, val accuracy) through evaluate's own path (`classify_files`: its decoding, its
    inference rewrites, its precision rule), on a copy so the training model keeps its state.
    The loss is plain cross-entropy in float64, as evaluate reports it (no label smoothing)."""
    files, labels = val
    logits, errors = classify_files(copy.deepcopy(model), info, files, device, batch_size,
                                    workers=0 if files.kept is not None else "auto", desc="validate")
    bad = next((f"{path}: {error}" for path, error in zip(files.paths, errors) if error), None)
    if bad:
        raise UserError(f"{bad}; fix or remove it and rerun `dvc repro`")
    loss = F.cross_entropy(logits.double(), labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item()


def main():
    keep_freed_memory()  # big batches reuse freed memory instead of faulting in fresh pages
    params = load_params()
    cfg = params["train"]
    device = pick_device(cfg["device"])
    dist, device = init_distributed(device)
    configure(device, cfg["deterministic"])
    torch.manual_seed(params["seed"] + dist.rank)  # each rank its own augmentations
    class_names = load_class_names()
    amp_dtype = pick_precision(cfg["precision"], device, params["data"]["image_size"])
    channels_last = use_channels_last(cfg["channels_last"], device, params["data"]["image_size"])
    model = create_model(params, len(class_names)).to(device)
    norm = preprocessing(params)
    norm_batch = norm_tensors(norm["mean"], norm["std"], device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size > 1 and cfg["batch_size"] % dist.world_size:
        raise UserError(f"train.batch_size={cfg['batch_size']} is the global batch and must divide evenly "
                        f"over {dist.world_size} processes; use a multiple of {dist.world_size}")

    data_report = read_json(DATA_REPORT)
    run_fingerprint = fingerprint(params, [MANIFEST, CLASS_INDEX, DATA_REPORT], dist.world_size)
    resume = load_resume(RESUME_PATH, run_fingerprint)
    train_set, val, workers = load_data(params, class_names, device, dist.local_world_size)
    pin = device.type == "cuda"
    batch_size = cfg["batch_size"] // dist.world_size
    generator = torch.Generator().manual_seed(params["seed"])
    sampler = DistributedSampler(train_set, seed=params["seed"]) if dist.world_size > 1 else None
    # A last batch of one image would crash BatchNorm in training mode.
    lone_last = len(sampler or train_set) % batch_size == 1
    train_loader = make_loader(train_set, batch_size, shuffle=True, workers=workers, pin_memory=pin,
                               sampler=sampler, generator=generator, drop_last=lone_last)

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    # Loss scaling keeps fp16 gradients from underflowing; bf16 and fp32 have the range and skip it.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history, best, bad_epochs, run_id, start = [], {"val_acc": -1.0, "epoch": 0}, 0, None, 1
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        generator.set_state(resume["loader_generator"])
        set_rng_state(resume["rng"][dist.rank])
        history, best, bad_epochs = resume["history"], resume["best"], resume["bad_epochs"]
        run_id, start = resume["mlflow_run_id"], resume["epoch"] + 1

    def wrap(model):
        """DDP (under torchrun) and torch.compile around the bare model. DDP registers only the
        parameters that need gradients when it wraps, so it is rebuilt when head_first unfreezes."""
        if dist.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(model) if cfg["compile"] else model

    model_without_ddp = model
    train_model = wrap(model_without_ddp)

    if dist.is_main:
        # A kill during a checkpoint write leaves its half-written temporary file behind.
        for stale in [*MODEL_PATH.parent.glob(f".{MODEL_PATH.name}.*.tmp"),
                      *RESUME_PATH.parent.glob(f".{RESUME_PATH.name}.*.tmp")]:
            stale.unlink()
        print(f"train: {params['arch']} on {device} ({PRECISION_NAMES[amp_dtype]}"
              f"{', channels_last' if channels_last else ''}"
              f"{f', {dist.world_size} processes' if dist.world_size > 1 else ''}), {len(train_set)} train / "
              f"{len(val[1])} val images, {len(class_names)} classes")
        if resume:
            print(f"train: resuming after epoch {resume['epoch']} from {RESUME_PATH}")
    checkpoint_info = describe(params, class_names, norm)
    best_weights = resume["best_model"] if resume else None
    previous_weights = resume["model"] if resume else None
    last = resume  # killed after the final epoch's save: only the summary is left to write

    started = time.time()
    # Opened before the first epoch so an unreachable tracking server fails fast.
    with (tracking.start_training_run(params, data_report["dataset_digest"], run_id=run_id)
          if dist.is_main else contextlib.nullcontext()) as run:
        if dist.is_main and resume:
            # DVC deleted the declared outputs before this rerun: put the best weights back.
            save_checkpoint(MODEL_PATH, {**checkpoint_info, "epoch": best["epoch"], "val_acc": best["val_acc"],
                                         "mlflow_run_id": run.info.run_id,
                                         "model": best_weights or resume["model"]})
        for epoch in range(start, cfg["epochs"] + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            if set_transfer_phase(model_without_ddp, params["model"], epoch):  # head_first: unfreeze now
                train_model = wrap(model_without_ddp)
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(train_model, train_loader, criterion, optimizer, scheduler,
                                                    scaler, device, amp_dtype, channels_last, norm_batch,
                                                    cfg["grad_clip"], epoch, show_progress=dist.is_main)
            # Every rank evaluates the whole (small) val set with identical weights, so all
            # ranks agree on early stopping without another collective.
            sync_buffers(model_without_ddp)
            val_loss, val_acc = evaluate(model_without_ddp, checkpoint_info, val, device, cfg["batch_size"])
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr}
            history.append(row)
            if val_acc > best["val_acc"]:
                best, bad_epochs = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}, 0
            else:
                bad_epochs += 1
            stop = cfg["patience"] > 0 and bad_epochs >= cfg["patience"]
            rngs = gather_rng_states(dist)
            if dist.is_main:
                tracking.log_epoch(row)
                print(f"epoch {epoch}/{cfg['epochs']}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                      f"val loss {val_loss:.4f} acc {val_acc:.4f}")
                last_weights = weights(model_without_ddp)
                if best["epoch"] == epoch:
                    best_weights = None  # the last weights are the best: stored once
                    save_checkpoint(MODEL_PATH, {**checkpoint_info, "epoch": epoch, "val_acc": val_acc,
                                                 "mlflow_run_id": run.info.run_id, "model": last_weights})
                elif best_weights is None:
                    best_weights = previous_weights  # the best epoch was the one before
                previous_weights = last_weights
                last = {**checkpoint_info, "epoch": epoch, "val_acc": val_acc, "model": last_weights,
                        "fingerprint": run_fingerprint, "finished": False, "mlflow_run_id": run.info.run_id,
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "loader_generator": generator.get_state(), "rng": rngs,
                        "history": history, "best": best, "bad_epochs": bad_epochs, "best_model": best_weights}
                save_checkpoint(RESUME_PATH, last)
            if stop:
                if dist.is_main:
                    print(f"train: early stop, no val improvement for {bad_epochs} epochs")
                break
        if dist.is_main:
            seconds = time.time() - started
            metrics = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                       "best_val_loss": best["val_loss"], "final_train_acc": history[-1]["train_acc"],
                       "epochs_run": len(history), "train_seconds": round(seconds, 1)}
            tracking.finish_training(metrics, history, MODEL_PATH, [CLASS_INDEX, DATA_REPORT],
                                     params["mlflow"]["register_model"])
            write_json(METRICS_PATH, metrics)
            header = list(history[0])
            write_text(HISTORY_PATH, ",".join(header) + "\n" + "".join(
                ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in header) + "\n"
                for r in history))
            # Kept as the last epoch's checkpoint, never resumed: `dvc repro -f` retrains from scratch.
            save_checkpoint(RESUME_PATH, {**last, "finished": True})
    if dist.is_main:
        print(f"train: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} -> {MODEL_PATH} "
              f"({seconds:.0f}s)")
    if torch_dist.is_initialized():
        check_ranks_agree(model_without_ddp)
        print(f"train: rank {dist.rank} of {dist.world_size} trained {len(history) - (start - 1)} epochs "
              f"on its {len(sampler)} of {len(train_set)} train images")
        torch_dist.destroy_process_group()


def check_ranks_agree(model):
    """Every rank must end with the same weights; a parameter DDP did not sync would drift apart."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    totals = [torch.zeros_like(total) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(totals, total)
    if not all(torch.allclose(t, totals[0], rtol=1e-9, atol=0.0) for t in totals):
        raise UserError(f"distributed training went out of sync: the ranks' weights sum to "
                        f"{[t.item() for t in totals]}; please report this with your params.yaml")


def sync_buffers(model):
    """BatchNorm running stats from rank 0 to all: DDP syncs weights, each rank's buffers drift."""
    if torch_dist.is_initialized():
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, 0)


def gather_rng_states(dist):
    """Every rank's RNG state, in rank order, so a resume restores each rank's own stream."""
    if not torch_dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, rng_state())
    return states


if __name__ == "__main__":
    run_stage(main)
