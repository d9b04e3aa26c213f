"""Read params.yaml and check every value before any stage does real work.

The schema below mirrors params.yaml key for key. A misspelt key, a missing one or an
out-of-range value stops the stage at once with one line naming the key and what is allowed.
"""
import re
from pathlib import Path

import yaml

from src.common import UserError, first_line


def choice(*options):
    def check(v):
        return v in options
    check.allowed = " | ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
    return check


def integer(lo, hi=None):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    check.allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return check


def number(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    check.allowed = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def either(*checks):
    def check(v):
        return any(c(v) for c in checks)
    check.allowed = " or ".join(c.allowed for c in checks)
    return check


def text(v):
    return isinstance(v, str) and v != ""
text.allowed = "a non-empty string"


def optional_text(v):
    return v is None or text(v)
optional_text.allowed = "null or a non-empty string"


def crop_range(v):
    return (isinstance(v, list) and len(v) == 2 and all(number(0, 1, lo_open=True)(x) for x in v)
            and v[0] <= v[1])
crop_range.allowed = "[min, max] with 0 < min <= max <= 1"


INF = float("inf")
PILLOW_MAX_PIXELS = 178_956_970  # Pillow refuses bigger images whatever we allow (2 x Image.MAX_IMAGE_PIXELS)
SCHEMA = {
    "arch": text,  # checked against the model registry when the model is built
    "seed": integer(0),
    "data": {
        "source": text,
        "sha256": optional_text,
        "val": number(0, 1, hi_open=True),
        "test": number(0, 1, hi_open=True),
        "image_size": integer(1),
        "max_pixels": integer(1, PILLOW_MAX_PIXELS),
    },
    "model": {
        "pretrained": text,
        "transfer": choice("finetune", "freeze", "head_first"),
        "head_epochs": integer(0),
        "freeze_bn": choice(True, False),
    },
    "train": {
        "epochs": integer(1),
        "batch_size": integer(1),
        "optimizer": choice("adam", "adamw", "sgd"),
        "lr": number(0, INF, lo_open=True),
        "momentum": number(0, 1, hi_open=True),
        "nesterov": choice(True, False),
        "weight_decay": number(0, INF),
        "decay_bn_and_bias": choice(True, False),
        "scheduler": choice("cosine", "step", "none"),
        "warmup_epochs": integer(0),
        "step_size": integer(1),
        "gamma": number(0, 1, lo_open=True),
        "label_smoothing": number(0, 1, hi_open=True),
        "grad_clip": number(0, INF),
        "patience": integer(0),
        "crop_scale": crop_range,
        "hflip": number(0, 1),
        "augment": choice("none", "trivialaugment", "randaugment", "augmix"),
        "random_erasing": number(0, 1),
        "mixup": number(0, INF),
        "cutmix": number(0, INF),
        "ema_decay": number(0, 1, hi_open=True),
        "class_balance": choice("none", "loss", "sampler"),
        "time_budget": number(0, INF),
        "start_image_size": integer(0),
        "device": choice("auto", "cuda", "mps", "cpu"),
        "precision": choice("auto", "fp32", "bf16", "fp16"),
        "channels_last": choice("auto", True, False),
        "compile": choice(True, False),
        "deterministic": choice(True, False),
        "workers": either(choice("auto"), integer(0)),
        "cache_images": choice("auto", True, False),
    },
    "evaluate": {
        "device": choice("auto", "cuda", "mps", "cpu"),
        "batch_size": integer(1),
        "precision": choice("auto", "fp32", "bf16"),
        "workers": either(choice("auto"), integer(0)),
        "tta": choice(True, False),
        "calibration_bins": integer(1),
        "misclassified_images": integer(0),
    },
    "predict": {
        "input": text,
        "device": choice("auto", "cuda", "mps", "cpu"),
        "top_k": integer(1),
        "batch_size": integer(1),
        "precision": choice("auto", "fp32", "bf16"),
        "workers": either(choice("auto"), integer(0)),
        "compile": choice("auto", True, False),
        "backend": choice("auto", "torch", "onnx", "int8"),
    },
    "export": {
        "calibration_images": integer(1),
    },
    "mlflow": {
        "experiment": text,
        "register_model": optional_text,
    },
}


def validate(params, schema=SCHEMA, prefix=""):
    if not isinstance(params, dict):
        raise UserError(f"params.yaml: {prefix.rstrip('.') or 'the file'} must be a mapping of keys")
    for key in params:
        if key not in schema:
            raise UserError(f"params.yaml: unknown key '{prefix}{key}'; allowed here: {', '.join(schema)}")
    for key, check in schema.items():
        name = prefix + key
        if key not in params:
            raise UserError(f"params.yaml: missing key '{name}'")
        value = params[key]
        if isinstance(check, dict):
            validate(value, check, name + ".")
        elif not check(value):
            raise UserError(f"params.yaml: {name}={value!r} is not allowed; use {check.allowed}")
    if prefix == "" and params["data"]["val"] + params["data"]["test"] >= 1:
        raise UserError("params.yaml: data.val + data.test must be below 1 to leave images for training")
    if prefix == "" and params["train"]["start_image_size"] > params["data"]["image_size"]:
        raise UserError(f"params.yaml: train.start_image_size={params['train']['start_image_size']} must not exceed "
                        f"data.image_size={params['data']['image_size']} (it is where progressive resizing starts)")
    if prefix == "" and params["train"]["warmup_epochs"] > params["train"]["epochs"]:
        raise UserError(f"params.yaml: train.warmup_epochs={params['train']['warmup_epochs']} must not exceed "
                        f"train.epochs={params['train']['epochs']}")
    return params


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path="params.yaml"):
    path = Path(path)
    try:
        params = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stages from the repository root") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {first_line(e)}") from None
    return validate(params)


def flatten(params, prefix="", sep="."):
    """{'train': {'lr': 1}} -> {'train.lr': 1}, the names `dvc exp show` and MLflow use."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[prefix + key] = value
    return flat
