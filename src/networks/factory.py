"""From an `arch` name to a network ready for transfer learning.

The ResNet family comes from src/model.py (the tutorial's code); any other name is
looked up in torchvision's model registry. Pretrained weights (`model.pretrained`),
head replacement and freezing (`model.transfer`) live here too.

Transfer learning as the tutorial does it: build the network with a head for our classes,
load every pretrained tensor except the 1000-way ImageNet head (its shape differs), then
train everything (finetune), the head only (freeze), or the head first and then everything
(head_first).
"""
import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from src.checkpoint import FORMAT, load_checkpoint, model_state
from src.common import UserError
from src.data import IMAGENET_MEAN, IMAGENET_STD
from src.model import FAMILY
from src.paths import from_workspace

# Seconds any one network operation of a weights download may take. Offline this makes
# `pretrained: imagenet` fail in seconds, not hang; online it still allows slow downloads
# (the limit is per read, not for the whole file).
DOWNLOAD_TIMEOUT = 3


def torchvision_archs():
    return torchvision.models.list_models(module=torchvision.models)


def available_archs():
    return sorted(set(FAMILY) | set(torchvision_archs()))


def build_model(arch, num_classes, include_top=True):
    """A freshly initialised `arch` with a `num_classes`-way head (never loads weights).

    include_top=False (ResNet family only) drops avgpool and fc: the model returns the
    last feature map, a backbone for feature extraction.
    """
    if arch in FAMILY:
        return FAMILY[arch](num_classes=num_classes, include_top=include_top)
    if arch in torchvision_archs():
        if not include_top:
            raise UserError(f"include_top=False is built for the ResNet family ({', '.join(FAMILY)}), "
                            f"not {arch}; use torchvision.models.feature_extraction for it")
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    close = difflib.get_close_matches(str(arch), available_archs(), n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"arch={arch!r} is unknown{hint}; valid names: {', '.join(available_archs())}")


def head_module_name(model):
    """Name of the final Linear layer (fc for ResNets, classifier.N or heads.head elsewhere)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserError(f"{type(model).__name__} has no Linear classification head to replace")
    return last


# ---------------------------------------------------------------- pretrained weights

def imagenet_weights(arch):
    """torchvision's default ImageNet weights of `arch`: url, transforms (mean/std) and meta."""
    return torchvision.models.get_model_weights(arch).DEFAULT


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
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
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


def read_weights(path):
    """The state dict in a weights file (loaded with weights_only=True: no code in it runs)."""
    state = model_state(load_checkpoint(path))
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; give a torchvision state dict or a models/model.pt")
    return state


# ---------------------------------------------------------------- freezing

def _keep_eval(module, args):
    module.training = False  # frozen BatchNorm: normalise with, and never update, the running stats


def freeze_backbone(model, freeze_bn=True):
    """Train the head only: no gradients for the rest. With freeze_bn, the backbone's
    BatchNorm layers also stay in eval mode, so the frozen part is a fixed function."""
    head = head_module_name(model) + "."
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head)
    if freeze_bn:
        model.frozen_bn_hooks = [m.register_forward_pre_hook(_keep_eval) for name, m in model.named_modules()
                                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(head)]


def unfreeze(model):
    for p in model.parameters():
        p.requires_grad = True
    for hook in getattr(model, "frozen_bn_hooks", []):
        hook.remove()
    model.frozen_bn_hooks = []
    model.train(model.training)  # BatchNorm layers held in eval mode follow the model again


def frozen_now(cfg, epoch):
    """Whether the backbone is frozen during `epoch` (1-based) under `model.transfer`."""
    return cfg["transfer"] == "freeze" or (cfg["transfer"] == "head_first" and epoch <= cfg["head_epochs"])


def set_transfer_phase(model, cfg, epoch):
    """Called at the start of each epoch: head_first unfreezes after model.head_epochs epochs.

    Returns True when it unfroze something (a DistributedDataParallel wrapper must then be rebuilt).
    """
    if not frozen_now(cfg, epoch) and any(not p.requires_grad for p in model.parameters()):
        unfreeze(model)
        return True
    return False


# ---------------------------------------------------------------- what train.py calls

def create_model(params, num_classes):
    """The network the train stage fits: `arch`, with `model.pretrained` weights and
    `model.transfer` applied."""
    cfg = params["model"]
    path = pretrained_path(params)  # first: a missing weights file fails before anything slow
    model = build_model(params["arch"], num_classes)
    if path is not None:
        new_head = load_pretrained(model, read_weights(path), num_classes, f"model.pretrained={cfg['pretrained']}")
        print(f"model: {params['arch']} with weights from {path}"
              + (f"; new {num_classes}-way head ({', '.join(new_head)})" if new_head else ""))
    if frozen_now(cfg, 1):
        freeze_backbone(model, cfg["freeze_bn"])
    return model


def normalization(params):
    """The mean and std ({"mean": [...], "std": [...]}) that belong to the weights in use.

    One of this project's checkpoints records its own; otherwise it is that of torchvision's
    weights for `arch` (ImageNet's mean/std for nearly all), which also suits training from
    scratch on photos.
    """
    if params["model"]["pretrained"] not in ("none", "imagenet"):
        content = load_checkpoint(pretrained_path(params))
        if isinstance(content, dict) and content.get("format") == FORMAT:
            return {"mean": list(content["mean"]), "std": list(content["std"])}
    if params["arch"] in torchvision_archs():
        transforms = imagenet_weights(params["arch"]).transforms()
        return {"mean": list(transforms.mean), "std": list(transforms.std)}
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
