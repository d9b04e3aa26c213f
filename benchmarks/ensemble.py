"""Would averaging several runs beat one? Val accuracy of each run of a `recipe` grid, of the mean
of their probabilities, and how many runs get each val image right.

    python -m benchmarks.recipe --rows recipe plus-crop-08 --seeds 1 2 --workdir /tmp/grid   # first
    python -m benchmarks.ensemble /tmp/grid [/tmp/grid2 ...] [--budget 3] [--row recipe]

Each finished experiment's models/model.pt and manifest come from its workdir's DVC cache (the
hashes in the experiment's dvc.lock; nothing in the workdir changes) and scores the val split through the
evaluate stage's code (`classify_files`, the temperature folded in). Runs are pooled across rows
and workdirs when they share the val split: k runs of one budget cost k times its minutes, so
"3 runs of 3 minutes" is what a 10-minute budget could buy instead.

If ensembles gain little, the runs make the same mistakes: the val images that every run gets
wrong say what the network has not learned, not what a run left to chance.
"""
import argparse
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml

from src.data.manifest import read_manifest, rows_for
from src.inference.classify import classify_files
from src.networks.checkpoint import load_trained_model


class Run(NamedTuple):
    workdir: Path
    name: str
    row: str        # recipe.py names a run ROW or ROW-seedN when it runs one budget
    budget: float
    model: Path     # models/model.pt in the DVC cache
    manifest: Path  # data/manifest.csv in the DVC cache: the split the run trained on


def sh(workdir, *cmd):
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=True).stdout


def runs(workdir):
    """Every finished experiment of a `benchmarks.recipe` workdir, read from git and the DVC cache."""
    if not (workdir / ".dvc").is_dir():
        sys.exit(f"{workdir}: not a DVC project; give a --workdir of `python -m benchmarks.recipe`")
    cache = Path(sh(workdir, "dvc", "cache", "dir").strip()) / "files" / "md5"

    def cached(lock, stage, path):
        md5 = next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)
        return cache / md5[:2] / md5[2:]

    for ref in sh(workdir, "git", "for-each-ref", "refs/exps", "--format=%(refname)").split():
        if ref.count("/") != 4:
            continue  # refs/exps/<2 hex>/<baseline commit>/<name> are experiments; refs/exps/exec/... are DVC's
        lock = yaml.safe_load(sh(workdir, "git", "show", f"{ref}:dvc.lock"))
        if "train" not in lock["stages"]:
            continue  # failed before training
        params = yaml.safe_load(sh(workdir, "git", "show", f"{ref}:params.yaml"))
        name = ref.rsplit("/", 1)[1]
        yield Run(workdir, name, name.rsplit("-seed", 1)[0], params["train"]["time_budget"],
                  cached(lock, "train", "models/model.pt"), cached(lock, "split", "data/manifest.csv"))


def val_probabilities(run):
    """(probabilities, labels) of the run's val split, as the evaluate stage computes them."""
    model, ckpt = load_trained_model(run.model, "cpu")
    paths, labels = rows_for(read_manifest(run.manifest), "val", ckpt["class_names"])
    cwd = os.getcwd()
    os.chdir(run.workdir)  # the manifest's paths are relative to the workdir
    try:
        logits, errors = classify_files(model, ckpt, paths, torch.device("cpu"), batch_size=64, workers=0,
                                        desc="val")
    finally:
        os.chdir(cwd)
    if any(errors):
        sys.exit(f"{run.workdir}: unreadable val images ({next(e for e in errors if e)})")
    return torch.softmax(logits.double(), 1).numpy(), np.asarray(labels)


def subsets(n, k, limit=1000):
    """Every k-subset of range(n), or `limit` random ones (seeded) where there are more."""
    if math.comb(n, k) <= limit:
        return list(itertools.combinations(range(n), k))
    rng = np.random.default_rng(0)
    return [tuple(rng.choice(n, k, replace=False)) for _ in range(limit)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="workdirs of benchmarks.recipe grids")
    parser.add_argument("--budget", type=float, default=None, help="only runs of this train.time_budget")
    parser.add_argument("--row", default=None,
                        help="only runs named ROW or ROW-seedN (benchmarks.recipe's names for one budget)")
    args = parser.parse_args()
    if not shutil.which("dvc"):
        sys.exit("dvc is not on PATH: activate the project's .venv first")
    found = [run for w in args.workdirs for run in runs(w.resolve())
             if (args.budget is None or run.budget == args.budget) and (args.row is None or run.row == args.row)]
    if len({run.manifest.parts[-2:] for run in found}) > 1:  # its md5, whichever cache holds it
        sys.exit("the runs differ in their val split (data/manifest.csv): give workdirs of one dataset and seed "
                 "rule, e.g. a pre-split folder (train/ val/)")
    if len(found) < 2:
        sys.exit(f"{len(found)} finished run(s) found: an ensemble needs 2 or more")
    probs, labels = {}, None
    for run in found:
        key = f"{run.workdir.name}/{run.name} ({run.budget:g} min)"
        probs[key], labels = val_probabilities(run)
        print(f"{key:50s} val acc {(probs[key].argmax(1) == labels).mean():.3f}", flush=True)

    names = list(probs)
    print("\n| runs averaged | combinations | mean val acc | min | max |\n|---|---|---|---|---|")
    for k in sorted({k for k in (1, 2, 3, 4, 8) if k < len(names)} | {len(names)}):
        accs = [(np.mean([probs[names[i]] for i in combo], 0).argmax(1) == labels).mean()
                for combo in subsets(len(names), k)]
        print(f"| {k} | {len(accs)} | {np.mean(accs):.3f} | {min(accs):.3f} | {max(accs):.3f} |")
    right = np.sum([probs[n].argmax(1) == labels for n in names], 0)
    print(f"\nval images by how many of the {len(names)} runs get them right (0 .. {len(names)}): "
          f"{np.bincount(right, minlength=len(names) + 1).tolist()}")


if __name__ == "__main__":
    main()
