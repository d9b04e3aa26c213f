"""MLflow tracking: one run per training, shared by the evaluate stage.

The store is MLFLOW_TRACKING_URI when set (a team server), else a SQLite file at the
workspace root. `dvc exp run --temp/--queue` runs stages in .dvc/tmp/exps/..., a copy that
is deleted afterwards; DVC_ROOT points back at the real workspace, so those runs and their
artifacts land in the same store that `mlflow ui` at the repo root shows.
"""
import fcntl
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow

from src.core.errors import UserError
from src.core.params import flatten
from src.core.paths import MANIFEST, workspace_root

HEALTH_TIMEOUT = 5  # seconds: an unreachable server should stop the stage at once, not after training


def local_uri():
    return f"sqlite:///{workspace_root() / 'mlflow.db'}"


def tracking_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or local_uri()


def check_server(uri):
    """Fail in seconds with one line when a configured tracking server doesn't answer.

    MLflow's own client retries for minutes; by then a stage could have trained for nothing.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answered (perhaps 401 from a proxy): reachable; MLflow's own calls say the rest
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {reason}; "
                        f"start it, or unset MLFLOW_TRACKING_URI to log into the local mlflow.db") from None


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
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock():
        experiment = mlflow.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = None
            # Compared, not read from the environment: set_tracking_uri() exports MLFLOW_TRACKING_URI.
            if uri == local_uri():
                location = (workspace_root() / "mlartifacts").as_uri()
            try:
                experiment_id = mlflow.create_experiment(experiment_name, artifact_location=location)
            except mlflow.exceptions.MlflowException:
                # Another machine (a clone logging to the same server) created it meanwhile: the lock
                # above only covers this workspace.
                experiment = mlflow.get_experiment_by_name(experiment_name)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
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


def log_dataset(source, dataset_digest):
    """The split manifest as the run's input dataset: name, digest and where the images came from."""
    if not MANIFEST.is_file():
        return
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "sample" is no path or URL; MLflow warns, then records it as given
        warnings.simplefilter("ignore")
        resolved = resolve_dataset_source(source)
    name = Path(source.rstrip("/")).name or source
    # MLflow caps a dataset digest at 36 characters; the full sha256 is the run's dataset_digest tag.
    with warnings.catch_warnings():  # a hint about integer columns, meant for model signatures
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(pd.read_csv(MANIFEST, dtype=str), source=resolved, name=name,
                                          digest=dataset_digest[:36] if dataset_digest else None)
        mlflow.log_input(dataset, context="training")


def start_training_run(params, dataset_digest, run_id=None, tags=None):
    """Open the MLflow run for one training (or reopen `run_id` when resuming); logs params.
    `tags`: more tags for a new run (a search's study and trial).

    Use as a context manager: `with start_training_run(...) as run:`.
    """
    experiment_id = setup(params["mlflow"]["experiment"])
    if run_id:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(tags or {})  # a resumed search trial runs under its new trial number
        return run
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(),
                           tags={**run_tags(dataset_digest), **(tags or {})})
    mlflow.log_params(flatten(params))
    log_dataset(params["data"]["source"], dataset_digest)
    return run


def set_tags(tags):
    mlflow.set_tags(tags)


DECISIVE = ("val_acc", "val_loss")  # the curves that pick the weights: the chart view's first section
# MLflow's chart view shows one section per metric prefix, sorted as plain (ASCII) strings, before
# the unprefixed metrics: "curves" first, then evaluate's headline ("test" or "val", its ECE
# calibrated and not side by side), then these per-epoch vitals ("training" would come before "val").
SECTIONS = {"decisive": "curves", "rest": "vitals"}


def log_epoch(row, flat=()):
    """Per-epoch metrics of the active run, step = epoch: curves/val_acc and curves/val_loss, then
    the rest as vitals/train_loss, vitals/lr, ... Keys in `flat` (series that cannot vary in
    this run, e.g. image_size without progressive resizing) are not logged: flat lines only push
    the decisive charts down."""
    mlflow.log_metrics({f"{SECTIONS['decisive' if k in DECISIVE else 'rest']}/{k}": v for k, v in row.items()
                        if k != "epoch" and k not in flat}, step=row["epoch"])


def log_files(paths, artifact_path=None):
    """Log each file that exists (a stage may not have written an optional one)."""
    for path in paths:
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path)


def curves_png(history, path):
    """Loss and accuracy per epoch, the training-curves picture the MLflow UI shows beside the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            ax.plot(epochs, [r[f"{split}_{what}"] for r in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title("accuracy" if what == "acc" else what)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_model(model, image_size):
    """`model` (a plain network in eval mode, on the CPU) as an MLflow PyTorch model; returns its URI
    (also tagged `model_uri`). Saved as an exported graph (pt2), not a pickle: loading it runs no
    code and needs no copy of src/.
    """
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import infer_signature

    size = image_size
    # A normalised NCHW image batch; two images, because torch.export fixes a batch size of 1.
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    # An exported (pt2) graph keeps its weights on the device it was saved from, the CPU here,
    # while MLflow validates the input example on a GPU when one is visible: it would fail.
    previous = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = "cpu"
    try:
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, output), input_example=example,
            serialization_format="pt2",
            # MLflow would load the saved graph again to try the example, and only warn if it failed
            # (seconds per training, nothing guarded): the tests load and run it instead.
            validate_serving_input=False,
            # Given explicitly: inferring them loads the model again in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"])
    finally:
        if previous is None:
            del os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"]
        else:
            os.environ["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = previous
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri


def finish_training(metrics, history=(), artifacts=(), checkpoint=None, model=None, image_size=None):
    """Summary metrics, training curves, files, the checkpoint file and the network (`log_model`)
    of the active run once training ends."""
    mlflow.log_metrics(metrics)
    if history:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "training_curves.png"
            curves_png(history, png)
            mlflow.log_artifact(str(png), "plots")
    log_files(artifacts)
    if checkpoint:
        log_files([checkpoint], "checkpoint")
    if model is not None:
        log_model(model, image_size)


def log_evaluation(params, run_id, split, metrics, artifacts=()):
    """The evaluate stage's results, into the training's run: the headline numbers as metrics named
    as in eval.json (`test/accuracy`), per-class numbers as one table (`per_class_metrics.json`)
    so the run's charts open on the curves and the headline, and the files (confusion matrix, ...)."""
    setup(params["mlflow"]["experiment"])
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        # e.g. weights fetched with `dvc pull` into a clone whose store never saw their training
        print(f"evaluate: MLflow run {run_id} is not in {tracking_uri()}; metrics not logged to MLflow")
        return
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"{split}/{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        per_class = metrics.get("per_class") or {}
        if per_class:
            import pandas as pd
            table = pd.DataFrame([{"class": name, **values} for name, values in per_class.items()])
            mlflow.log_table(table, artifact_file="per_class_metrics.json")
        log_files(artifacts)
