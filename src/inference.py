"""Running a trained model: rebuild it from its checkpoint and push batches through it."""
import torch

from src.checkpoint import load_checkpoint
from src.device import autocast
from src.networks import build_model


def load_trained_model(path, device="cpu"):
    """(model in eval mode, checkpoint metadata) from one of this project's checkpoints."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, ckpt


@torch.inference_mode()
def predict_logits(model, loader, device, amp_dtype=None, channels_last=False, progress=None):
    """Concatenated fp32 logits and labels over a whole loader, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in (progress(loader) if progress else loader):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_labels.append(torch.as_tensor(labels))
    return torch.cat(all_logits), torch.cat(all_labels)
