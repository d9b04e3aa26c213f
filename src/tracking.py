"""MLflow tracking: one run per training, shared by the evaluate stage.

The store is MLFLOW_TRACKING_URI when set (a team server), else a SQLite file at the
workspace root. `dvc exp run --temp/--queue` runs stages in .dvc/tmp/exps/..., a copy that
is deleted afterwards; DVC_ROOT points back at the real workspace, so those runs and their
artifacts land in the same store that `mlflow ui` at the repo root shows.
"""
import fcntl
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow

from src.params import flatten


def workspace_root():
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace_root() / 'mlflow.db'}"


@contextmanager
def store_lock():
    """Serialise store creation: two queue workers migrating one SQLite file at once can crash."""
    lock_path = workspace_root() / ".mlflow.lock"
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def setup(experiment_name):
    """Point MLflow at the store and make sure the project's experiment exists; returns its id."""
    mlflow.set_tracking_uri(tracking_uri())
    with store_lock():
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = None
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                location = (workspace_root() / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
    return experiment_id


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_tags(dataset_digest=None):
    tags = {
        "git_commit": git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
        "dataset_digest": dataset_digest,
    }
    return {k: v for k, v in tags.items() if v}


def run_name():
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def start_training_run(params, dataset_digest, run_id=None):
    """Open the MLflow run for one training (or reopen `run_id` when resuming); logs params.

    Use as a context manager: `with start_training_run(...) as run:`.
    """
    experiment_id = setup(params["mlflow"]["experiment"])
    if run_id:
        return mlflow.start_run(run_id=run_id)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(), tags=run_tags(dataset_digest))
    mlflow.log_params(flatten(params))
    return run


def log_epoch(row):
    """Per-epoch metrics of the active run, step = epoch."""
    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def finish_training(metrics):
    """Summary metrics of the active run once training ends."""
    mlflow.log_metrics(metrics)


def log_evaluation(params, run_id, metrics):
    """The evaluate stage's metrics, into the training's run."""
    setup(params["mlflow"]["experiment"])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
