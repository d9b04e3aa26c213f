"""Time to accuracy of training recipes on real photos, as a DVC experiment grid.

    python -m benchmarks.recipe                                # every row at 3 minutes
    python -m benchmarks.recipe --budgets 3 10 --rows baseline recipe
    python -m benchmarks.recipe --data DIR --workdir /tmp/recipes   # your photos; keep the project
    python -m benchmarks.recipe --data DIR --rows recipe --set model.pretrained=/path/model.pt  # fine-tune
    python -m benchmarks.recipe --rows recipe resnet18-80 --seeds 1 2 3   # repeats: mean, spread, paired gain

It clones this repository's committed HEAD into --workdir, points `data.source` at --data
(default ../shared/datasets/flowers_dev), runs ingest + split once, then queues one DVC
experiment per row and budget, exactly as a user sweeps:

    dvc exp run --queue -n recipe-minus-ema -S 'train.time_budget=3,10' -S train.ema_decay=0 ... evaluate
    dvc queue start -j 1

and prints one table row per experiment from `dvc exp show --json`. They run up to `evaluate`
(export and predict add nothing to compare): `dvc exp apply` needs every output, so rerun one
you want to keep without the target. Experiments run one at a time
(`-j 1`): a time budget is wall-clock minutes, so two at once would each get half the machine.
Afterwards `dvc exp show` and `mlflow ui` in --workdir compare the same runs.

Rows: see ROWS. Single runs on a few hundred val images: differences under ~3 points are within noise.
With --seeds every row runs once per seed, the rows alternating (A B A B ...), so that a drift in
the machine's speed hits each row alike; a second table gives each row's mean and spread, and
its mean gain over `recipe` on the same seeds.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# The photo recipe is what `recipe: auto` gives photos (src/core/recipes.py): the `recipe` row sets
# nothing. `baseline` is the sample's (digits) recipe with flips, the starting point; the
# `minus-*` rows take one ingredient out of the recipe and the `plus-*` rows add one.
ROWS = {
    "baseline": {"recipe": "digits", "train.hflip": 0.5},
    "recipe": {},
    # The full-width network at 80 px (more channels, fewer pixels, fewer epochs): resnet18-80 was the photo
    # recipe of sessions 10-16, resnet18d-80 their best at 3 minutes
    "resnet18-80": {"arch": "resnet18", "data.image_size": 80, "train.start_image_size": 48},
    "resnet18d-80": {"arch": "resnet18d", "data.image_size": 80, "train.start_image_size": 48},
    "plus-resnet-d": {"arch": "resnet18d_w32"},  # ResNet-D's deep stem and average-pool shortcuts, half width
    "minus-width": {"arch": "resnet18"},  # full width at 112 px: resnet18 as torchvision has it, half the epochs
    "minus-size": {"data.image_size": 80, "train.start_image_size": 48},  # half width at 80 px: 1.5x the epochs
    "minus-progressive": {"train.start_image_size": 0},
    "minus-erasing": {"train.random_erasing": 0},
    "minus-ema": {"train.ema_decay": 0},
    "minus-smoothing": {"train.label_smoothing": 0},
    "minus-adamw": {"train.optimizer": "adam", "train.weight_decay": 0},
    "minus-crop": {"train.crop_scale": "[0.6,1.0]"},
    "minus-calibration": {"train.calibrate": "false"},
    "plus-eval-128": {"data.eval_image_size": 128},  # FixRes: evaluate at 1.15x the training size
    "plus-zero-init": {"model.zero_init_residual": "true"},
    "plus-trivialaugment": {"train.augment": "trivialaugment"},
    "plus-randaugment": {"train.augment": "randaugment"},
    "plus-mixup-cutmix": {"train.mixup": 0.2, "train.cutmix": 1.0},
    "plus-crop-08": {"train.crop_scale": "[0.08,1.0]"},  # torchvision's crop range: smaller crops too
    "plus-class-balance": {"train.class_balance": "loss"},
    # Twice the updates per epoch; lr by the square root of the batch, the EMA over as many images
    "batch-16": {"train.batch_size": 16, "train.lr": 0.0014, "train.ema_decay": 0.999},
    "size-128": {"data.image_size": 128, "train.start_image_size": 72},
    "size-144": {"data.image_size": 144, "train.start_image_size": 80},
    # fp32 convs in channels_last: slower on AVX512 CPUs, faster for the half-width network on AVX2-only ones
    "plus-channels-last": {"train.channels_last": "true"},
    "checkpoint-every-epoch": {"train.checkpoint_minutes": 0},  # the resume file's cost, as before session 15
}


def sh(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def make_workdir(workdir, data):
    """A clone of HEAD whose data.source is the photos, with ingest + split done and committed."""
    if workdir.exists():
        sys.exit(f"--workdir {workdir} exists: give a new folder (or delete it)")
    sh(["git", "clone", "-q", str(REPO), str(workdir)], REPO)
    params = (workdir / "params.yaml").read_text()
    params = params.replace("  source: sample ", f"  source: {data} ", 1)
    if f"source: {data}" not in params:
        sys.exit("could not set data.source in the clone's params.yaml")
    (workdir / "params.yaml").write_text(params)
    sh(["dvc", "repro", "classes"], workdir)
    sh(["git", "add", "-A"], workdir)
    sh(["git", "commit", "-q", "-m", f"data.source: {data}"], workdir)


def queue(workdir, name, settings, budgets):
    """One `dvc exp run --queue` per row (and seed); the budgets make it a grid (one experiment each)."""
    cmd = ["dvc", "exp", "run", "--queue", "-S", "train.time_budget=" + ",".join(map(str, budgets)),
           "-S", "evaluate.tta=true"]
    for key, value in settings.items():
        cmd += ["-S", f"{key}={value}"]
    if len(budgets) == 1:
        cmd += ["-n", name if "seed" not in settings else f"{name}-seed{settings['seed']}"]  # a grid names its own
    sh(cmd + ["evaluate"], workdir)
    print("$", " ".join(cmd[:3] + [f"'{c}'" if "," in c else c for c in cmd[3:]] + ["evaluate"]), flush=True)


def wait_for_queue(workdir):
    while True:
        status = sh(["dvc", "queue", "status"], workdir)
        if not any(word in status for word in ("Queued", "Running")):  # all Success or Failed
            return status
        time.sleep(20)


def experiments(workdir):
    """(name, params, metrics) of every finished experiment, from `dvc exp show --json` (which
    also lists queued and running ones, with the base commit's metrics: `dvc exp list` tells)."""
    finished = set(sh(["dvc", "exp", "list", "--name-only"], workdir).split())
    shown = json.loads(sh(["dvc", "exp", "show", "--json", "--no-fetch"], workdir))
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("name") not in finished:
                    continue
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = {}
                for file in (data.get("metrics") or {}).values():
                    metrics.update(file.get("data") or {})
                if metrics:
                    yield rev["name"], params, metrics


def row_name(params):
    """Which row an experiment's params are: of the rows whose settings all hold, the one with the
    most settings (a grid names its experiments itself, so the name can't tell)."""
    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    have = dict(flat(params))
    matches = [(len(settings), name) for name, settings in ROWS.items()
               if all(have.get(k) == yaml.safe_load(str(v)) for k, v in settings.items())]
    return max(matches)[1] if matches else "?"


def table(workdir):
    rows = []
    for exp, params, m in experiments(workdir):
        split = "test" if "test/accuracy" in m else "val"
        row = row_name(params)
        rows.append((params["train"]["time_budget"], list(ROWS).index(row) if row in ROWS else len(ROWS), row,
                     params.get("seed"), exp, m.get("epochs_run"), m.get("train_seconds"), m.get("best_val_acc"),
                     m.get(f"{split}/balanced_accuracy"), m.get(f"{split}/tta_accuracy"), m.get(f"{split}/ece"),
                     m.get(f"{split}/ece_uncalibrated"), m.get(f"{split}/chance_ece")))
    # s/epoch: the machine's speed during that run too (a shared CPU's drifts by a third within an hour)
    print("\n| budget | row | seed | experiment | epochs | train s | s/epoch | best val acc | balanced acc "
          "| with flip TTA | ECE | ECE uncalibrated | ECE by chance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
    accuracy = {}  # (budget, order, row) -> {seed: best val acc}, for the repeats table
    for budget, order, row, seed, exp, epochs, seconds, acc, bal, tta, ece, raw, floor in sorted(rows):
        per_epoch = f"{seconds / epochs:.2f}" if epochs and seconds else "?"
        print(f"| {budget} min | {row} | {seed} | {exp} | {epochs} | {seconds} | {per_epoch} | {fmt(acc)} "
              f"| {fmt(bal)} | {fmt(tta)} | {fmt(ece)} | {fmt(raw)} | {fmt(floor)} |")
        if isinstance(acc, float):
            accuracy.setdefault((budget, order, row), {})[seed] = acc
    repeats_table(accuracy)


def repeats_table(accuracy):
    """Per budget and row with several seeds: val accuracy's mean, standard deviation and range, and
    the mean gain over `recipe` on the seeds both ran (paired: the same seed, neighbouring minutes)."""
    if not any(len(seeds) > 1 for seeds in accuracy.values()):
        return
    print("\n| budget | row | runs | mean val acc | sd | range | gain over recipe (paired runs) |")
    print("|---|---|---|---|---|---|---|")
    for (budget, _, row), seeds in sorted(accuracy.items()):
        values = list(seeds.values())
        sd = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "-"
        base = accuracy.get((budget, list(ROWS).index("recipe"), "recipe"), {})
        gains = [seeds[k] - base[k] for k in seeds if k in base]
        gain = "-" if row == "recipe" or not gains else f"{statistics.mean(gains):+.3f} ({len(gains)})"
        print(f"| {budget} min | {row} | {len(values)} | {statistics.mean(values):.3f} | {sd} "
              f"| {min(values):.3f}-{max(values):.3f} | {gain} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "flowers_dev")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3], help="minutes of training per run")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="added to every row, e.g. model.pretrained=/path/model.pt (fine-tuning)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run every row once per seed (params.yaml's `seed`), "
                        "alternating rows; default: one run of each at params.yaml's seed")
    parser.add_argument("--workdir", type=Path, help="default: a new folder under /tmp, kept")
    parser.add_argument("--table-only", action="store_true", help="print the table of an existing --workdir")
    args = parser.parse_args()
    bad = next((item for item in args.set if "=" not in item), None)
    if bad:
        parser.error(f"--set {bad}: give KEY=VALUE, e.g. model.pretrained=/path/model.pt")
    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: give each seed once (runs are named after them)")
    os.environ.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    if not shutil.which("dvc"):
        sys.exit("dvc is not on PATH: activate the project's .venv first")
    if args.table_only:
        return table(args.workdir)
    if not args.data.is_dir():
        sys.exit(f"--data {args.data}: no such folder (give a folder of class sub-folders)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recipes-")) / "project"
    budgets = [int(b) if b == int(b) else b for b in args.budgets]
    started = time.time()
    make_workdir(workdir, args.data.resolve())
    extra = dict(item.split("=", 1) for item in args.set)
    # Seed outside, rows inside: A B A B, so that neither row gets all of a slow hour.
    for seed in args.seeds or [None]:
        for name in args.rows:
            queue(workdir, name, {**ROWS[name], **extra, **({} if seed is None else {"seed": seed})}, budgets)
    # The worker it starts outlives the command: no pipe to it, or reading its output never ends.
    subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=workdir, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    print(wait_for_queue(workdir), flush=True)
    runs = len(args.rows) * len(budgets) * len(args.seeds or [None])
    print(f"{runs} experiments in {(time.time() - started) / 60:.1f} min; "
          f"compare them: cd {workdir} && dvc exp show  (or mlflow ui)")
    table(workdir)


if __name__ == "__main__":
    main()
