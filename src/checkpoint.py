"""Self-describing checkpoints: weights plus everything needed to use them.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
`torch.load(..., weights_only=True)`: no pickled code can run from a checkpoint file.
"""
import hashlib
import json
import random
from pathlib import Path

import torch

from src.common import UserError, atomic_path, first_line

FORMAT = "resnet-tl/1"


def save_checkpoint(path, state):
    """Write atomically: a kill mid-write leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train first (`dvc repro train`)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a loadable weights file (refused with weights_only=True): "
                        f"{first_line(e)}") from None


def model_state(state):
    """The state dict of a checkpoint: this project's own, or a bare torchvision-format one."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]
    return state


def describe(params, class_names, norm):
    """What prediction needs besides the weights: network, classes and input preprocessing."""
    return {"arch": params["arch"], "num_classes": len(class_names), "class_names": class_names,
            "image_size": params["data"]["image_size"], "mean": norm["mean"], "std": norm["std"],
            "params": params}


def weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fingerprint(params, data_files, world_size):
    """Identity of a training run: the params that shape it, the exact data, the process count.

    A resume file from a run with another fingerprint is ignored, so a changed config starts fresh.
    """
    h = hashlib.sha256()
    shaping = {"arch": params["arch"], "seed": params["seed"], "image_size": params["data"]["image_size"],
               "model": params["model"], "train": params["train"], "world_size": world_size}
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
