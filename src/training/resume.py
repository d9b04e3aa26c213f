"""What training keeps across epochs and crashes, and the two files it lives in.

- models/model.pt: the best epoch's weights, self-describing (`src.networks.checkpoint`), a DVC output.
- models/resume.pt: a completed epoch's whole state: weights, optimizer, scheduler, grad scaler,
  every RNG (and the loader's shuffling generator), best-so-far weights, history and the MLflow
  run id. It is not a DVC output, so DVC does not delete it before rerunning a stage that was
  killed: a rerun with the same params and data continues from it. It is marked finished when
  training ends, so `dvc repro -f` trains from scratch.
Both are written every train.checkpoint_minutes and after the last epoch.
"""
import hashlib
import io
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed

from src.core.errors import first_line
from src.core.paths import CLASS_INDEX, DATA_REPORT, MANIFEST, MODEL, RESUME
from src.networks.checkpoint import describe, save_checkpoint, weights
from src.training.distributed import collective_device


def fingerprint(params, data_files, world_size):
    """Identity of a training run: the params that shape it, the exact data, the process count.

    A resume file from a run with another fingerprint is ignored, so a changed config starts fresh.
    """
    h = hashlib.sha256()
    train = {k: v for k, v in params["train"].items() if k != "checkpoint_minutes"}  # when to save, not what
    shaping = {"arch": params["arch"], "seed": params["seed"], "image_size": params["data"]["image_size"],
               "eval_image_size": params["data"]["eval_image_size"],
               "model": params["model"], "train": train, "world_size": world_size}
    h.update(json.dumps(shaping, sort_keys=True).encode())
    for path in data_files:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(dist):
    """Every rank's RNG state, in rank order, so a resume restores each rank's own stream."""
    if not torch.distributed.is_initialized():
        return [rng_state()]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def load_resume(path, run_fingerprint):
    """The training state to continue from, or None (no file, another run's, or a finished one)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file from an older format or a disk fault: train from scratch
        print(f"train: ignoring unreadable {path} ({first_line(e, 120)}); starting fresh")
        return None
    if state.get("fingerprint") != run_fingerprint:
        print(f"train: {path} belongs to other params or data; starting fresh")
        return None
    if state.get("finished"):
        return None
    return state


def load_latest_resume(path, run_fingerprint, dist):
    """`load_resume`, under torchrun across machines without a shared disk: each rank reads its own
    disk, and the rank holding the latest epoch (rank 0 wrote it, wherever rank 0 ran last time)
    sends that file's bytes to every rank. All ranks then resume from the same epoch, or none does."""
    state = load_resume(path, run_fingerprint)
    if dist.world_size == 1:
        return state
    device = collective_device()
    epochs = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.world_size)]
    torch.distributed.all_gather(epochs, torch.tensor([state["epoch"] if state else 0], device=device))
    epochs = [int(e.item()) for e in epochs]
    source = epochs.index(max(epochs))
    if epochs[source] == 0:
        return None
    data = Path(path).read_bytes() if dist.rank == source else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    torch.distributed.broadcast(size, source)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if dist.rank == source
              else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    torch.distributed.broadcast(buffer, source)
    if dist.rank != source:
        state = torch.load(io.BytesIO(buffer.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
    if dist.is_main:
        print(f"train: every rank resumes from epoch {epochs[source]}, {path} of rank {source}")
    return state


class Progress:
    """History, best epoch and patience of one training, saved so that a kill at any point
    continues where it left off. Every rank keeps the numbers; rank 0 alone writes and logs."""

    model_path, resume_path = MODEL, RESUME
    data_files = (MANIFEST, CLASS_INDEX, DATA_REPORT)

    def __init__(self, params, class_names, mean_std, dist):
        self.params, self.dist = params, dist
        self.info = describe(params, class_names, mean_std)  # what every checkpoint carries
        self.fingerprint = fingerprint(params, self.data_files, dist.world_size)
        self.resumed = load_latest_resume(self.resume_path, self.fingerprint, dist)
        self.history, self.best, self.bad_epochs, self.run_id = [], {"val_acc": -1.0, "epoch": 0}, 0, None
        self.best_weights = None  # rank 0: the best epoch's scored weights, in memory between writes
        self.saved_at, self.saved_best = time.monotonic(), None  # the last write's clock, and its best epoch
        self.last = self.resumed  # killed after the final epoch's save: only the summary is left
        self.next_epoch = self.resumed["epoch"] + 1 if self.resumed else 1

    def restore(self, model, trainer, generator):
        """Put a resumed run's state back into the model, optimizer, scheduler, scaler and RNGs."""
        if not self.resumed:
            return
        state = self.resumed
        model.load_state_dict(state["model"])
        for name in ("optimizer", "scheduler", "scaler"):
            getattr(trainer, name).load_state_dict(state[name])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(state["ema"])
        generator.set_state(state["loader_generator"])
        set_rng_state(state["rng"][self.dist.rank])
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        self.run_id = state["mlflow_run_id"]
        self.best_weights = state["best_model"] or weights(trainer.scored(model))  # None: the saved epoch's

    def resuming_note(self):
        return f"; resuming after epoch {self.resumed['epoch']} from {self.resume_path}" if self.resumed else ""

    def begin(self, run_id):
        """Rank 0, once the MLflow run `run_id` is open: when resuming, put back the best weights
        (DVC deleted the stage's outputs before this rerun). A killed write's leftovers are already
        gone: run_stage clears them at the start."""
        if not self.dist.is_main:
            return
        self.run_id = run_id
        if self.resumed:
            self.save_model()

    def save_model(self):
        save_checkpoint(self.model_path, {**self.info, "epoch": self.best["epoch"], "val_acc": self.best["val_acc"],
                                          "mlflow_run_id": self.run_id, "model": self.best_weights})
        self.saved_best = self.best["epoch"]

    def end_epoch(self, row, model, trainer):
        """Record one epoch's numbers (rank 0 also prints, and keeps a new best epoch's weights); True
        to stop early. With weight EMA the averaged weights are the ones scored, kept as best and
        saved to model.pt; the resume file holds both the trained weights and the average."""
        self.history.append(row)
        if row["val_acc"] > self.best["val_acc"]:
            self.best, self.bad_epochs = {"val_acc": row["val_acc"], "val_loss": row["val_loss"],
                                          "epoch": row["epoch"]}, 0
            if self.dist.is_main:
                self.best_weights = weights(trainer.scored(model))
        else:
            self.bad_epochs += 1
        patience = self.params["train"]["patience"]
        stop = patience > 0 and self.bad_epochs >= patience
        if self.dist.is_main:
            print(f"epoch {row['epoch']}/{row['planned_epochs'] or '?'}: train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                  + (f"; early stop, no val improvement for {self.bad_epochs} epochs" if stop else ""))
        return stop

    def checkpoint(self, model, trainer, generator, rngs, last):
        """Rank 0: write model.pt (if the best changed) and resume.pt after the `last` epoch and
        whenever train.checkpoint_minutes have passed since the previous write. Both files hold the
        network several times over (weights, optimizer moments, EMA, best): written every epoch
        they cost a tenth of a short epoch, where a kill loses at most the minutes between writes."""
        due = time.monotonic() - self.saved_at >= 60 * self.params["train"]["checkpoint_minutes"]
        if not self.dist.is_main or not (last or due):
            return
        epoch = self.history[-1]["epoch"]
        if self.saved_best != self.best["epoch"]:
            self.save_model()
        ema = {"ema": trainer.ema.state_dict()} if trainer.ema is not None else {}
        self.last = {**self.info, "epoch": epoch, "val_acc": self.history[-1]["val_acc"], "model": weights(model),
                     **ema, "fingerprint": self.fingerprint, "finished": False, "mlflow_run_id": self.run_id,
                     "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                     "scaler": trainer.scaler.state_dict(), "loader_generator": generator.get_state(),
                     "rng": rngs, "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                     # None: the scored weights of this epoch (stored once)
                     "best_model": None if self.best["epoch"] == epoch else self.best_weights}
        save_checkpoint(self.resume_path, self.last)
        self.saved_at = time.monotonic()

    def finish(self):
        """Kept as the last epoch's checkpoint, never resumed: `dvc repro -f` retrains from scratch."""
        save_checkpoint(self.resume_path, {**self.last, "finished": True})
