"""tune.yaml: what a study varies, how, and what it maximises; checked like params.yaml, one line per mistake.

    space:                                  # each entry a param of params.yaml, dotted
      arch: [resnet18, resnet34]            # a list: one of these (categorical)
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a range: floats, or ints when both ends are ints
      data.image_size: {low: 64, high: 112, step: 16}
"""
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from src.core.errors import UserError
from src.core.params import SCHEMA, flatten, read_yaml

SPACE_FILE = Path("tune.yaml")
OBJECTIVES = {"best_val_acc": "maximize", "best_val_loss": "minimize"}  # keys of metrics/train.json
TOP_KEYS = {"study", "storage", "trials", "objective", "sampler", "pruner", "fixed", "start_from", "space"}
RANGE_KEYS = {"low", "high", "log", "step"}
STUDY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,40}$")  # it prefixes DVC experiment names (git refs)


def _fail(where, message):
    raise UserError(f"{SPACE_FILE}: {where}: {message}")


def _check_value(where, key, value):
    """The value must be one params.yaml would accept for `key` (so a trial never fails on it)."""
    check = flatten(SCHEMA)[key]
    if not check(value):
        _fail(where, f"{key}={value!r} is not allowed in params.yaml; use {check.allowed}")


def _check_key(where, key):
    if key not in flatten(SCHEMA):
        _fail(where, f"unknown param '{key}'; use a dotted key of params.yaml, e.g. train.lr")


def _check_range(key, spec):
    where = f"space.{key}"
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
        _fail(where, "give a list of choices or {low, high} with optional log: true or step")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        _fail(where, f"low and high must be numbers, got {low!r} and {high!r}")
    if not low < high:
        _fail(where, f"empty range: low={low} must be below high={high}")
    if spec.get("log") and low <= 0:
        _fail(where, f"a log range needs low > 0, got {low}")
    if spec.get("log") and spec.get("step"):
        _fail(where, "log and step cannot be combined")
    for value in (low, high):
        _check_value(where, key, value)


def check_space(space):
    if not isinstance(space, dict) or not space:
        _fail("space", "give at least one param to vary")
    for key, spec in space.items():
        _check_key(f"space.{key}", key)
        if isinstance(spec, list):
            if not spec:
                _fail(f"space.{key}", "an empty list of choices")
            if len(set(map(json.dumps, spec))) != len(spec):
                _fail(f"space.{key}", "a choice is listed twice")
            for value in spec:
                if isinstance(value, (list, dict)):
                    _fail(f"space.{key}", f"choices must be plain values, got {value!r}")
                _check_value(f"space.{key}", key, value)
        else:
            _check_range(key, spec)


def check_params(where, values, space=None):
    if not isinstance(values, dict):
        _fail(where, "must be a mapping of dotted params to values")
    for key, value in values.items():
        _check_key(f"{where}.{key}", key)
        _check_value(f"{where}.{key}", key, value)
        if space is not None and key in space:
            _fail(f"{where}.{key}", "is also in space: fix it or search it, not both")


def _number(where, value, lo, hi, kind=int):
    if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(where, f"{value!r} is not allowed; use {'an integer' if kind is int else 'a number'} "
                     f"from {lo} to {hi}")
    return value


def load_space(path=SPACE_FILE):
    """tune.yaml as a plain dict with every entry checked and defaults filled in."""
    cfg = read_yaml(path, missing="run from the repository root, or give --space FILE")
    if not isinstance(cfg, dict):
        _fail("the file", "must be a mapping of keys")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        _fail(sorted(unknown)[0], f"unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(cfg.get("study"), str) or not STUDY_NAME.match(cfg["study"]):
        _fail("study", f"{cfg.get('study')!r}: use letters, digits, - and _ (it names the DVC experiments)")
    _number("trials", cfg.get("trials"), 1, 100_000)
    cfg.setdefault("storage", None)
    if cfg["storage"] is not None and not isinstance(cfg["storage"], str):
        _fail("storage", "null (tune.db in the workspace) or a database URL")
    if cfg["storage"] and urlsplit(cfg["storage"]).password:
        _fail("storage", "no password in a file git keeps: put it in ~/.pgpass, or the whole URL in "
                         "$RESNET_TL_TUNE_STORAGE")
    cfg.setdefault("objective", "best_val_acc")
    if cfg["objective"] not in OBJECTIVES:
        _fail("objective", f"{cfg['objective']!r}; use one of {', '.join(OBJECTIVES)}")
    sampler = cfg.setdefault("sampler", {})
    if not isinstance(sampler, dict) or set(sampler) - {"startup_trials", "seed"}:
        _fail("sampler", "allowed keys: startup_trials, seed")
    sampler["startup_trials"] = _number("sampler.startup_trials", sampler.get("startup_trials", 4), 0, 1000)
    if sampler.setdefault("seed", None) is not None:
        _number("sampler.seed", sampler["seed"], 0, 2**32 - 1)
    pruner = cfg.setdefault("pruner", {})
    if not isinstance(pruner, dict) or set(pruner) - {"percentile", "startup_trials", "warmup"}:
        _fail("pruner", "allowed keys: percentile, startup_trials, warmup (or pruner: {} for the defaults)")
    pruner["percentile"] = _number("pruner.percentile", pruner.get("percentile", 50), 0, 100, (int, float))
    pruner["startup_trials"] = _number("pruner.startup_trials", pruner.get("startup_trials", 2), 0, 1000)
    pruner["warmup"] = _number("pruner.warmup", pruner.get("warmup", 0.3), 0, 1, (int, float))
    check_space(cfg.get("space"))
    cfg["fixed"] = cfg.get("fixed") or {}
    check_params("fixed", cfg["fixed"], cfg["space"])
    cfg["start_from"] = cfg.get("start_from") or []
    if not isinstance(cfg["start_from"], list):
        _fail("start_from", "a list of param mappings (trials to run first)")
    for i, values in enumerate(cfg["start_from"]):
        check_params(f"start_from[{i}]", values)
        outside = next((k for k in values if k not in cfg["space"]), None)
        if outside:
            _fail(f"start_from[{i}].{outside}", "is not in space (fixed params go under fixed)")
    if len(cfg["start_from"]) > cfg["trials"]:
        _fail("start_from", f"{len(cfg['start_from'])} trials to start from, more than trials={cfg['trials']}")
    return cfg


def suggest(trial, space):
    """One value per searched param, drawn by the study's sampler: {dotted param: value}."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and isinstance(spec.get("step", 1), int):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                            log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"),
                                              log=bool(spec.get("log")))
    return values
