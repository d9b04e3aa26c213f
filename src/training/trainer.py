"""One optimisation step and one epoch: optimiser, loss (label smoothing, class weights), MixUp /
CutMix, gradient scaling and clipping, the schedule's step and the weight EMA."""
import math
from typing import NamedTuple

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torchvision.transforms import v2
from tqdm import tqdm

from src.core.errors import UserError
from src.training.ema import WeightEma
from src.training.schedule import make_scheduler

# Devices with torch's fused optimizer kernels: one kernel updates every tensor, where the
# default runs a dozen ops per tensor (on a CPU, a good part of a step at small image sizes).
FUSED_DEVICES = {"cpu", "cuda", "mps", "xpu"}


def make_optimizer(model, cfg, fused=None):
    """params.yaml's optimizer; fused (one kernel a step) where the device has it, unless `fused` says."""
    decay, no_decay = [], []
    # Frozen parameters are included too: head_first unfreezes them later, and optimizers
    # skip parameters that got no gradient.
    for p in model.parameters():
        (no_decay if p.ndim <= 1 and not cfg["decay_bn_and_bias"] else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = (decay + no_decay)[0].device.type in FUSED_DEVICES
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"], fused=fused)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["optimizer"]]
    return optimizer_class(groups, lr=cfg["lr"], fused=fused)


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
