"""The tutorial's transforms, made configurable: training augmentation and the evaluation crop.

They yield uint8 images: a quarter of float32's bytes between worker processes, through
pinned memory and to a GPU. They are normalised a batch at a time on the device
(`src.core.device.Normalizer`), where one vectorised op replaces a ToTensor + Normalize per image.
"""
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2

from src.core.device import mean_pixel
from src.data.image_files import resize_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_uint8_tensor(img):
    """PIL RGB image -> uint8 CHW tensor (PILToTensor, without its per-call overhead)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image, as a uint8 tensor.

    The same sampling (area uniform in `scale`, log-uniform aspect ratio, 10 tries, then a
    center crop), but its random numbers come from one torch.rand call (seeded and resumed
    with torch's RNG state) and crop + resize are one PIL call: several times cheaper per image
    than the torchvision chain with ToTensor + Normalize, which is the loader's share of a CPU
    training step and what keeps a GPU fed from few cores.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5):
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = tuple(ratio)

    def crop_box(self, width, height, draws):
        area = width * height
        for u_area, u_ratio, u_top, u_left in draws:
            target = area * (self.scale[0] + u_area * (self.scale[1] - self.scale[0]))
            aspect = math.exp(self.log_ratio[0] + u_ratio * (self.log_ratio[1] - self.log_ratio[0]))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
                return left, top, left + w, top + h
        # Fallback, as torchvision: the whole image, trimmed to the ratio range, centered.
        w, h = width, height
        if width / height < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            w = round(height * self.ratio[1])
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img):
        """The cropped, resized and maybe flipped PIL image."""
        draws = torch.rand(11, 4).tolist()  # 10 crop tries and the flip
        box = self.crop_box(img.width, img.height, draws[:10])
        img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if draws[10][0] < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img


# train.augment: torchvision's automatic augmentation policies. They run on the crop as a PIL
# image, where their ops are several times cheaper than on a uint8 tensor (benchmarks/README.md).
POLICIES = {"none": None, "trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment,
            "augmix": v2.AugMix}
# Random erasing fills with the ImageNet mean, which is 0 once normalised (as torchvision's
# references erase after Normalize).
MEAN_PIXEL = mean_pixel(IMAGENET_MEAN)


def train_transform(image_size, crop_scale=(0.08, 1.0), hflip=0.5, augment="none", random_erasing=0.0):
    """Training augmentation: crop + flip, the policy, erasing; uint8 CHW out (normalised per batch).

    Every random draw comes from torch's RNG, so seeds and resumes cover augmentation too."""
    steps = [RandomResizedCropFlip(image_size, crop_scale, hflip=hflip)]
    if POLICIES[augment] is not None:
        steps.append(POLICIES[augment]())
    steps.append(to_uint8_tensor)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(random_erasing, value=MEAN_PIXEL))
    return transforms.Compose(steps)


def eval_crop(image_size, to_tensor=True):
    """Resize (256/224 of the size) + CenterCrop, uint8 CHW tensor out (or the PIL image); normalised per batch."""
    return transforms.Compose([
        transforms.Resize(resize_size(image_size)),
        transforms.CenterCrop(image_size),
        *([to_uint8_tensor] if to_tensor else []),
    ])


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The tutorial's evaluation transform, float out: eval_crop, then ToTensor's /255 and Normalize, per image."""
    return transforms.Compose([
        eval_crop(image_size),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(mean, std),
    ])
