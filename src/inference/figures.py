"""Pictures for people: the confusion matrix and grids of images titled with their predictions.

pyplot is imported inside the functions so the caller chooses the backend first
(evaluate forces Agg; `predict --picture` keeps a window when there is a display).
"""
import math
import textwrap

import numpy as np
from PIL import Image

from src.core.files import atomic_path
from src.data.images import open_rgb
from src.inference.calibration_error import bin_means, confidence_bins

THUMBNAIL = 256  # pixels: enough to see the picture, small enough for a grid of many


def save_figure(fig, path):
    from matplotlib import pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def confusion_figure(cm, class_names, title):
    """Counts in each cell; colour is the share of the actual class (its row), so a rare
    class's mistakes are as visible as a common one's."""
    from matplotlib import pyplot as plt
    n = len(class_names)
    side = min(4 + 0.45 * n, 40)
    font = max(5, min(10, 300 // max(n, 1)))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    shares = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                  fontsize=font)
    ax.set_yticks(range(n), class_names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= 40:  # beyond that the numbers no longer fit their cells
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    fig.tight_layout()
    return fig


def reliability_figure(curves, correct, bins, title, chance=None):
    """Accuracy against confidence in equal-width bins, one line per {name: confidences}: on the
    diagonal a model is as sure as it is right; below it, overconfident. `chance`: the ECE that
    perfect calibration shows by chance on these images (`calibration_error.chance_ece`)."""
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":",
            label="perfectly calibrated" + (f" (ECE {chance:.3f} by chance)" if chance is not None else ""))
    for name, confidence in curves.items():
        onehot = confidence_bins(confidence, bins)
        ax.plot(bin_means(onehot, confidence), bin_means(onehot, correct), marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def image_grid(paths, titles, title=None, title_colors=None, columns=4):
    """Each image (a file, decoded as training decodes it, or an H x W x 3 uint8 array) above its title."""
    from matplotlib import pyplot as plt
    n = max(1, len(paths))
    cols = min(columns, n) if paths else 2  # an empty grid still needs room for its title
    rows = math.ceil(n / cols)
    # constrained layout keeps multi-line titles and the suptitle clear of the images
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols if paths else 6.4, 3.7 * rows + (0.4 if title else 0)),
                             squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, path, text) in enumerate(zip(axes.flat, paths, titles)):
        try:
            img = Image.fromarray(path) if isinstance(path, np.ndarray) else open_rgb(path)
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            ax.imshow(img, interpolation="nearest" if max(img.size) < 64 else "antialiased")
        except Exception:  # a caption without a picture beats no figure at all
            text += "\n(unreadable)"
        color = title_colors[k] if title_colors else "black"
        ax.set_title(text, fontsize=9, color=color)
    if not paths:
        axes.flat[0].text(1.0, 0.5, "nothing to show", ha="center", va="center", fontsize=14,
                          transform=axes.flat[0].transAxes)
    if title:  # wrapped to the grid's width (~30 characters a column): a one-image grid is narrow
        fig.suptitle("\n".join(textwrap.fill(line, 30 * cols) for line in title.split("\n")))
    return fig
