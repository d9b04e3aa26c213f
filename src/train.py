"""Stage `train`: fit `arch` on the train split, keep the best-val-accuracy weights.

Writes models/model.pt (best epoch, self-describing), metrics/train.json,
metrics/train_history.csv (one row per epoch, for `dvc plots`), and one MLflow run.
Each epoch's val accuracy is measured exactly as the evaluate stage measures it.

models/resume.pt holds the last completed epoch (`src.checkpoint.Progress`): a rerun with the
same params and data continues from it after a crash or a kill.

Distributed: `torchrun --nproc_per_node=N -m src.train` trains with DistributedDataParallel;
train.batch_size stays the global batch (split across processes); rank 0 alone writes and logs.
"""
import contextlib
import copy
import math
import os
import signal
import statistics
import time
from typing import NamedTuple

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from src import runtime, tracking
from src.classes import load_class_names, read_manifest
from src.common import UserError, read_json, run_stage, write_json, write_text
from src.data import ImageListDataset, make_loader, rows_for, train_transform
from src.device import (Normalizer, RunSettings, configure, init_distributed, pick_device, pick_precision,
                        use_channels_last)
from src.inference import ImageFiles, classify_files
from src.networks import create_model, normalization, set_transfer_phase
from src.params import load_params
from src.pixels import resize_size
from src.paths import CLASS_INDEX, DATA_REPORT, TRAIN_HISTORY, TRAIN_METRICS
from src.resume import Progress, rng_state

CACHE_LIMIT = 20_000  # cache decoded images in memory below this many (train.cache_images=auto)
# Tests only: "EPOCH:BATCH" makes the stage SIGKILL itself there, to prove resuming works.
KILL_AT = os.environ.get("RESNET_TL_TEST_KILL_AT")


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
    augment = train_transform(data["image_size"], cfg["crop_scale"], cfg["hflip"], cfg["augment"],
                              cfg["random_erasing"])
    train_set = ImageListDataset(train_paths, train_labels, augment, cache, side)
    val = (ImageFiles(val_paths, data["image_size"], keep=cache), torch.tensor(val_labels, dtype=torch.long))
    return train_set, val, loader_workers(cfg["workers"], cache, device, processes_per_machine)


def loader_workers(choice, cached, device, processes_per_machine=1):
    """Decoding/augmenting processes. With cached images and a CPU model, none: the model's
    threads use every core, and a worker would only steal one. A GPU leaves the CPU idle, so
    workers augment there even from the cache (one process can't augment as fast as a GPU trains)."""
    if choice != "auto":
        return choice
    return 0 if cached and device.type == "cpu" else runtime.default_workers(processes_per_machine)


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


RAMP = 0.75  # progressive resizing reaches data.image_size after this fraction of the epochs


class EpochPlan:
    """How many epochs to train, and each one's crop size.

    The count is train.epochs, or, with train.time_budget (minutes), as many as fit in it:
    planned after every epoch from the measured epoch times, validation included (the first
    epoch, slower while kernels warm up, only until others exist), so the cosine schedule is
    stretched to end when the time does. Until the first plan the schedule holds its starting
    rate. With train.start_image_size (progressive resizing), crops grow linearly from it to
    data.image_size over the first RAMP of the epochs: early epochs are cheap, and the last ones
    train at the size evaluate sees. The plan then counts an epoch's cost as its pixels."""

    def __init__(self, cfg, history=(), image_size=None):
        self.budget = cfg["time_budget"] * 60
        self.epochs = None if self.budget else cfg["epochs"]
        start = cfg.get("start_image_size") or image_size
        self.sizes = (min(start, image_size), image_size) if image_size else (None, None)
        self.durations = []  # seconds per epoch at full size
        self.size = None  # the crop size trained last
        if history:  # a resumed run keeps its plan until the next epoch re-plans it
            self.epochs, self.size = history[-1]["planned_epochs"], history[-1].get("image_size")

    def elapsed_before(self, history):
        return history[-1]["seconds"] if history else 0.0

    def image_size(self, epoch, epochs=None):
        """This epoch's training crop (of `epochs` planned; default: the current plan), in steps
        of 8 px so that few distinct shapes occur (kernels are picked per shape)."""
        start, final = self.sizes
        epochs = epochs or self.epochs
        if final is None or start >= final:
            return final
        if not epochs:
            return start
        fraction = 1.0 if epochs == 1 else min(1.0, (epoch - 1) / max(1.0, RAMP * epochs - 1))
        return final if fraction == 1 else max(start, int(start + fraction * (final - start)) // 8 * 8)

    def size_for(self, epoch):
        """The crop size this epoch trains at: the schedule's, but never below the last epoch's
        (a plan that grows stretches the ramp, which would otherwise shrink the crops again)."""
        self.size = max(self.size or 0, self.image_size(epoch)) if self.sizes[1] else None
        return self.size

    def cost(self, epoch, epochs=None):
        """An epoch's share of a full-size epoch's time: its pixels per image."""
        return (self.image_size(epoch, epochs) / self.sizes[1]) ** 2 if self.sizes[1] else 1.0

    def update(self, epoch, duration, elapsed):
        if not self.budget:
            return
        self.durations.append(duration * (self.sizes[1] / self.size) ** 2 if self.size else duration)
        per_epoch = statistics.median(self.durations[1:][-3:] or self.durations)
        plan = [epoch + self.epochs_that_fit(epoch, (self.budget - elapsed) / per_epoch)]
        if torch_dist.is_initialized():  # clocks differ a little: every rank follows rank 0's plan
            torch_dist.broadcast_object_list(plan, src=0)
        self.epochs = plan[0]

    def epochs_that_fit(self, done, full_epochs):
        """How many more epochs fit in the time of `full_epochs` full-size ones (to the nearest)."""
        if self.sizes[0] == self.sizes[1]:
            return max(0, round(full_epochs))

        def fits(n):
            return sum(self.cost(e, done + n) for e in range(done + 1, done + n + 1)) <= full_epochs + 0.5

        low, high = 0, int((full_epochs + 1) * (self.sizes[1] / self.sizes[0]) ** 2) + 1  # none beyond high fits
        while low < high:  # the cost of n more epochs grows with n: bisect
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def more(self, epoch):
        return self.epochs is None or epoch <= self.epochs


def make_scheduler(optimizer, cfg, steps_per_epoch, plan):
    """Stepped once per batch, so warmup and cosine are smooth even over few epochs."""
    warmup = cfg["warmup_epochs"] * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg["scheduler"] == "cosine":
            total = plan.epochs * steps_per_epoch if plan.epochs else step + 1  # not planned yet: no decay
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg["scheduler"] == "step":
            return cfg["gamma"] ** ((step // steps_per_epoch) // cfg["step_size"])
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer(NamedTuple):
    """What one optimisation step needs besides the model and the batch."""
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a no-op for bf16 and fp32
    grad_clip: float
    mix: object = None  # MixUp / CutMix on the normalised batch: (images, labels) -> (images, soft targets)
    ema: "WeightEma" = None  # the weights' exponential moving average: what is validated and saved

    def step(self, model, images, labels, run):
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        with run.autocast():
            logits = model(images)
            loss = self.criterion(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(model)
        return loss, logits

    def scored(self, model):
        """The weights that are validated, chosen as best and saved."""
        return self.ema.module if self.ema is not None else model


class WeightEma(AveragedModel):
    """The weights' exponential moving average (torch.optim.swa_utils), BatchNorm statistics
    included: averaged <- decay * averaged + (1 - decay) * current after every step. The decay
    warms up as (1 + n) / (10 + n) over the first updates (timm's rule), so that a short run's
    average is not dominated by its random initial weights."""

    def __init__(self, model, decay):
        super().__init__(model, multi_avg_fn=self.blend, use_buffers=True)
        self.decay, self.updates, self.decay_now = decay, 0, decay

    def update_parameters(self, model):
        self.decay_now = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1  # counted here: blend runs once per dtype group
        super().update_parameters(model)

    def load_state_dict(self, state, *args, **kwargs):
        result = super().load_state_dict(state, *args, **kwargs)
        self.updates = int(self.n_averaged)
        return result

    def blend(self, averaged, current, num_averaged):
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - self.decay_now)
        else:  # BatchNorm's batch counters: the current count
            for a, c in zip(averaged, current):
                a.copy_(c)


def class_weights(labels, n_classes):
    """scikit-learn's "balanced" weights: n / (classes * count), 1 for every class when balanced."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).double()
    return (len(labels) / (n_classes * counts.clamp(min=1))).float()


def make_mix(cfg, n_classes):
    """MixUp and/or CutMix (torchvision.transforms.v2), one of them per batch; None when both are off."""
    mixes = ([v2.MixUp(alpha=cfg["mixup"], num_classes=n_classes)] if cfg["mixup"] > 0 else []) + \
            ([v2.CutMix(alpha=cfg["cutmix"], num_classes=n_classes)] if cfg["cutmix"] > 0 else [])
    return v2.RandomChoice(mixes) if mixes else None


def make_trainer(model, cfg, steps_per_epoch, run, plan, train_labels, n_classes):
    optimizer = make_optimizer(model, cfg)
    weight = class_weights(train_labels, n_classes).to(run.device) if cfg["class_balance"] == "loss" else None
    ema = WeightEma(model, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    return Trainer(nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg["label_smoothing"]), optimizer,
                   make_scheduler(optimizer, cfg, steps_per_epoch, plan),
                   torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16), cfg["grad_clip"],
                   make_mix(cfg, n_classes), ema)


def train_one_epoch(model, loader, trainer, run, epoch, show_progress=True):
    """(mean loss, accuracy) over one pass of `loader`, all processes together."""
    model.train()
    # Sums stay on the device: reading them every batch would stall a GPU's queue (so would
    # making a tensor from a Python number there: it waits for the queue to drain).
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, correct
    seen = 0
    check_every = 1 if run.device.type == "cpu" else 50  # a non-finite check syncs a GPU
    # A bar when a person watches (a terminal); logs get the one line per epoch that main prints.
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    for step, (images, labels) in enumerate(bar, 1):
        if KILL_AT == f"{epoch}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        labels = labels.to(run.device, non_blocking=True)
        loss, logits = trainer.step(model, run.input(images), labels, run)
        totals += torch.stack([loss.detach().double() * labels.size(0), (logits.argmax(1) == labels).sum().double()])
        seen += labels.size(0)
        if step % check_every == 0 or step == len(loader):
            loss_sum, correct = totals.tolist()
            if not math.isfinite(loss_sum):
                raise UserError(f"training diverged: loss is {loss_sum} at epoch {epoch}; lower train.lr, "
                                f"or set train.precision=fp32 if it happens under bf16/fp16")
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    totals = torch.cat([totals, torch.tensor([seen], dtype=torch.float64, device=run.device)])
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


def run_settings(params, device):
    """How this run's training tensors go: device, precision, memory format, normalisation."""
    cfg, size = params["train"], params["data"]["image_size"]
    mean_std = normalization(params)
    return RunSettings(device, pick_precision(cfg["precision"], device, size),
                       use_channels_last(cfg["channels_last"], device, size),
                       Normalizer(mean_std["mean"], mean_std["std"], device)), mean_std


def train_loader(params, train_set, workers, dist, device):
    """Shuffled batches of this process's share; (loader, sampler or None, shuffling generator)."""
    cfg = params["train"]
    if cfg["batch_size"] % dist.world_size:
        raise UserError(f"train.batch_size={cfg['batch_size']} is the global batch and must divide evenly "
                        f"over {dist.world_size} processes; use a multiple of {dist.world_size}")
    batch_size = cfg["batch_size"] // dist.world_size
    generator = torch.Generator().manual_seed(params["seed"])
    sampler = None
    if dist.world_size > 1:
        if cfg["class_balance"] == "sampler":
            raise UserError("train.class_balance=sampler is single-process; under torchrun use "
                            "train.class_balance=loss")
        sampler = DistributedSampler(train_set, seed=params["seed"])
    elif cfg["class_balance"] == "sampler":  # every class equally likely per draw, an epoch's worth of draws
        counts = torch.bincount(torch.as_tensor(train_set.labels)).double()
        sampler = WeightedRandomSampler(1 / counts[train_set.labels], len(train_set), generator=generator)
    lone_last = len(sampler or train_set) % batch_size == 1  # a batch of one would crash BatchNorm
    # Workers that outlive an epoch would keep their crop size: progressive resizing restarts them.
    loader = make_loader(train_set, batch_size, shuffle=True, workers=workers, pin_memory=device.type == "cuda",
                         sampler=sampler, generator=generator, drop_last=lone_last,
                         persistent=not cfg["start_image_size"])
    return loader, sampler, generator


def main():
    runtime.start()
    params = load_params()
    cfg = params["train"]
    dist, device = init_distributed(pick_device(cfg["device"]))
    configure(device, cfg["deterministic"])
    torch.manual_seed(params["seed"] + dist.rank)  # each rank its own augmentations
    class_names = load_class_names()
    run, mean_std = run_settings(params, device)
    model = create_model(params, len(class_names)).to(device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, val, workers = load_data(params, class_names, device, dist.local_world_size)
    loader, sampler, generator = train_loader(params, train_set, workers, dist, device)
    progress = Progress(params, class_names, mean_std, dist)
    plan = EpochPlan(cfg, progress.resumed["history"] if progress.resumed else (), params["data"]["image_size"])
    trainer = make_trainer(model, cfg, len(loader), run, plan, train_set.labels, len(class_names))
    progress.restore(model, trainer, generator)

    def wrap(model):
        """DDP (under torchrun) and torch.compile around the bare model. DDP registers only the
        parameters that need gradients when it wraps, so it is rebuilt when head_first unfreezes."""
        if dist.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(model) if cfg["compile"] else model

    train_model = wrap(model)
    if dist.is_main:
        layout = ", channels_last" if run.channels_last else ""
        print(f"train: {params['arch']} on {device} ({run.precision_name}{layout}"
              f"{f', {dist.world_size} processes' if dist.world_size > 1 else ''}), {len(train_set)} train / "
              f"{len(val[1])} val images, {len(class_names)} classes" + progress.resuming_note())
    # The clock of train.time_budget and train_seconds; a resumed run adds the time it had.
    started = time.time() - plan.elapsed_before(progress.history)
    # Opened before the first epoch so an unreachable tracking server fails fast.
    with (tracking.start_training_run(params, read_json(DATA_REPORT)["dataset_digest"], run_id=progress.run_id)
          if dist.is_main else contextlib.nullcontext()) as mlflow_run:
        progress.begin(mlflow_run)
        epoch = progress.next_epoch
        while plan.more(epoch):
            epoch_start = time.time()
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            if set_transfer_phase(model, params["model"], epoch):  # head_first: unfreeze now
                train_model = wrap(model)
            lr, size = trainer.optimizer.param_groups[0]["lr"], plan.size_for(epoch)
            train_set.set_crop_size(size)
            train_loss, train_acc = train_one_epoch(train_model, loader, trainer, run, epoch, dist.is_main)
            # Every rank scores the whole (small) val set with identical weights, so all ranks
            # agree on early stopping and on the time budget's plan without another collective.
            sync_buffers(model)
            sync_buffers(trainer.scored(model))
            val_loss, val_acc = evaluate(trainer.scored(model), progress.info, val, device, cfg["batch_size"])
            plan.update(epoch, time.time() - epoch_start, time.time() - started)
            stop = progress.end_epoch({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                                       "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "image_size": size,
                                       "seconds": round(time.time() - started, 2), "planned_epochs": plan.epochs},
                                      model, trainer, generator, gather_rng_states(dist))
            if stop:
                break
            epoch += 1
        if dist.is_main:
            summarise(params, progress, time.time() - started)
    if torch_dist.is_initialized():
        check_ranks_agree(model)
        print(f"train: rank {dist.rank} of {dist.world_size} trained {len(progress.history) - progress.next_epoch + 1} "
              f"epochs on its {len(sampler)} of {len(train_set)} train images")
        torch_dist.destroy_process_group()


def summarise(params, progress, seconds):
    """metrics/train.json, metrics/train_history.csv and the MLflow run's summary and model."""
    best, history = progress.best, progress.history
    metrics = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
               "final_train_acc": history[-1]["train_acc"], "epochs_run": len(history),
               "train_seconds": round(seconds, 1)}
    tracking.finish_training(metrics, history, progress.model_path, [CLASS_INDEX, DATA_REPORT])
    write_json(TRAIN_METRICS, metrics)
    header = list(history[0])
    write_text(TRAIN_HISTORY, ",".join(header) + "\n" + "".join(
        ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in header) + "\n" for r in history))
    progress.finish()
    print(f"train: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} -> {progress.model_path} "
          f"({seconds:.0f}s)")


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
