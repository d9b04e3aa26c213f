"""Where the model looked: Grad-CAM heat maps over the images (the `grad-cam` package).

Used by evaluate (metrics/misclassified.png) and `python -m src.predict ... --explain DIR`.
"""
import numpy as np
import torch

from src.core.device import Normalizer
from src.core.errors import UserError

BATCH = 16


def target_layer(model):
    """The last residual block (layer4[-1]) of a torchvision-named ResNet; for any other network
    its last conv, the last layer that still sees where things are."""
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, torch.nn.Sequential) and len(layer4):
        return layer4[-1]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise UserError(f"{type(model).__name__} has no conv layer for Grad-CAM to explain")
    return convs[-1]


def overlays(model, ckpt, images, classes=None):
    """A heat-map overlay (H x W x 3 uint8) for each H x W x 3 uint8 crop in `images`: Grad-CAM of
    `classes` (one index per image; None: the class the model predicts) at `target_layer`.
    `model` is the plain fp32 network in eval mode (load_trained_model's)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    normalize = Normalizer(ckpt["mean"], ckpt["std"], device)
    out = []
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        for start in range(0, len(images), BATCH):
            batch = np.stack(images[start:start + BATCH])
            x = normalize(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device))
            targets = None if classes is None else [ClassifierOutputTarget(int(c))
                                                    for c in classes[start:start + BATCH]]
            maps = cam(input_tensor=x, targets=targets)
            out += [show_cam_on_image(img.astype(np.float32) / 255, m, use_rgb=True) for img, m in zip(batch, maps)]
    return out


def overlay_names(files):
    """<stem>.gradcam.png for each file, numbered where two files share a stem."""
    names, seen = [], {}
    for f in files:
        stem = f.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.gradcam.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.gradcam.png")
    return names
