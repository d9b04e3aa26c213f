"""src/networks/resnet.py is torchvision's ResNet family, weight for weight; the registry and include_top."""
import pytest
import torch
import torch.nn as nn
import torchvision

from src.core.errors import UserError
from src.networks.factory import build_model
from src.networks.pretrained import imagenet_weights
from src.networks.resnet import FAMILY, NARROW, RESNET_D
from src.networks.transfer import head_module_name


def randomize_bn(model, seed):
    """Give every BatchNorm distinct statistics and affine weights: with the default ones
    (mean 0, var 1, weight 1, bias 0) eval-mode BN is nearly the identity, and two BN
    layers loaded into each other's places would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", [a for a in FAMILY if a not in RESNET_D and a not in NARROW])
def test_family_equals_torchvision(arch):
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch, weights=None).eval()
    with torch.device("meta"):  # no random init: the strict load below gives ours every tensor
        ours = FAMILY[arch]().eval()
    assert n_params(ours) == n_params(theirs)
    ours.to_empty(device="cpu")
    assert n_params(ours) == torchvision.models.get_model_weights(arch).DEFAULT.meta["num_params"]
    # 48 px: small enough for the 100M-parameter archs, yet layer4 still sees a 2x2 map.
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # torchvision's weights into ours...
        randomize_bn(theirs, seed=2)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        expected = theirs(x)
        assert expected.shape == (2, 1000) and expected.std() > 1e-3  # a non-trivial output to compare
        assert (ours(x) - expected).abs().max().item() <= 1e-4
        # ...and ours into torchvision's.
        randomize_bn(ours, seed=3)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        expected = ours(x)
        assert (theirs(x) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_the_batchnorms_torchvision_zeroes(arch):
    theirs = torchvision.models.get_model(arch, weights=None, zero_init_residual=True).state_dict()
    ours = build_model(arch, 1000, zero_init_residual=True).state_dict()
    zeroed = {k for k, v in ours.items() if k.endswith(".weight") and v.ndim == 1 and not v.any()}
    assert zeroed == {k for k, v in theirs.items() if k.endswith(".weight") and v.ndim == 1 and not v.any()}
    assert zeroed and all(k.endswith(("bn2.weight", "bn3.weight")) for k in zeroed)
    assert not {k for k, v in build_model(arch, 1000).state_dict().items() if k in zeroed and not v.any()}


def test_resnet_d_has_the_deep_stem_and_average_pool_shortcuts_and_timms_size():
    model = build_model("resnet50d", 5)
    assert [type(m).__name__ for m in model.conv1] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d"]
    assert all(m.kernel_size == (3, 3) for m in model.conv1 if isinstance(m, nn.Conv2d))
    for layer in (model.layer2, model.layer3, model.layer4):  # the stride-2 shortcuts
        pool, conv, _ = layer[0].downsample
        assert isinstance(pool, nn.AvgPool2d) and conv.stride == (1, 1)
    assert not isinstance(model.layer1[0].downsample[0], nn.AvgPool2d)  # stride 1: plain 1x1 conv
    # timm's resnet50d and resnet18d (1000 classes) have these many parameters
    assert n_params(build_model("resnet50d", 1000)) == 25_576_264
    assert n_params(build_model("resnet18d", 1000)) == 11_708_744
    assert build_model("resnext50d_32x4d", 3)(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    with pytest.raises(UserError, match="torchvision has no ImageNet weights for arch=resnet18d"):
        imagenet_weights("resnet18d")


@pytest.mark.parametrize("arch", NARROW)
def test_narrow_network_is_its_base_with_half_the_channels_in_every_layer(arch):
    narrow, full = build_model(arch, 5).state_dict(), build_model(NARROW[arch], 5).state_dict()
    assert narrow.keys() == full.keys()  # the same layers, names and shortcuts
    for name, tensor in full.items():
        if tensor.ndim == 4:  # conv weights: out and in channels halved (but the 3 colours in)
            assert narrow[name].shape == (tensor.shape[0] // 2, max(3, tensor.shape[1] // 2), *tensor.shape[2:])
    assert narrow["fc.weight"].shape == (5, 256)
    assert build_model(arch, 5)(torch.randn(2, 3, 48, 48)).shape == (2, 5)


def test_include_top_false_is_torchvisions_backbone():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(weights=None).eval()
    randomize_bn(theirs, seed=4)
    backbone = build_model("resnet50", 10, include_top=False).eval()
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    backbone.load_state_dict(state, strict=True)
    assert not any(isinstance(m, nn.Linear) for m in backbone.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
        t = theirs
        expected = t.layer4(t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))))
    assert features.shape == (2, 2048, 2, 2)  # a feature map: 64 px / 32
    assert (features - expected).abs().max().item() <= 1e-4


def test_registry_arch_gets_a_head_for_our_classes():
    model = build_model("efficientnet_b0", 7)
    head = dict(model.named_modules())[head_module_name(model)]
    assert head_module_name(model) == "classifier.1" and head.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert head_module_name(build_model("resnext50_32x4d", 7)) == "fc"


def test_unknown_arch_fails_with_one_line_listing_valid_names():
    with pytest.raises(UserError) as e:
        build_model("resnet19", 10)
    message = str(e.value)
    assert "\n" not in message and "'resnet19' is unknown" in message
    for name in ("resnet18", "resnext101_64x4d", "wide_resnet101_2", "efficientnet_b0", "convnext_tiny"):
        assert name in message
