"""Temperature scaling: fitted on val, folded into the head, argmax untouched."""
import pytest
import torch
import torch.nn as nn

from src.evaluate import classification_metrics
from src.networks.resnet import resnet18
from src.training.calibration import fit_temperature, fold_temperature


def overconfident_classifier(seed=0):
    """A linear classifier of noisy 3-class data, its weights multiplied by 20: right about 70% of
    the time and almost always ~100% sure. (inputs, labels, model)"""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (600,), generator=g)
    centres = torch.eye(3, 8) * 2
    inputs = centres[labels] + torch.randn(600, 8, generator=g) * 1.5
    model = nn.Sequential(nn.Identity(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.copy_(centres * 20)
        model[1].bias.zero_()
    return inputs, labels, model


def test_temperature_scaling_lowers_nll_of_an_overconfident_model_and_keeps_every_argmax():
    inputs, labels, model = overconfident_classifier()
    val, test = slice(0, 300), slice(300, 600)
    with torch.no_grad():
        raw = model(inputs)
    temperature = fit_temperature(raw[val], labels[val])
    assert temperature > 5  # far too sure: the logits need dividing
    model.load_state_dict(fold_temperature(model.state_dict(), model, temperature))
    with torch.no_grad():
        calibrated = model(inputs)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))
    assert torch.allclose(calibrated * temperature, raw, rtol=1e-5, atol=1e-4)
    # On the held-out half, which T never saw: lower NLL and a smaller calibration error.
    before, _, _ = classification_metrics(labels[test].numpy(), raw[test], ["a", "b", "c"], bins=10)
    after, _, _ = classification_metrics(labels[test].numpy(), calibrated[test], ["a", "b", "c"], bins=10,
                                         temperature=temperature)
    assert after["loss"] < 0.8 * before["loss"] and after["ece"] < 0.6 * before["ece"]
    assert after["loss_uncalibrated"] == pytest.approx(before["loss"], rel=1e-4)
    assert after["ece_uncalibrated"] == pytest.approx(before["ece"], abs=1e-4)
    assert after["accuracy"] == before["accuracy"]


def test_a_calibrated_model_gets_a_temperature_near_one():
    torch.manual_seed(1)
    logits = torch.randn(4000, 4) * 2
    labels = torch.distributions.Categorical(logits=logits).sample()  # drawn from its own softmax
    assert abs(fit_temperature(logits, labels) - 1) < 0.1


def test_folding_scales_only_the_classification_head_of_a_resnet():
    model = resnet18(num_classes=5)
    state = model.state_dict()
    folded = fold_temperature(state, model, 2.0)
    assert torch.equal(folded["fc.weight"], state["fc.weight"] / 2) and torch.equal(folded["fc.bias"],
                                                                                   state["fc.bias"] / 2)
    assert all(torch.equal(folded[k], v) for k, v in state.items() if not k.startswith("fc."))
