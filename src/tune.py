"""Search hyper-parameters: an Optuna study whose trials are DVC experiments and MLflow runs.

    python -m src.tune                  # take trials from the study (tune.yaml) until none are left
    python -m src.tune --minutes 30     # ... starting no new trial after 30 minutes
    python -m src.tune --best           # the best trial; metrics/tune/ (trials.csv, history.png, importance.png)
    python -m src.tune --best --apply   # ... and write its params into params.yaml: `dvc repro` trains it

Each trial runs `dvc exp run train --name <study>-<trial> -S ...` in this workspace, so it is a DVC
experiment (`dvc exp show`) and an MLflow run tagged tune.study and tune.trial. After each epoch the
training reports its val accuracy to the study, whose median pruner stops trials far behind the
others: such a trial ends like a finished one (its curve and weights so far kept) and is recorded as
pruned. A trial whose training fails is recorded as failed with its error line; the study goes on.

One machine: the study lives in tune.db here. Many: give every worker (one per clone) the same
database URL (--storage, $RESNET_TL_TUNE_STORAGE or tune.yaml's storage); each trial is taken by
exactly one worker. Ctrl-C stops a worker; its finished trials stay, and rerunning continues the study.
"""
import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from src.core.errors import UserError, first_line
from src.core.files import read_json
from src.core.params import redact_url
from src.core.paths import TRAIN_METRICS
from src.core.process import run_stage
from src.search.report import PRUNED_AT, trial_env
from src.search.results import RESULTS, apply_params, best_trial, trial_rows, write_plots, write_table
from src.search.space import SPACE_FILE, load_space, suggest
from src.search.study import claim, counted, open_study, requeue, storage_url

WORKER_LOCK = Path(".dvc/tmp/tune-worker.lock")


@contextlib.contextmanager
def one_worker_per_clone():
    """DVC runs one experiment at a time in a workspace: a second worker here would only fail its trials."""
    WORKER_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(WORKER_LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("another tune worker runs in this clone; start more workers in other clones "
                            "(git clone + dvc pull), all with the same --storage") from None
        yield


def error_line(lines):
    """The line that says why a trial failed: the stage's `error: ...`, else DVC's, else the last."""
    for prefix in ("error: ", "ERROR: "):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1][:300]
    return next((line[:300] for line in reversed(lines) if line.strip()), "no output")


def run_experiment(cmd, env):
    """Run `cmd`, its output shown as it comes; (exit code, stderr lines). Ctrl-C reaches it too."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    lines = []

    def tee():
        for line in proc.stderr:
            sys.stderr.write(line)
            lines.append(line.rstrip("\n"))
    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # a terminal already sent it; `kill -INT` did not
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt:
                continue
        reader.join(5)
        raise
    reader.join(5)
    return proc.returncode, lines


def run_trial(study, url, cfg, trial):
    """One trial as one DVC experiment; tells the study how it ended."""
    from optuna.trial import TrialState

    try:
        values = {**cfg["fixed"], **suggest(trial, cfg["space"])}
    except ValueError as e:  # Optuna refuses a param whose choices changed since the study began
        requeue(study, trial)  # not counted: the study still has its trials when the space is fixed
        raise UserError(f"{SPACE_FILE}: {first_line(e)}; a study keeps its space: name a new study "
                        "to search another") from None
    name = f"{cfg['study']}-{trial.number}"
    trial.set_user_attr("experiment", name)
    trial.set_user_attr("params", values)
    print(f"tune: trial {trial.number} ({name}): " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)
    cmd = ["dvc", "exp", "run", "train", "--name", name]
    for key, value in values.items():
        cmd += ["-S", f"{key}={json.dumps(value)}"]
    env = {**os.environ, **trial_env(url, study, trial, cfg["objective"], cfg["pruner"])}
    code, lines = run_experiment(cmd, env)
    if code != 0:
        trial.set_user_attr("error", error_line(lines))
        study.tell(trial, state=TrialState.FAIL)
        print(f"tune: trial {trial.number} failed: {trial.user_attrs['error']}", flush=True)
        return "failed"
    pruned_at = study._storage.get_trial_user_attrs(trial._trial_id).get(PRUNED_AT)
    if pruned_at is not None:
        study.tell(trial, state=TrialState.PRUNED)
        print(f"tune: trial {trial.number}: pruned after epoch {pruned_at}", flush=True)
        return "pruned"
    value = read_json(TRAIN_METRICS)[cfg["objective"]]
    study.tell(trial, value)
    print(f"tune: trial {trial.number}: {cfg['objective']}={value:.4f}", flush=True)
    return "complete"


def work(cfg, url, minutes):
    study = open_study(cfg, url)
    print(f"tune: study '{cfg['study']}' in {redact_url(url)}, {study.user_attrs.get('planned_trials')} trials",
          flush=True)
    deadline = time.time() + 60 * minutes if minutes else None
    ran = []
    with one_worker_per_clone():
        while deadline is None or time.time() < deadline:
            trial = claim(study)
            if trial is None:
                break
            try:
                ran.append(run_trial(study, url, cfg, trial))
            except KeyboardInterrupt:
                requeue(study, trial)
                print(f"\ntune: stopped; trial {trial.number} is queued again. Finished trials are kept: "
                      "rerun `python -m src.tune` to continue the study.", file=sys.stderr)
                sys.exit(130)
    finished = [t for t in study.get_trials(deepcopy=False) if counted(t)]
    print(f"tune: this worker ran {len(ran)} trials ({ran.count('pruned')} pruned, {ran.count('failed')} failed); "
          f"the study has {len(finished)} of {study.user_attrs.get('planned_trials')} finished. "
          "`python -m src.tune --best` shows the best", flush=True)


def show_best(cfg, url, apply):
    study = open_study(cfg, url, create=False)
    rows = trial_rows(study)
    write_table(rows, RESULTS / "trials.csv")
    plots = write_plots(study)
    best = best_trial(study)
    params = best.user_attrs["params"]
    states = [row["state"] for row in rows]
    print(f"study '{cfg['study']}': {states.count('complete')} complete, {states.count('pruned')} pruned, "
          f"{states.count('fail')} failed, {states.count('running')} running, {states.count('waiting')} waiting")
    print(f"best: trial {best.number} ({best.user_attrs.get('experiment')}), {cfg['objective']}={best.value:.4f}")
    for key, value in params.items():
        print(f"  {key}: {value}")
    print("wrote " + ", ".join(str(p) for p in [RESULTS / "trials.csv", *plots]))
    if apply:
        apply_params(params)
        print("params.yaml now holds these: `dvc repro` trains it (`dvc exp run -S train.time_budget=10` "
              "for longer)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=SPACE_FILE, help="the search file (default tune.yaml)")
    parser.add_argument("--storage", help="the study's database URL (default: tune.yaml's, else tune.db here)")
    parser.add_argument("--minutes", type=float, default=0, help="start no new trial after this many minutes")
    parser.add_argument("--best", action="store_true", help="show the best trial and write metrics/tune/")
    parser.add_argument("--apply", action="store_true", help="with --best: write its params into params.yaml")
    args = parser.parse_args()
    if args.apply and not args.best:
        raise UserError("--apply goes with --best: `python -m src.tune --best --apply`")
    cfg = load_space(args.space)
    url = storage_url(cfg, args.storage)
    if args.best:
        show_best(cfg, url, args.apply)
    else:
        work(cfg, url, args.minutes)


if __name__ == "__main__":
    run_stage(main)
