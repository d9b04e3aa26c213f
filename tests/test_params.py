"""Every bad param stops the train stage at once, before any data is read, with one line."""
import copy

import pytest
import yaml

from src.core.errors import UserError, first_line
from src.core.params import load_params, validate
from src.core.recipes import DIGITS, PHOTO, PHOTO_FINETUNE, fill

from conftest import REPO, python, run, set_params

BAD = [
    ("train.optimizer", "adagrad", "train.optimizer='adagrad' is not allowed; use adam | adamw | sgd"),
    ("train.lr", 0, "train.lr=0 is not allowed; use a finite number > 0"),
    ("train.lr", float("inf"), "train.lr=inf is not allowed; use a finite number > 0"),
    ("train.lr", float("nan"), "train.lr=nan is not allowed"),
    ("train.weight_decay", float("inf"), "train.weight_decay=inf is not allowed; use a finite number >= 0"),
    ("train.mixup", float("inf"), "train.mixup=inf is not allowed"),
    ("train.time_budget", float("inf"), "train.time_budget=inf is not allowed; use a number in [0, 525600]"),
    ("seed", 2**63, "seed=9223372036854775808 is not allowed; use an integer >= 0 and <= 4294967295"),
    ("seed", -1, "seed=-1 is not allowed"),
    ("data.image_size", 100000, "data.image_size=100000 is not allowed; use an integer >= 1 and <= 4096"),
    ("train.workers", 10**6, "train.workers=1000000 is not allowed; use auto or an integer >= 0 and <= 1024"),
    ("evaluate.batch_size", 10**7, "evaluate.batch_size=10000000 is not allowed"),
    ("evaluate.calibration_bins", 10**6, "evaluate.calibration_bins=1000000 is not allowed"),
    ("train.epochs", 10**9, "train.epochs=1000000000 is not allowed"),
    ("data.sha256", "abc", "data.sha256='abc' is not allowed; use null or the 64 hex characters"),
    ("data.sha256", "g" * 64, "is not allowed; use null or the 64 hex characters"),
    ("train.lr", -0.1, "train.lr=-0.1 is not allowed"),
    ("train.batch_size", 0, "train.batch_size=0 is not allowed; use an integer >= 1"),
    ("data.image_size", 0, "data.image_size=0 is not allowed; use an integer >= 1"),
    ("data.image_size", 32.5, "data.image_size=32.5 is not allowed; use an integer >= 1"),
    ("data.image_size", "big", "data.image_size='big' is not allowed"),
    ("train.learning_rate", 0.1, "unknown key 'train.learning_rate'; allowed here: epochs, time_budget"),
    ("train.precision", "fp8", "train.precision='fp8' is not allowed; use auto | fp32 | bf16 | fp16"),
    ("train.warmup_epochs", 7, "train.warmup_epochs=7 must not exceed train.epochs=6"),
    ("train.workers", -1, "train.workers=-1 is not allowed; use auto or an integer >= 0"),
    ("train.deterministic", "yes", "train.deterministic='yes' is not allowed; use true | false"),
]


def shipped():
    """params.yaml as shipped, its null knobs filled by the recipe (the sample's: digits)."""
    return fill(yaml.safe_load((REPO / "params.yaml").read_text()))[0]


@pytest.mark.parametrize("dotted, value, expected", BAD)
def test_validator_names_key_and_allowed_values(dotted, value, expected):
    params = shipped()
    bad = copy.deepcopy(params)
    node = bad
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    validate(params)  # the shipped file is valid
    with pytest.raises(UserError) as e:
        validate(bad)
    assert expected in str(e.value) and "\n" not in str(e.value)


# Through the stage's real command, a bad value and an unknown key (each costs a process start;
# the validator test above covers every message).
@pytest.mark.parametrize("dotted, value, expected", [b for b in BAD if b[0] in ("train.optimizer",
                                                                              "train.learning_rate")])
@pytest.mark.slow
def test_bad_param_fails_before_data_loads(project, dotted, value, expected):
    set_params(project, {dotted: value})
    # No data exists in the fresh project: a message about the param (not about a missing
    # manifest) proves validation ran before any data was read.
    result = run([python(), "-m", "src.train"], project, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: params.yaml: ") and expected in lines[0], lines[0]
    assert not (project / "models").exists()


def test_yaml_inf_is_refused_when_params_yaml_is_read(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  lr: null", "  lr: .inf")
    assert "lr: .inf" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(UserError, match=r"train.lr=inf is not allowed; use a finite number > 0"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("url", ["https://bob:hunter2@example.com/photos.zip",
                                 "https://example.com/photos.zip?X-Amz-Signature=hunter2&X-Amz-Expires=60"])
def test_url_with_credentials_is_refused_without_printing_them(url):
    params = shipped()
    params["data"]["source"] = url
    with pytest.raises(UserError) as e:
        validate(params)
    message = str(e.value)
    assert message.startswith("params.yaml: data.source='https://example.com/photos.zip") and "\n" not in message
    assert "hunter2" not in message and "bob" not in message and "~/.netrc" in message
    params["data"]["source"] = "https://example.com/photos.zip"
    validate(params)  # the same URL, clean, is fine


def test_unknown_top_level_key_through_dvc(project):
    set_params(project, {"trian": {"epochs": 1}})
    result = run(["dvc", "repro", "train"], project, check=False)
    assert result.returncode != 0
    expected = "error: params.yaml: unknown key 'trian'; allowed here: recipe, arch, seed, data"
    assert expected in result.stderr + result.stdout
    assert not (project / "data" / "raw").exists()  # stopped at the first stage, before ingesting


def test_error_messages_survive_exceptions_that_say_nothing():
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(OSError("\n  \n")) == "OSError"
    assert first_line(RuntimeError("\n  first\nsecond")) == "first"
    assert first_line(RuntimeError("x" * 500), 120) == "x" * 120


def recipe_params(tmp_path, **changes):
    """load_params of the shipped params.yaml with `changes` ({"data.source": ...}) written in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(tmp_path / "params.yaml", with_filled=True)


def effective(params, recipe):
    """{knob: its value in params} for the recipe's knobs ("arch" top-level, "train.lr" in a section)."""
    return {knob: params[knob] if "." not in knob else params[knob.split(".")[0]][knob.split(".")[1]]
            for knob in recipe}


def test_the_switch_gives_photos_the_photo_recipe_the_sample_digits_and_pretrained_weights_fine_tuning(tmp_path):
    photos = recipe_params(tmp_path, **{"data.source": str(tmp_path)})[0]
    assert photos["recipe"] == "photo" and effective(photos, PHOTO) == PHOTO
    sample, filled = recipe_params(tmp_path)
    assert sample["recipe"] == "digits" and effective(sample, DIGITS) == DIGITS == filled
    tuned = recipe_params(tmp_path, **{"data.source": str(tmp_path), "model.pretrained": "imagenet"})[0]
    assert tuned["recipe"] == "photo-finetune" and effective(tuned, PHOTO_FINETUNE) == PHOTO_FINETUNE
    assert PHOTO_FINETUNE["train.lr"] < PHOTO["train.lr"]
    forced = recipe_params(tmp_path, recipe="photo")[0]  # the switch itself, on the sample
    assert effective(forced, PHOTO) == PHOTO


def test_a_knob_given_a_value_wins_over_the_recipe_and_only_nulls_are_filled(tmp_path):
    params, filled = recipe_params(tmp_path, **{"data.source": str(tmp_path), "train.hflip": 0.25, "arch": "resnet34"})
    assert params["train"]["hflip"] == 0.25 and "train.hflip" not in filled
    assert params["arch"] == "resnet34" and "arch" not in filled  # a top-level knob too (-S arch=resnet34)
    assert params["train"]["optimizer"] == PHOTO["train.optimizer"] and filled["train.optimizer"] == "adamw"
    assert set(filled) == set(PHOTO) - {"train.hflip", "arch"}


def test_a_bad_recipe_and_a_null_the_recipe_does_not_fill_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^params.yaml: recipe='fast' is not allowed; use auto \| photo \| digits$"):
        recipe_params(tmp_path, recipe="fast")
    with pytest.raises(UserError, match=r"^params.yaml: train.momentum=None is not allowed"):
        recipe_params(tmp_path, **{"train.momentum": None})
