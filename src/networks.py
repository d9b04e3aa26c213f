"""From an `arch` name to a network ready for transfer learning.

The ResNet family comes from src/model.py (the tutorial's code); any other name is
looked up in torchvision's model registry. Pretrained weights, head replacement and
freezing live here too.
"""
import torch.nn as nn
import torchvision

from src.common import UserError
from src.model import FAMILY


def available_archs():
    return sorted(set(FAMILY) | set(torchvision.models.list_models(module=torchvision.models)))


def build_model(arch, num_classes, include_top=True):
    """A freshly initialised `arch` with a `num_classes`-way head."""
    if arch in FAMILY:
        return FAMILY[arch](num_classes=num_classes, include_top=include_top)
    if arch in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    raise UserError(f"arch={arch!r} is unknown; valid names: {', '.join(available_archs())}")


def head_module_name(model):
    """Name of the final Linear layer (fc for ResNets, classifier.N or heads.head elsewhere)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserError(f"{type(model).__name__} has no Linear classification head to replace")
    return last


def create_model(params, num_classes):
    """The network the train stage fits: `arch`, with `model.pretrained` weights and
    `model.transfer` applied (issue 3 fills in pretrained loading and freezing)."""
    return build_model(params["arch"], num_classes)


def preprocessing(params):
    """Normalisation that belongs to the weights in use (ImageNet's for torchvision weights)."""
    from src.data import IMAGENET_MEAN, IMAGENET_STD
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
