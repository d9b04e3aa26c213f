"""Stage `train`: fit `arch` on the train split, keep the best-val-accuracy weights.

Writes models/model.pt (best epoch, self-describing), metrics/train.json,
metrics/train_history.csv (one row per epoch, for `dvc plots`), and one MLflow run.
Each epoch's val accuracy is measured exactly as the evaluate stage measures it.

models/resume.pt holds the last completed epoch (`src.training.resume.Progress`): a rerun with the
same params and data continues from it after a crash or a kill.

Distributed: `torchrun --nproc_per_node=N -m src.train` trains with DistributedDataParallel;
train.batch_size stays the global batch (split across processes); rank 0 alone writes and logs.
"""
import contextlib
import copy
import time

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from src.core import process, recipes, tracking
from src.core.device import Normalizer, RunSettings, configure, pick_device, pick_precision, use_channels_last
from src.core.errors import UserError
from src.core.files import read_json, write_json, write_text
from src.core.params import load_params
from src.core.paths import CLASS_INDEX, DATA_REPORT, TRAIN_HISTORY, TRAIN_METRICS
from src.core.process import decoding_workers, run_stage
from src.data.datasets import ImageListDataset
from src.data.image_files import resize_size
from src.data.loaders import ImageFiles, make_loader
from src.data.manifest import load_class_names, read_manifest, rows_for
from src.data.transforms import train_transform
from src.inference.classify import classify_files
from src.networks.checkpoint import eval_image_size, load_trained_model, save_checkpoint
from src.networks.pretrained import arch_as_trained, normalization
from src.networks.transfer import create_model, set_transfer_phase
from src.search.report import TrialReport
from src.training.calibration import fit_temperature, fold_temperature
from src.training.distributed import (
    any_rank,
    check_ranks_agree,
    gather_shards,
    init_distributed,
    rank0_values,
    sync_buffers,
)
from src.training.resume import Progress, gather_rng_states
from src.training.schedule import EpochPlan
from src.training.trainer import make_trainer, train_one_epoch

CACHE_LIMIT = 20_000  # cache decoded images in memory below this many (train.cache_images=auto)


def load_data(params, class_names, device, dist):
    """(train dataset, val images (this rank's share) and all val labels, loader workers).

    The val images are read exactly as evaluate reads them (`ImageFiles`, at data.eval_image_size),
    so the val accuracy that picks the best epoch is the one evaluate reports for these weights on
    the same split.
    Under torchrun each rank reads every world_size-th val image (`evaluate` reassembles them).
    """
    data, cfg = params["data"], params["train"]
    rows = read_manifest()
    train_paths, train_labels = rows_for(rows, "train", class_names)
    val_paths, val_labels = rows_for(rows, "val", class_names)
    cache = cfg["cache_images"]
    if cache == "auto":
        cache = len(train_paths) + len(val_paths) <= CACHE_LIMIT
    side = resize_size(data["image_size"])
    augment = train_transform(data["image_size"], cfg["crop_scale"], cfg["hflip"], cfg["augment"],
                              cfg["random_erasing"])
    train_set = ImageListDataset(train_paths, train_labels, augment, cache, side)
    val = (ImageFiles(val_paths[dist.rank::dist.world_size], eval_image_size(data), keep=cache),
           torch.tensor(val_labels, dtype=torch.long))
    workers = decoding_workers(cfg["workers"], len(train_paths), cfg["batch_size"], training=True, cached=cache,
                               on_cpu=device.type == "cpu", processes_per_machine=dist.local_world_size)
    return train_set, val, workers


def evaluate(model, info, val, device, batch_size, dist=None):
    """(val loss, val accuracy, val logits) through evaluate's own path (`classify_files`: its decoding, its
    inference rewrites, its precision rule), on a copy so the training model keeps its state.
    The loss is plain cross-entropy in float64, as evaluate reports it (no label smoothing).
    Under torchrun each rank scores its share and every rank gets all the logits, in order: the
    same numbers as one process, on every rank (so all agree on early stopping)."""
    files, labels = val
    logits, errors = classify_files(copy.deepcopy(model), info, files, device, batch_size=batch_size,
                                    workers=0 if files.kept is not None else "auto", desc="validate") \
        if len(files) else (torch.empty(0, info["num_classes"]), [])  # more ranks than val images
    bad = next((f"{path}: {error}" for path, error in zip(files.paths, errors) if error), None)
    if dist is not None and dist.world_size > 1:
        logits = gather_shards(logits, len(labels), dist)
        if any_rank(bad is not None):
            bad = bad or "a val image another rank reads"
    if bad:
        raise UserError(f"{bad}; fix or remove it and rerun `dvc repro`")
    loss = F.cross_entropy(logits.double(), labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item(), logits


def run_settings(params, device):
    """How this run's training tensors go: device, precision, memory format, normalisation."""
    cfg, size = params["train"], params["data"]["image_size"]
    mean_std = normalization(params)
    return RunSettings(device, pick_precision(cfg["precision"], device, size),
                       use_channels_last(cfg["channels_last"], device, size),
                       Normalizer(mean_std["mean"], mean_std["std"], device)), mean_std


def train_loader(params, train_set, workers, dist, device):
    """Shuffled batches of this process's share; (loader, sampler or None, shuffling generator)."""
    cfg = params["train"]
    if cfg["batch_size"] % dist.world_size:
        raise UserError(f"train.batch_size={cfg['batch_size']} is the global batch and must divide evenly "
                        f"over {dist.world_size} processes; use a multiple of {dist.world_size}")
    batch_size = cfg["batch_size"] // dist.world_size
    generator = torch.Generator().manual_seed(params["seed"])
    sampler = None
    if dist.world_size > 1:
        if cfg["class_balance"] == "sampler":
            raise UserError("train.class_balance=sampler is single-process; under torchrun use "
                            "train.class_balance=loss")
        sampler = DistributedSampler(train_set, seed=params["seed"])
    elif cfg["class_balance"] == "sampler":  # every class equally likely per draw, an epoch's worth of draws
        counts = torch.bincount(torch.as_tensor(train_set.labels)).double()
        sampler = WeightedRandomSampler(1 / counts[train_set.labels], len(train_set), generator=generator)
    lone_last = len(sampler or train_set) % batch_size == 1  # a batch of one would crash BatchNorm
    # Workers that outlive an epoch would keep their crop size: progressive resizing restarts them.
    loader = make_loader(train_set, batch_size, shuffle=True, workers=workers, pin_memory=device.type == "cuda",
                         sampler=sampler, generator=generator, drop_last=lone_last,
                         persistent=not cfg["start_image_size"])
    return loader, sampler, generator


def main():
    process.start()
    params, filled = arch_as_trained(*load_params(with_filled=True))
    cfg = params["train"]
    dist, device = init_distributed(pick_device(cfg["device"]))
    configure(device, cfg["deterministic"])
    torch.manual_seed(params["seed"] + dist.rank)  # each rank its own augmentations
    class_names = load_class_names()
    run, mean_std = run_settings(params, device)
    model = create_model(params, len(class_names)).to(device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, val, workers = load_data(params, class_names, device, dist)
    loader, sampler, generator = train_loader(params, train_set, workers, dist, device)
    progress = Progress(params, class_names, mean_std, dist)
    plan = EpochPlan(cfg, progress.resumed["history"] if progress.resumed else (), params["data"]["image_size"])
    trainer = make_trainer(model, cfg, len(loader), run, plan, train_set.labels, len(class_names))
    progress.restore(model, trainer, generator)

    def wrap(model):
        """DDP (under torchrun) and torch.compile around the bare model. DDP registers only the
        parameters that need gradients when it wraps, so it is rebuilt when head_first unfreezes."""
        if dist.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(model) if cfg["compile"] else model

    train_model = wrap(model)
    if dist.is_main:
        layout = ", channels_last" if run.channels_last else ""
        print(f"train: {params['arch']} on {device} ({run.precision_name}{layout}"
              f"{f', {dist.world_size} processes' if dist.world_size > 1 else ''}), {len(train_set)} train / "
              f"{len(val[1])} val images, {len(class_names)} classes" + progress.resuming_note())
    # The clock of train.time_budget and train_seconds; a resumed run adds the time it had.
    started = time.time() - plan.elapsed_before(progress.history)
    flat = [k for k, flat in (("image_size", not cfg["start_image_size"]), ("planned_epochs", not cfg["time_budget"]),
                              ("lr", cfg["scheduler"] == "none" and not cfg["warmup_epochs"])) if flat]
    trial = TrialReport.from_env() if dist.world_size == 1 else None  # a trial of `python -m src.tune`
    # Opened before the first epoch so an unreachable tracking server fails fast.
    with (tracking.start_training_run(params, read_json(DATA_REPORT)["dataset_digest"], run_id=progress.run_id,
                                      tags=trial.tags() if trial else None)
          if dist.is_main else contextlib.nullcontext()) as mlflow_run:
        progress.begin(mlflow_run.info.run_id if dist.is_main else None)
        epoch, best_logits = progress.next_epoch, None
        while plan.more(epoch):
            epoch_start = time.time()
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            if set_transfer_phase(model, params["model"], epoch):  # head_first: unfreeze now
                train_model = wrap(model)
            lr, size = trainer.optimizer.param_groups[0]["lr"], plan.size_for(epoch)
            train_set.set_crop_size(size)
            train_loss, train_acc = train_one_epoch(train_model, loader, trainer, run, epoch, dist.is_main)
            sync_buffers(model)
            sync_buffers(trainer.scored(model))
            val_loss, val_acc, val_logits = evaluate(trainer.scored(model), progress.info, val, device,
                                                     cfg["batch_size"], dist)
            # rank 0's clock plans every rank's epochs, so all ranks stop together
            plan.update(epoch, *rank0_values(time.time() - epoch_start, time.time() - started))
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": lr, "image_size": size, "seconds": round(time.time() - started, 2),
                   "planned_epochs": plan.epochs}
            stop = progress.end_epoch(row, model, trainer)
            if progress.best["epoch"] == epoch:
                best_logits = val_logits  # model.pt's, for calibration: no second pass over val
            if dist.is_main:
                tracking.log_epoch(row, flat)
            if trial and not stop and trial.should_stop(progress.history):
                print(f"train: pruned by the study after epoch {epoch} (a trial far behind the others)")
                tracking.set_tags({"tune.state": "pruned"})
                stop = True
            last = stop or not plan.more(epoch + 1)
            progress.checkpoint(model, trainer, generator, gather_rng_states(dist), last)
            if stop:
                break
            epoch += 1
        if dist.is_main:
            summarise(progress, time.time() - started, calibrate(progress, params, class_names, device, best_logits),
                      recipe_record(params["recipe"], filled), params["mlflow"]["log_model"])
    if torch_dist.is_initialized():
        check_ranks_agree(model)
        print(f"train: rank {dist.rank} of {dist.world_size} trained {len(progress.history) - progress.next_epoch + 1} "
              f"epochs on its {len(sampler)} of {len(train_set)} train images")
        torch_dist.destroy_process_group()


def calibrate(progress, params, class_names, device, logits=None):
    """Temperature scaling (`src.training.calibration`): T fitted on every val image with the best
    weights, folded into model.pt's head and recorded there; 1.0 with train.calibrate off. Starts
    from the uncalibrated weights each time (a rerun after a kill here fits the same T again).
    `logits`: the best epoch's val logits where this run scored them (else val is scored again)."""
    if not params["train"]["calibrate"]:
        return 1.0
    model, ckpt = load_trained_model(progress.model_path, device)
    paths, labels = rows_for(read_manifest(), "val", class_names)
    if not paths:
        return 1.0
    if logits is None:  # the best epoch was before a resume
        logits, _ = classify_files(copy.deepcopy(model), ckpt, paths, device,
                                   batch_size=params["train"]["batch_size"], desc="calibrate")
    temperature = fit_temperature(logits, labels)
    state = fold_temperature({k: v.cpu() for k, v in ckpt["model"].items()}, model, temperature)
    save_checkpoint(progress.model_path, {**ckpt, "model": state, "temperature": temperature})
    return temperature


def recipe_record(name, filled):
    """The recipe and the values it gave the knobs params.yaml left null, nested as in params.yaml
    ({"name": "photo", "train": {"lr": 0.002, ...}}): what `dvc exp show` lists as recipe.train.lr."""
    return {"name": name, **recipes.nested(filled)}


def summarise(progress, seconds, temperature, recipe, log_model):
    """metrics/train.json, metrics/train_history.csv and the MLflow run's summary and (log_model)
    network (MLflow has the effective values of every knob as the run's params already)."""
    best, history = progress.best, progress.history
    metrics = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
               "temperature": temperature, "final_train_acc": history[-1]["train_acc"], "epochs_run": len(history),
               "train_seconds": round(seconds, 1)}
    best_model = image_size = None
    if log_model:  # the network as an MLflow model: exactly the weights saved
        best_model, ckpt = load_trained_model(progress.model_path)
        image_size = ckpt["image_size"]
    tracking.finish_training(metrics, history, [CLASS_INDEX, DATA_REPORT], checkpoint=progress.model_path,
                             model=best_model, image_size=image_size)
    write_json(TRAIN_METRICS, {**metrics, "recipe": recipe})
    header = list(history[0])
    write_text(TRAIN_HISTORY, ",".join(header) + "\n" + "".join(
        ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in header) + "\n" for r in history))
    progress.finish()
    print(f"train: best val acc {best['val_acc']:.4f} at epoch {best['epoch']} -> {progress.model_path} "
          f"({seconds:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
