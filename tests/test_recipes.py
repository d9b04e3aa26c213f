"""Training recipes: augmentation policies, MixUp/CutMix, weight EMA, class balance, a time budget,
flip test-time augmentation. Each does what params.yaml says it does."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from benchmarks import recipe as recipe_benchmark
from src.core.device import Normalizer, RunSettings
from src.data.loaders import ImageFiles
from src.data.transforms import POLICIES, train_transform
from src.inference.classify import classify_files, forward, prepare_for_inference
from src.networks.checkpoint import load_checkpoint
from src.networks.resnet import resnet18
from src.split import class_imbalance
from src.training.ema import WeightEma
from src.training.schedule import EpochPlan
from src.training.trainer import class_weights, make_mix, make_trainer

from conftest import REPO, image_folder, make_project, python, run, set_params

CPU = torch.device("cpu")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_each_policy_gives_uint8_crops_of_the_size_repeatable_from_the_torch_seed(policy):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    augment = train_transform(32, (0.5, 1.0), hflip=0.5, augment=policy, random_erasing=0.5)
    torch.manual_seed(3)
    first = [augment(img) for _ in range(6)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 32, 32) for x in first)
    assert len({x.sum().item() for x in first}) > 1  # random
    torch.manual_seed(3)
    assert all(torch.equal(x, augment(img)) for x in first)  # seeded and resumable


def test_random_erasing_fills_with_the_mean_pixel_which_normalises_to_zero():
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    erase = train_transform(32, (1.0, 1.0), hflip=0.0, random_erasing=1.0)
    torch.manual_seed(0)
    x = erase(img)
    erased = (x != 255).any(0)
    assert 0 < erased.float().mean() < 0.5
    normalised = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CPU)(x[None])
    assert normalised[0][:, erased].abs().max() < 0.01


def one_hot(labels, n):
    return F.one_hot(labels, n).float()


def test_mixup_blends_images_and_targets_by_the_same_lambda():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    mixed, targets = make_mix({"mixup": 0.4, "cutmix": 0.0}, 4)(images, labels)
    rolled_images, rolled = images.roll(1, 0), one_hot(labels.roll(1, 0), 4)
    lam = 1 - targets[0][labels.roll(1, 0)[0]].item()  # the rolled class's share is 1 - lambda
    assert 0 < lam < 1
    assert torch.allclose(targets, lam * one_hot(labels, 4) + (1 - lam) * rolled)
    assert torch.allclose(mixed, lam * images + (1 - lam) * rolled_images, atol=1e-6)


def test_cutmix_pastes_a_box_and_its_area_share_is_the_target_share():
    torch.manual_seed(1)
    images, labels = torch.zeros(8, 3, 32, 32), torch.arange(8) % 4
    images += torch.arange(8).float()[:, None, None, None]  # each image one value: the source is readable
    for _ in range(5):
        mixed, targets = make_mix({"mixup": 0.0, "cutmix": 1.0}, 4)(images, labels)
        pasted = (mixed != images).all(1)  # pixels that came from the rolled image
        assert torch.equal(pasted[0], pasted[3])  # one box for the batch
        share = pasted[0].float().mean().item()
        expected = share * one_hot(labels.roll(1, 0), 4) + (1 - share) * one_hot(labels, 4)
        assert torch.allclose(targets, expected, atol=1e-6)
    assert make_mix({"mixup": 0.0, "cutmix": 0.0}, 4) is None


def test_class_weighted_loss_equals_the_hand_computed_one():
    labels = [0] * 6 + [1] * 2 + [2] * 4
    weights = class_weights(labels, 3)
    assert torch.allclose(weights, torch.tensor([12 / 18, 12 / 6, 12 / 12]))
    cfg = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "decay_bn_and_bias": False, "scheduler": "none",
           "warmup_epochs": 0, "epochs": 1, "time_budget": 0, "label_smoothing": 0.0, "grad_clip": 0.0,
           "class_balance": "loss", "ema_decay": 0.0, "mixup": 0.0, "cutmix": 0.0}
    run_settings = RunSettings(CPU, None, False, Normalizer((0.5,) * 3, (0.5,) * 3, CPU))
    trainer = make_trainer(nn.Linear(2, 3), cfg, 1, run_settings, EpochPlan(cfg), labels, 3)
    logits, batch = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    log_p = torch.log_softmax(logits, 1)[torch.arange(5), batch]
    by_hand = -(weights[batch] * log_p).sum() / weights[batch].sum()
    assert torch.allclose(trainer.criterion(logits, batch), by_hand)


def test_ema_follows_the_decay_with_its_warmup_and_keeps_batchnorm_counters():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEma(model, 0.9)
    start = model[0].weight.detach().clone()
    averaged = start.clone()
    for update in range(1, 30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model(torch.randn(4, 2))  # moves the BatchNorm stats and counter
        ema.update_parameters(model)
        if update > 1:  # the first update copies
            decay = min(0.9, (1 + update - 1) / (10 + update - 1))
            averaged = decay * averaged + (1 - decay) * model[0].weight.detach()
        else:
            averaged = model[0].weight.detach().clone()
        assert torch.allclose(ema.module[0].weight, averaged, atol=1e-5)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    resumed = WeightEma(model, 0.9)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == ema.updates == 29  # the decay warm-up continues where it was


def test_a_plan_spends_the_budget_on_the_measured_epoch_time_and_holds_the_rate_until_then():
    plan = EpochPlan({"time_budget": 1, "epochs": 6})  # one minute
    assert plan.epochs is None and plan.more(100)
    plan.update(1, 10.0, 11.0)  # the first epoch, warming up, took 10 s
    assert plan.epochs == 1 + round(49 / 10)
    plan.update(2, 5.0, 16.0)  # later epochs are what counts
    assert plan.epochs == 2 + round(44 / 5)
    assert EpochPlan({"time_budget": 0, "epochs": 6}).epochs == 6


def test_progressive_resizing_grows_crops_in_steps_of_8_to_full_size_for_the_last_quarter():
    plan = EpochPlan({"time_budget": 0, "epochs": 12, "start_image_size": 32}, image_size=64)
    sizes = [plan.image_size(e) for e in range(1, 13)]
    assert sizes[0] == 32 and sizes[-3:] == [64] * 3 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes) and len(set(sizes)) > 3
    assert [EpochPlan({"time_budget": 0, "epochs": 4}, image_size=64).image_size(e) for e in (1, 4)] == [64, 64]


def test_a_budget_plan_with_progressive_resizing_counts_each_epoch_by_its_pixels():
    plan = EpochPlan({"time_budget": 1, "epochs": 6, "start_image_size": 32}, image_size=64)
    assert plan.image_size(1) == 32  # not planned yet: the start size
    assert plan.size_for(1) == 32
    plan.update(1, 10.0 * (32 / 64) ** 2, 11.0)  # a 32 px epoch: 10 s per 64 px epoch
    planned = sum(plan.cost(e) for e in range(2, plan.epochs + 1)) * 10.0
    assert 49 - 15 <= planned <= 49 + 5  # the 49 s left, to within the nearest epoch
    assert plan.epochs > 1 + round(49 / 10)  # cheaper early epochs: more of them than at full size
    last = plan.epochs
    assert plan.size_for(last) == 64
    plan.epochs *= 3  # a plan that grows stretches the ramp: the schedule's size drops, the trained one doesn't
    assert plan.image_size(last + 1) < 64 == plan.size_for(last + 1)


def test_class_imbalance_reports_the_largest_over_the_smallest():
    per_class = {"a": {"train": 30, "val": 3, "test": 3}, "b": {"train": 9, "val": 1, "test": 2}, "c": {"train": 20}}
    assert class_imbalance(per_class) == {"largest": "a", "smallest": "b", "ratio": 3.0}


def test_tta_averages_the_plain_and_the_mirrored_logits(tmp_path):
    image_folder(tmp_path / "images", per_class=3, size=24)
    paths = sorted((tmp_path / "images").rglob("*.png"))
    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    ckpt = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 3}
    tta, errors = classify_files(copy.deepcopy(model), ckpt, paths, CPU, batch_size=4, precision="fp32", workers=0,
                                  tta=True)
    assert errors == [""] * len(paths)
    prepared, run_settings = prepare_for_inference(model, CPU, 32, ckpt, precision="fp32")
    files = ImageFiles(paths, 32)
    images = torch.stack([torch.from_numpy(files.pixels(i)[0]).permute(2, 0, 1) for i in range(len(files))])
    with torch.inference_mode():
        plain = forward(prepared, images, run_settings).float()
        mirrored = forward(prepared, images.flip(-1), run_settings).float()
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the flip matters to this model
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-4)


RECIPES = {  # every knob at least once, on tiny settings (each policy alone: above); the last with weight EMA
    "trivialaugment": {"train.augment": "trivialaugment", "train.random_erasing": 0.5, "train.class_balance": "loss",
                       "train.cutmix": 1.0},
    "randaugment": {"train.augment": "randaugment", "train.mixup": 0.2, "train.class_balance": "sampler",
                    "train.ema_decay": 0.99},
}
OFF = {"train.augment": "none", "train.random_erasing": 0.0, "train.mixup": 0.0, "train.cutmix": 0.0,
       "train.ema_decay": 0.0, "train.class_balance": "none"}


@pytest.mark.slow
def test_each_recipe_trains_through_the_stage_and_ema_saves_the_average(tmp_path):
    data = image_folder(tmp_path / "images", per_class=(10, 6, 6), size=24)
    project = make_project(tmp_path / "project", {"data.source": str(data), "data.image_size": 32,
                                                  "train.epochs": 1, "train.batch_size": 8})
    run(["dvc", "repro", "classes"], project)
    for name, recipe in RECIPES.items():
        set_params(project, {**OFF, **recipe})
        run([python(), "-m", "src.train"], project)
        metrics = json.loads((project / "metrics/train.json").read_text())
        assert metrics["epochs_run"] == 1 and 0 <= metrics["best_val_acc"] <= 1, name
    # With EMA on, model.pt holds the average (one epoch: the best is the last), not the trained weights.
    ckpt = load_checkpoint(project / "models/model.pt")
    saved, temperature = ckpt["model"], ckpt["temperature"]
    resume = torch.load(project / "models/resume.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in resume["ema"].items() if k.startswith("module.")}
    assert saved.keys() == ema.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in saved if not k.startswith("fc."))
    for k in ("fc.weight", "fc.bias"):  # the head: the average's, calibrated (divided by the temperature)
        assert torch.allclose(saved[k] * temperature, ema[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema["fc.weight"], resume["model"]["fc.weight"])


@pytest.mark.slow
def test_a_20_second_budget_ends_within_ten_percent_with_progressive_resizing(tmp_path):
    data = image_folder(tmp_path / "images", size=24)
    project = make_project(tmp_path / "project", {"data.source": str(data), "data.image_size": 32,
                                                  "train.batch_size": 8, "train.time_budget": 1 / 3,
                                                  "train.start_image_size": 16})
    run(["dvc", "repro", "train"], project)
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert 18 <= metrics["train_seconds"] <= 22, metrics
    history = (project / "metrics/train_history.csv").read_text().splitlines()
    header = history[0].split(",")
    column = lambda name: [int(line.split(",")[header.index(name)]) for line in history[1:]]  # noqa: E731
    assert column("planned_epochs")[-1] == metrics["epochs_run"] > 2  # it trained the epochs it planned
    sizes = column("image_size")
    assert sizes[0] == 16 and sizes[-1] == 32 and sizes == sorted(sizes)


def test_every_benchmark_row_sets_knobs_params_yaml_has_to_values_it_accepts():
    """benchmarks/recipe.py's rows are `-S` settings: a misspelt knob or a refused value would cost
    an hour of benchmark before anyone noticed."""
    import yaml

    from src.core.params import validate
    from src.core.recipes import fill
    for name, settings in recipe_benchmark.ROWS.items():
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["source"] = "photos"  # as the benchmark sets it
        for dotted, value in settings.items():
            node = params
            *parents, last = dotted.split(".")
            for key in parents:
                assert key in node, (name, dotted)
                node = node[key]
            assert last in node, (name, dotted)
            node[last] = yaml.safe_load(str(value))
        validate(fill(params)[0])
