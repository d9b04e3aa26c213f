"""From an `arch` name to a freshly initialised network: the ResNet family from
`src.networks.resnet` (the tutorial's code), any other name from torchvision's model registry."""
import difflib

from src.core.errors import UserError
from src.networks.resnet import FAMILY


def torchvision_models():
    """torchvision.models, imported on first use: importing torchvision takes seconds (it imports
    torch's compiler), which export and predict skip for the ResNet family."""
    import torchvision.models

    return torchvision.models


def torchvision_archs():
    return torchvision_models().list_models(module=torchvision_models())


def available_archs():
    return sorted(set(FAMILY) | set(torchvision_archs()))


def build_model(arch, num_classes, include_top=True, **options):
    """A freshly initialised `arch` with a `num_classes`-way head (never loads weights).

    include_top=False (ResNet family only) drops avgpool and fc: the model returns the
    last feature map, a backbone for feature extraction. `options` (ResNet family only):
    zero_init_residual.
    """
    if arch in FAMILY:
        return FAMILY[arch](num_classes=num_classes, include_top=include_top, **options)
    if options:
        raise UserError(f"{', '.join(f'model.{k}' for k in options)} is for the ResNet family ({', '.join(FAMILY)}), "
                        f"not {arch}")
    if arch in torchvision_archs():
        if not include_top:
            raise UserError(f"include_top=False is built for the ResNet family ({', '.join(FAMILY)}), "
                            f"not {arch}; use torchvision.models.feature_extraction for it")
        return torchvision_models().get_model(arch, weights=None, num_classes=num_classes)
    close = difflib.get_close_matches(str(arch), available_archs(), n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"arch={arch!r} is unknown{hint}; valid names: {', '.join(available_archs())}")
