"""Transfer learning as the tutorial does it (`model.transfer`): build the network with a head for
our classes, load every pretrained tensor except the 1000-way ImageNet head (its shape differs),
then train everything (finetune), the head only (freeze), or the head first and then everything
(head_first)."""
import torch.nn as nn

from src.core.errors import UserError
from src.networks.factory import build_model
from src.networks.pretrained import load_pretrained, pretrained_path, read_weights


def create_model(params, num_classes):
    """The network the train stage fits: `arch`, with `model.pretrained` weights and
    `model.transfer` applied."""
    cfg = params["model"]
    path = pretrained_path(params)  # first: a missing weights file fails before anything slow
    model = build_model(params["arch"], num_classes,
                        **({"zero_init_residual": True} if cfg.get("zero_init_residual") else {}))
    if path is not None:
        new_head = load_pretrained(model, read_weights(path, params["arch"]), num_classes,
                                   f"model.pretrained={cfg['pretrained']}")
        print(f"model: {params['arch']} with weights from {path}"
              + (f"; new {num_classes}-way head ({', '.join(new_head)})" if new_head else ""))
    if frozen_now(cfg, 1):
        freeze_backbone(model, cfg["freeze_bn"])
    return model


def head_module_name(model):
    """Name of the final Linear layer (fc for ResNets, classifier.N or heads.head elsewhere)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserError(f"{type(model).__name__} has no Linear classification head to replace")
    return last


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
