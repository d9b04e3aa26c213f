"""The ResNet family, written out as the tutorial builds it.

BasicBlock (two 3x3 convs, expansion 1) makes ResNet-18/34; Bottleneck (1x1 squeeze,
3x3, 1x1 expand, expansion 4) makes ResNet-50/101/152. ResNeXt and Wide ResNet are the
same Bottleneck with more groups or wider 3x3 convs. Module names match torchvision's,
so torchvision's ImageNet weights load into these networks unchanged.

`width` sets the channels of the first stage (64, torchvision's; the later stages have 2x, 4x, 8x).

Two options from "Bag of Tricks for Image Classification" (He et al., 2019), both off by default
(then the network is torchvision's):
- ResNet-D (`resnet18d`, `resnet50d`, ...: timm's names): a deep stem (three 3x3 convs instead of
  one 7x7) and, where a shortcut downsamples, an average pool before its 1x1 conv (the plain 1x1
  conv with stride 2 ignores 3/4 of its input). No torchvision weights exist for these.
- zero_init_residual: the last BatchNorm of each residual branch starts at zero, so every block
  starts as the identity and a deep network trains like a shallow one at first.
"""
import functools

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channel, out_channel, stride=1, downsample=None, groups=1, width_per_group=64):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock only supports groups=1 and width_per_group=64")
        # Convs followed by BN carry no bias: BN's shift makes it redundant.
        self.conv1 = nn.Conv2d(in_channel, out_channel, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channel)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channel)
        self.downsample = downsample  # the "dashed" shortcut, only where the shape changes

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 squeeze, 3x3, 1x1 expand.

    The stride sits on the 3x3 conv, not the first 1x1 (ResNet v1.5, as torchvision):
    about 0.5% better top-1 than the paper's v1, where the 1x1 skipped 3/4 of the input.
    """
    expansion = 4

    def __init__(self, in_channel, out_channel, stride=1, downsample=None, groups=1, width_per_group=64):
        super().__init__()
        width = int(out_channel * (width_per_group / 64.0)) * groups
        self.conv1 = nn.Conv2d(in_channel, width, kernel_size=1, stride=1, bias=False)  # squeeze
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channel * self.expansion, kernel_size=1, stride=1, bias=False)  # expand
        self.bn3 = nn.BatchNorm2d(out_channel * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def deep_stem(out_channel):
    """ResNet-D's stem: three 3x3 convs (the first with stride 2) in place of one 7x7; BN and ReLU
    after each but the last, whose BN and ReLU are the network's bn1 and relu."""
    mid = out_channel // 2
    return nn.Sequential(
        nn.Conv2d(3, mid, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channel, kernel_size=3, stride=1, padding=1, bias=False))


class ResNet(nn.Module):
    def __init__(self, block, blocks_num, num_classes=1000, include_top=True, groups=1, width_per_group=64,
                 resnet_d=False, zero_init_residual=False, width=64):
        super().__init__()
        self.include_top = include_top
        self.in_channel = width
        self.groups = groups
        self.width_per_group = width_per_group
        self.resnet_d = resnet_d

        self.conv1 = deep_stem(self.in_channel) if resnet_d else \
            nn.Conv2d(3, self.in_channel, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_channel)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, blocks_num[0])
        self.layer2 = self._make_layer(block, 2 * width, blocks_num[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, blocks_num[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, blocks_num[3], stride=2)
        if self.include_top:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(8 * width * block.expansion, num_classes)

        for m in self.modules():
            # On the meta device (a network about to take a checkpoint's weights) there is nothing
            # to draw, and torch's meta normal_ would import its compiler (over a second of start-up).
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None) \
                    if isinstance(m, BasicBlock) else None
                if last_bn is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block, channel, block_num, stride=1):
        downsample = None
        if stride != 1 or self.in_channel != channel * block.expansion:
            # Dashed shortcut: 1x1 conv (+BN) to match the main path's shape. ResNet-D averages each
            # 2x2 window first, so the shortcut sees all of its input, not every fourth pixel.
            if self.resnet_d and stride != 1:
                downsample = nn.Sequential(
                    nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                    nn.Conv2d(self.in_channel, channel * block.expansion, kernel_size=1, bias=False),
                    nn.BatchNorm2d(channel * block.expansion))
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(self.in_channel, channel * block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(channel * block.expansion),
                )
        layers = [block(self.in_channel, channel, stride=stride, downsample=downsample,
                        groups=self.groups, width_per_group=self.width_per_group)]
        self.in_channel = channel * block.expansion
        for _ in range(1, block_num):
            layers.append(block(self.in_channel, channel, groups=self.groups, width_per_group=self.width_per_group))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.include_top:
            x = torch.flatten(self.avgpool(x), 1)
            x = self.fc(x)
        return x


def resnet18(num_classes=1000, include_top=True, **options):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, include_top=include_top, **options)


def resnet34(num_classes=1000, include_top=True, **options):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, include_top=include_top, **options)


def resnet50(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, include_top=include_top, **options)


def resnet101(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, include_top=include_top, **options)


def resnet152(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, include_top=include_top, **options)


def resnext50_32x4d(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, include_top=include_top,
                  groups=32, width_per_group=4, **options)


def resnext101_32x8d(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, include_top=include_top,
                  groups=32, width_per_group=8, **options)


def resnext101_64x4d(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, include_top=include_top,
                  groups=64, width_per_group=4, **options)


def wide_resnet50_2(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, include_top=include_top,
                  width_per_group=64 * 2, **options)


def wide_resnet101_2(num_classes=1000, include_top=True, **options):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, include_top=include_top,
                  width_per_group=64 * 2, **options)


# The architectures this module builds, by the names torchvision gives them, and their ResNet-D
# variants by timm's (resnet18d, resnext50d_32x4d, ...).
FAMILY = {f.__name__: f for f in (
    resnet18, resnet34, resnet50, resnet101, resnet152,
    resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2,
)}
RESNET_D = {name.replace("_", "d_", 1) if "_" in name else name + "d": name for name in FAMILY
            if name.startswith(("resnet", "resnext"))}
FAMILY.update({d: functools.partial(FAMILY[base], resnet_d=True) for d, base in RESNET_D.items()})
# Half as many channels in every stage (32, 64, 128, 256): a quarter of the compute, for small datasets
# trained from scratch on a CPU. No torchvision weights exist for these.
NARROW = {"resnet18_w32": "resnet18", "resnet18d_w32": "resnet18d"}
FAMILY.update({name: functools.partial(FAMILY[base], width=32) for name, base in NARROW.items()})
