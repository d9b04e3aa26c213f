"""Self-describing checkpoints: weights plus everything needed to use them, and the network
rebuilt from one.

A checkpoint is a plain dict of tensors, strings and numbers, so it loads with
`torch.load(..., weights_only=True)`: no pickled code can run from a checkpoint file.
"""
from pathlib import Path

import torch

from src.core.errors import UserError, first_line
from src.core.files import atomic_path
from src.networks.factory import build_model

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
        # torch's refusal comes with advice to load unsafely (weights_only=False, add_safe_globals):
        # keep only its first sentence of what went wrong, after "WeightsUnpickler error:" if any.
        why = first_line(str(e).split("WeightsUnpickler error:", 1)[-1]).split(". ")[0]
        raise UserError(f"{path} is not a loadable weights file (refused with weights_only=True: {why}): "
                        f"give a torchvision state dict (.pth) or a models/model.pt") from None


def model_state(state):
    """The state dict of a checkpoint: this project's own, or a bare torchvision-format one."""
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        return state["state_dict"]
    return state


def eval_image_size(data):
    """The crop size validation, evaluate, predict, export and serving use (data.eval_image_size,
    0: the training size data.image_size)."""
    return data["eval_image_size"] or data["image_size"]


def describe(params, class_names, mean_std):
    """What prediction needs besides the weights: network, classes and input preprocessing.
    image_size is the evaluation size (every inference path reads it); train_image_size the crops'."""
    return {"arch": params["arch"], "num_classes": len(class_names), "class_names": class_names,
            "image_size": eval_image_size(params["data"]), "train_image_size": params["data"]["image_size"],
            "mean": mean_std["mean"], "std": mean_std["std"],
            "params": params}


def weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_trained_model(path, device="cpu"):
    """(model in eval mode, checkpoint metadata) from one of this project's checkpoints."""
    ckpt = load_checkpoint(path)
    with torch.device("meta"):  # no random init of weights the checkpoint replaces (slow for big networks)
        model = build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"], assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer kept out of state_dicts
        model = build_model(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt
