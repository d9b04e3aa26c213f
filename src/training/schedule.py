"""The training's time line: how many epochs (train.epochs, or as many as fit train.time_budget),
each one's crop size (progressive resizing), and the learning rate of every step."""
import math
import statistics

import torch
import torch.distributed as torch_dist

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
