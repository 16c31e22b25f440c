"""ResNets (He et al. 2015, "Deep Residual Learning for Image Recognition").

One ``ResNet`` class covers both families of the paper: the ImageNet networks (four stages of
64-512 channels behind a 7x7/2 conv and a max-pool) and the CIFAR networks of section 4.2 (three
stages of 16/32/64 channels behind a 3x3 conv, 6n+2 layers). State-dict names follow torchvision
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``): they are a public
interface, people load weight files by them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Shortcut option A of the paper: parameter-free, a strided identity whose extra channels
    are zeros. Used by the CIFAR networks, whose parameter counts (Table 6) assume it."""

    def __init__(self, stride: int, out_planes: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_planes = out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - x.shape[1]
        if extra > 0:
            # Pad the channel dimension: F.pad runs from the last dimension backwards.
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand. The stride sits on the 3x3 conv (ResNet v1.5, torchvision's
    choice), which is about 0.5% more accurate on ImageNet than the paper's stride on the 1x1."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        stem: str = "imagenet",
        shortcut: str = "B",
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} differ in length")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is invalid: allowed: A, B")
        self.block = block
        self.shortcut = shortcut
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = widths[0]

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = conv3x3(3, self.inplanes)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem={stem!r} is invalid: allowed: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)

        for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True)):
            setattr(
                self, f"layer{i + 1}", self._make_layer(planes, blocks, stride=1 if i == 0 else 2)
            )
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving Deep into Rectifiers"), fan-out as in the paper's code.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017: each residual branch starts as zero, so each block starts as an
            # identity; improves ImageNet top-1 by 0.2-0.3% and eases large-batch training.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * self.block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != out_planes:
            if self.shortcut == "A":
                downsample = PadShortcut(stride, out_planes)
            else:
                downsample = nn.Sequential(
                    conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)
                )
        layers = [
            self.block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)
        ]
        self.inplanes = out_planes
        layers += [
            self.block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
