"""The training set: (image, label) per manifest row, decoded once and kept in memory when it fits."""
from concurrent.futures import ThreadPoolExecutor

from torch.utils.data import Dataset

from src.core.process import cpu_count
from src.data.images import open_rgb


class ImageListDataset(Dataset):
    """(image tensor, label index) for a list of paths and labels.

    With cache=True every image is decoded once, up front, and shrunk to what the
    transforms need (shorter side = `cache_side`), so epochs skip decoding entirely.
    """

    def __init__(self, paths, labels, transform, cache=False, cache_side=None):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform
        self.images = None
        if cache:
            # JPEGs decode straight at the reduced size (draft mode), on every core: Pillow
            # releases the GIL while it decodes and resizes.
            with ThreadPoolExecutor(cpu_count()) as pool:
                self.images = list(pool.map(lambda p: shrink(open_rgb(p, min_side=cache_side), cache_side),
                                            self.paths))

    def __len__(self):
        return len(self.paths)

    def set_crop_size(self, size):
        """Progressive resizing: the training crop's size from now on (train_transform's first step)."""
        self.transform.transforms[0].size = size

    def __getitem__(self, i):
        img = self.images[i] if self.images is not None else open_rgb(self.paths[i])
        return self.transform(img), self.labels[i]


def shrink(img, side):
    """Resize so the shorter side is `side` (never enlarges); keeps memory small when caching."""
    if side is None or min(img.size) <= side:
        return img
    scale = side / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
