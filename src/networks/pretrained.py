"""Pretrained weights (`model.pretrained`): torchvision's ImageNet files in torch hub's cache, or
a weights file of the user's; loaded into a network except for a head of another size; and the
input normalisation (mean/std) that belongs to them."""
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from src.core.errors import UserError, first_line
from src.core.paths import from_workspace
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from src.networks.checkpoint import FORMAT, load_checkpoint, model_state
from src.networks.factory import torchvision_archs

# Seconds any one network operation of a weights download may take. Offline this makes
# `pretrained: imagenet` fail in seconds, not hang; online it still allows slow downloads
# (the limit is per read, not for the whole file).
DOWNLOAD_TIMEOUT = 3


def imagenet_weights(arch):
    """torchvision's default ImageNet weights of `arch`: url, transforms (mean/std) and meta."""
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except ValueError:  # resnet18d and the like: built here, not by torchvision
        raise UserError(f"model.pretrained=imagenet: torchvision has no ImageNet weights for arch={arch}; "
                        f"use model.pretrained=none or the path of a weights file") from None


def imagenet_file(arch):
    """Where torch hub keeps them: $TORCH_HOME/hub/checkpoints/<file name of the URL>."""
    name = os.path.basename(urlparse(imagenet_weights(arch).url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def fetch_imagenet(arch):
    """The cached ImageNet weights file of `arch`, downloading it first if it is missing."""
    path = imagenet_file(arch)
    if path.is_file():
        return path
    url = imagenet_weights(arch).url
    hashed = torch.hub.HASH_REGEX.search(path.name)  # torchvision names files <arch>-<sha256 prefix>.pth
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Downloads into a temporary file and renames it: an interrupted download leaves no file.
        torch.hub.download_url_to_file(url, str(path), hashed.group(1) if hashed else None)
    except Exception as e:  # no network, DNS failure, timeout, hash mismatch
        reason = first_line(e, 120)
        raise UserError(f"model.pretrained=imagenet: {path.name} is not in {path.parent} and could not be "
                        f"downloaded ({reason}); on a machine with internet download {url} and copy it to "
                        f"{path} (that folder is $TORCH_HOME/hub/checkpoints)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def pretrained_path(params):
    """The weights file `model.pretrained` names, or None for `none`. Fails before any training."""
    value = params["model"]["pretrained"]
    if value == "none":
        return None
    if value == "imagenet":
        return fetch_imagenet(params["arch"])
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        # `dvc exp run --temp/--queue` runs in a copy of the repo without untracked files;
        # DVC_ROOT is the real workspace, where a relative path was meant.
        path = from_workspace(path)
    if not path.is_file():
        raise UserError(f"model.pretrained={value!r}: no such file; use none, imagenet or the path of a "
                        f".pth/.pt weights file (a torchvision state dict or a models/model.pt)")
    return path


def load_pretrained(model, state, num_classes, source):
    """Copy a state dict into `model`: every tensor except a head whose shape differs.

    A mismatched head (1000 ImageNet classes vs our `num_classes`) keeps the fresh
    initialisation it was built with: that is the new head. Anything else that does not
    fit means the weights belong to another architecture, and that is an error.
    """
    own = model.state_dict()
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    unexpected = [k for k in state if k not in own]
    if getattr(model, "include_top", True) is False:  # a backbone: the file's fc is not wanted
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
    # Old torchvision files predate BatchNorm's num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    new_head = [k for k in wrong if any(k.startswith(h + ".") for h in heads)]
    problems = unexpected + missing + [k for k in wrong if k not in new_head]
    if problems:
        k = problems[0]
        what = ("is not in the model" if k in unexpected else "is missing from the file" if k in missing
                else f"has shape {tuple(state[k].shape)}, the model needs {tuple(own[k].shape)}")
        raise UserError(f"{source} does not fit {type(model).__name__}: {k} {what} ({len(problems)} tensors "
                        f"differ); are these weights for another arch?")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in new_head}, strict=False)
    return new_head


def is_ours(content):
    """Whether a loaded weights file is one of this project's checkpoints (which name their arch,
    mean and std), not a bare state dict."""
    return isinstance(content, dict) and content.get("format") == FORMAT


def recorded_arch(params):
    """The arch one of this project's checkpoints names when `model.pretrained` is one, else None."""
    if params["model"]["pretrained"] in ("none", "imagenet"):
        return None
    content = load_checkpoint(pretrained_path(params))
    return content.get("arch") if is_ours(content) else None


def arch_as_trained(params, filled):
    """A recipe's arch (params.yaml's `arch: null`) gives way to the one a checkpoint of ours was
    trained as: fine-tuning a resnet18_w32 file needs no `-S arch`. An arch the user set stays, and
    `read_weights` says in one line if it does not fit."""
    if "arch" in filled:
        params["arch"] = filled["arch"] = recorded_arch(params) or params["arch"]
    return params, filled


def read_weights(path, arch):
    """The state dict in a weights file (loaded with weights_only=True: no code in it runs). One of
    this project's checkpoints names its arch, so fine-tuning it as another is a one-line error."""
    content = load_checkpoint(path)
    recorded = content.get("arch") if is_ours(content) else None
    if recorded is not None and recorded != arch:
        raise UserError(f"{path} is a {recorded} checkpoint and arch={arch}: fine-tune it as trained, with "
                        f"arch={recorded} (dvc exp run -S arch={recorded})")
    state = model_state(content)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; give a torchvision state dict or a models/model.pt")
    return state


def normalization(params):
    """The mean and std ({"mean": [...], "std": [...]}) that belong to the weights in use.

    One of this project's checkpoints records its own; otherwise it is that of torchvision's
    weights for `arch` (ImageNet's mean/std for nearly all), which also suits training from
    scratch on photos.
    """
    if params["model"]["pretrained"] not in ("none", "imagenet"):
        content = load_checkpoint(pretrained_path(params))
        if is_ours(content):
            return {"mean": list(content["mean"]), "std": list(content["std"])}
    if params["arch"] in torchvision_archs():
        transforms = imagenet_weights(params["arch"]).transforms()
        return {"mean": list(transforms.mean), "std": list(transforms.std)}
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
