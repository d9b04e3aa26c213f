"""Read params.yaml and check every value before any stage does real work.

The schema below mirrors params.yaml key for key. A misspelt key, a missing one or an
out-of-range value stops the stage at once with one line naming the key and what is allowed.
"""
import math
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from PIL import Image

from src.core import recipes
from src.core.errors import UserError, first_line


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


def number(lo, hi=None, lo_open=False, hi_open=False):
    """A finite number in the range; hi=None: no upper bound (.inf and .nan never pass)."""
    def check(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if hi is None:
        check.allowed = f"a finite number {'>' if lo_open else '>='} {lo}"
    else:
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


def sha256(v):
    return v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-fA-F]{64}", v) is not None)
sha256.allowed = "null or the 64 hex characters `sha256sum` prints"


def url_secrets(v):
    """Whether `v` is an http(s) URL carrying user:password@ or a query string (a token, a signature)."""
    if not isinstance(v, str) or not v.startswith(("http://", "https://")):
        return False
    parts = urlsplit(v)
    return bool(parts.username or parts.password or parts.query)


def redact_url(v):
    """`v` without user:password@, query and fragment: what may be printed or logged (any
    scheme://: a download, a database URL)."""
    if not isinstance(v, str) or "://" not in v:
        return v
    parts = urlsplit(v)
    if not (parts.username or parts.password or parts.query or parts.fragment):
        return v  # nothing to hide (and sqlite:////path stays as written)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + ("?..." if parts.query else "")


def data_source(v):
    return text(v) and not url_secrets(v)
data_source.allowed = ("sample, a folder, an archive, or an http(s) URL without user:password@ or ?query, "
                       "which dvc.lock and MLflow would record (credentials go in ~/.netrc; a signed URL: "
                       "download the file and point data.source at it)")
data_source.shown = redact_url


def crop_range(v):
    return (isinstance(v, list) and len(v) == 2 and all(number(0, 1, lo_open=True)(x) for x in v)
            and v[0] <= v[1])
crop_range.allowed = "[min, max] with 0 < min <= max <= 1"


# Upper bounds that only a typo reaches (image_size 100000, workers 10**6): generous on purpose.
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_WORKERS = 1024
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses bigger images whatever we allow
SCHEMA = {
    "recipe": choice(*recipes.CHOICES),  # first: a bad recipe is named before the nulls it would fill
    "arch": text,  # checked against the model registry when the model is built
    "seed": integer(0, 2**32 - 1),  # numpy's seed range; torch takes up to 2**64 - 1 (seed + rank, + epoch)
    "data": {
        "source": data_source,
        "sha256": sha256,
        "val": number(0, 1, hi_open=True),
        "test": number(0, 1, hi_open=True),
        "image_size": integer(1, 4096),
        "eval_image_size": integer(0, 4096),
        "max_pixels": integer(1, PILLOW_MAX_PIXELS),
    },
    "model": {
        "pretrained": text,
        "transfer": choice("finetune", "freeze", "head_first"),
        "head_epochs": integer(0, MAX_EPOCHS),
        "freeze_bn": choice(True, False),
        "zero_init_residual": choice(True, False),
    },
    "train": {
        # schedule
        "epochs": integer(1, MAX_EPOCHS),
        "time_budget": number(0, 60 * 24 * 365),  # minutes: a year
        "batch_size": integer(1, MAX_BATCH),
        "scheduler": choice("cosine", "step", "none"),
        "warmup_epochs": integer(0, MAX_EPOCHS),
        "step_size": integer(1, MAX_EPOCHS),
        "gamma": number(0, 1, lo_open=True),
        "patience": integer(0, MAX_EPOCHS),
        "start_image_size": integer(0, 4096),
        # optimiser
        "optimizer": choice("adam", "adamw", "sgd"),
        "lr": number(0, lo_open=True),
        "momentum": number(0, 1, hi_open=True),
        "nesterov": choice(True, False),
        "weight_decay": number(0),
        "decay_bn_and_bias": choice(True, False),
        "grad_clip": number(0),
        # augmentation
        "crop_scale": crop_range,
        "hflip": number(0, 1),
        "augment": choice("none", "trivialaugment", "randaugment", "augmix"),
        "random_erasing": number(0, 1),
        "mixup": number(0),
        "cutmix": number(0),
        # regularisation
        "label_smoothing": number(0, 1, hi_open=True),
        "ema_decay": number(0, 1, hi_open=True),
        "class_balance": choice("none", "loss", "sampler"),
        "calibrate": choice(True, False),
        # run-time (how, not what, is trained)
        "device": choice("auto", "cuda", "mps", "cpu"),
        "precision": choice("auto", "fp32", "bf16", "fp16"),
        "channels_last": choice("auto", True, False),
        "compile": choice(True, False),
        "deterministic": choice(True, False),
        "workers": either(choice("auto"), integer(0, MAX_WORKERS)),
        "cache_images": choice("auto", True, False),
        "checkpoint_minutes": number(0),
    },
    "evaluate": {
        "device": choice("auto", "cuda", "mps", "cpu"),
        "batch_size": integer(1, MAX_BATCH),
        "precision": choice("auto", "fp32", "bf16"),
        "workers": either(choice("auto"), integer(0, MAX_WORKERS)),
        "tta": choice(True, False),
        "calibration_bins": integer(1, 10_000),
        "misclassified_images": integer(0, 1_000),  # one figure
    },
    "predict": {
        "input": text,
        "device": choice("auto", "cuda", "mps", "cpu"),
        "top_k": integer(1, 100_000),
        "batch_size": integer(1, MAX_BATCH),
        "precision": choice("auto", "fp32", "bf16"),
        "workers": either(choice("auto"), integer(0, MAX_WORKERS)),
        "compile": choice("auto", True, False),
        "backend": choice("auto", "torch", "onnx", "int8"),
    },
    "export": {
        "calibration_images": integer(1, 1_000_000),
    },
    "mlflow": {
        "experiment": text,
        "log_model": choice(True, False),
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
            shown = getattr(check, "shown", lambda v: v)(value)  # never a password in a message
            raise UserError(f"params.yaml: {name}={shown!r} is not allowed; use {check.allowed}")
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


def read_yaml(path, missing="run the stages from the repository root"):
    """A YAML file as params.yaml is read (1e-4 is a float); one line if it is missing or broken."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {missing}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {first_line(e)}") from None


def load_params(path="params.yaml", with_filled=False):
    """params.yaml checked, its null knobs filled from the recipe (`src.core.recipes`) and `recipe`
    set to the one used; with_filled: (params, {knob: value} the recipe filled)."""
    params, filled = recipes.fill(read_yaml(path))
    validate(params)
    params["recipe"] = recipes.recipe_name(params)
    return (params, filled) if with_filled else params


def flatten(params, prefix="", sep="."):
    """{'train': {'lr': 1}} -> {'train.lr': 1}, the names `dvc exp show` and MLflow use."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[prefix + key] = value
    return flat
