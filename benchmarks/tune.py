"""The search against the hand recipe, on real photos: does a 30-minute study find a better recipe?

    python -m benchmarks.tune                          # flowers_dev: a 30-minute study, then the reruns
    python -m benchmarks.tune --minutes 10 --budgets 3  # shorter

1. Search: a clone of HEAD on flowers_dev's train/ alone, split 80/20 by the project's own split
   (its val is the search's), runs `python -m src.tune --minutes M` with the repo's tune.yaml
   (3-minute trials, the hand recipe first). Trials are pruned by the median rule.
2. Judge: a second clone on flowers_dev's own train/ and val/ (photos no trial scored) trains the
   hand recipe and the study's best, at each of --budgets minutes, one at a time (a queue, -j 1),
   and reports val accuracy there. Choosing on one val and reporting on another keeps the search's
   own selection out of the comparison.
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

import optuna

from benchmarks.recipe import REPO, experiments, sh, wait_for_queue
from src.search.results import apply_params
from src.search.space import load_space


def clone(workdir, settings):
    """A clone of HEAD with `settings` in params.yaml, ingested, split and committed."""
    sh(["git", "clone", "-q", str(REPO), str(workdir)], REPO)
    apply_params(settings, workdir / "params.yaml")
    sh(["dvc", "repro", "classes"], workdir)
    sh(["git", "add", "-A"], workdir)
    sh(["git", "commit", "-q", "-m", "benchmark data"], workdir)


def search(workdir, data, minutes):
    clone(workdir, {"data.source": str(data / "train"), "data.val": 0.2, "data.test": 0.0})
    started = time.time()
    subprocess.run([sys.executable, "-m", "src.tune", "--minutes", str(minutes)], cwd=workdir, check=True)
    elapsed = (time.time() - started) / 60
    cfg = load_space(workdir / "tune.yaml")
    study = optuna.load_study(study_name=cfg["study"], storage=f"sqlite:///{workdir / 'tune.db'}")
    return cfg, study, elapsed


def study_table(cfg, study, elapsed):
    done = [t for t in study.get_trials() if t.state.is_finished()]
    minutes = {t.number: t.duration.total_seconds() / 60 for t in done}
    complete = [t for t in done if t.state.name == "COMPLETE"]
    pruned = [t for t in done if t.state.name == "PRUNED"]
    full = statistics.median(minutes[t.number] for t in complete) if complete else 0
    saved = sum(full - minutes[t.number] for t in pruned)
    names = list(cfg["space"])
    print(f"\nstudy: {len(done)} trials in {elapsed:.1f} min: {len(complete)} complete, {len(pruned)} pruned "
          f"(a complete trial took {full:.2f} min; pruning saved {saved:.1f} min), "
          f"{sum(t.state.name == 'FAIL' for t in done)} failed")
    print("\n| trial | state | search val acc | min | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for t in done:
        value = f"{t.value:.3f}" if t.value is not None else ""
        cells = [str(t.params.get(n, "")) if not isinstance(t.params.get(n), float) else f"{t.params[n]:.4g}"
                 for n in names]
        print(f"| {t.number} | {t.state.name.lower()} | {value} | {minutes[t.number]:.2f} | "
              + " | ".join(cells) + " |")
    return study.best_trial


def judge(workdir, data, rows, budgets):
    clone(workdir, {"data.source": str(data)})
    for settings in rows.values():
        cmd = ["dvc", "exp", "run", "--queue", "-S", "train.time_budget=" + ",".join(map(str, budgets))]
        for key, value in settings.items():
            if key != "train.time_budget":  # the grid's axis
                cmd += ["-S", f"{key}={json.dumps(value)}"]
        sh(cmd + ["train"], workdir)
    subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=workdir, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    wait_for_queue(workdir)
    print("\n| budget | recipe | epochs | val acc (flowers_dev val/) |")
    print("|---|---|---|---|")
    results = []
    for _, params, m in experiments(workdir):
        flat = {f"{k}.{kk}" if isinstance(v, dict) else k: vv
                for k, v in params.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
        row = next((name for name, s in rows.items()
                    if all(flat.get(k) == v for k, v in s.items() if k != "train.time_budget")), "?")
        results.append((params["train"]["time_budget"], row, m.get("epochs_run"), m.get("best_val_acc")))
    for budget, row, epochs, acc in sorted(results):
        print(f"| {budget} min | {row} | {epochs} | {acc:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "flowers_dev")
    parser.add_argument("--minutes", type=float, default=30, help="the study's wall clock (no new trial after)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3, 10], help="minutes of the judging runs")
    parser.add_argument("--workdir", type=Path, help="default: a new folder under /tmp, kept")
    args = parser.parse_args()
    os.environ.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    if not shutil.which("dvc"):
        sys.exit("dvc is not on PATH: activate the project's .venv first")
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        sys.exit(f"--data {args.data}: give a folder with train/ and val/ class folders")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tune-"))
    cfg, study, elapsed = search(workdir / "search", args.data.resolve(), args.minutes)
    best = study_table(cfg, study, elapsed)
    hand = {**cfg["fixed"], **cfg["start_from"][0]}
    tuned = best.user_attrs["params"]
    print(f"\nbest: trial {best.number}, search val acc {best.value:.3f}: {json.dumps(tuned)}")
    rows = {"hand": hand} if tuned == hand else {"hand": hand, "tuned": tuned}
    budgets = [int(b) if b == int(b) else b for b in args.budgets]
    judge(workdir / "judge", args.data.resolve(), rows, budgets)
    print(f"\nworkdir: {workdir} (dvc exp show, mlflow ui, python -m src.tune --best in search/)")


if __name__ == "__main__":
    main()
