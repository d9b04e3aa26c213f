"""Datasets and loaders over the manifest (the tutorial's transforms, made configurable)."""
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from src.device import cpu_count
from src.images import open_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size):
    """Eval-time resize before the center crop: 256 for 224, as ImageNet training used."""
    return int(round(image_size * 256 / 224))


def train_transform(image_size, crop_scale=(0.08, 1.0), hflip=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    steps = [transforms.RandomResizedCrop(image_size, scale=tuple(crop_scale))]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(hflip))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([
        transforms.Resize(resize_size(image_size)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class ImageListDataset(Dataset):
    """(image tensor, label index) for a list of paths and labels.

    With cache=True every image is decoded once, up front, and shrunk to what the
    transforms need (shorter side = `cache_side`), so epochs skip decoding entirely.
    """

    def __init__(self, paths, labels, transform, cache=False, cache_side=None):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform
        self.images = None
        if cache:
            self.images = [shrink(open_rgb(p), cache_side) for p in self.paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = self.images[i] if self.images is not None else open_rgb(self.paths[i])
        return self.transform(img), self.labels[i]


def shrink(img, side):
    """Resize so the shorter side is `side` (never enlarges); keeps memory small when caching."""
    if side is None or min(img.size) <= side:
        return img
    scale = side / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))


def default_workers(processes_per_machine=1):
    """Decoding processes: the cores left after the training process(es), at most 8 each."""
    return min(8, max(1, cpu_count() // processes_per_machine - 1))


def make_loader(dataset, batch_size, shuffle=False, workers=0, pin_memory=False, sampler=None, generator=None,
                drop_last=False):
    # Persistent workers skip re-forking (and re-copying a cached dataset) every epoch;
    # 4 batches in flight per worker hide decoding jitter behind the training step.
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=generator, drop_last=drop_last,
    )


def rows_for(rows, split, class_names):
    """Paths and label indices of one split of the manifest."""
    index = {name: i for i, name in enumerate(class_names)}
    chosen = [r for r in rows if r["split"] == split]
    return [r["path"] for r in chosen], [index[r["label"]] for r in chosen]
