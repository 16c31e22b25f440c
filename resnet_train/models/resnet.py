"""ResNets: He et al. 2015 ("Deep Residual Learning"), He et al. 2016 ("Identity Mappings"),
Zagoruyko & Komodakis 2016 (wide), Xie et al. 2017 (ResNeXt), and plain nets without shortcuts.

One ``ResNet`` class builds them all from a block type, the blocks per stage and the stage widths:
the ImageNet networks (four stages of 64-512 channels behind a 7x7/2 conv and a max-pool) and the
CIFAR networks (three stages behind a 3x3 conv). State-dict names follow torchvision (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``): they are a public interface,
people load weight files by them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "none")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Shortcut option A of He et al. 2015: parameter-free, a strided identity whose extra
    channels are zeros. The CIFAR networks' parameter counts (Table 6) assume it."""

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
    """Two 3x3 convs, each followed by BN (post-activation, the 2015 paper)."""

    expansion = 1
    preact = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        residual: bool = True,
        dropout: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, post-activation.

    The stride sits on the 3x3 conv (ResNet v1.5, torchvision's default, about 0.5% better top-1
    on ImageNet); ``stride_in_1x1=True`` puts it on the first 1x1 as in the 2015 paper (v1)."""

    expansion = 4
    preact = False

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        residual: bool = True,
        dropout: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.dropout(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice (He et al. 2016): the shortcut path stays a clean identity. With
    dropout between the convs this is the block of wide ResNets (Zagoruyko & Komodakis 2016)."""

    expansion = 1
    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        residual: bool = True,
        dropout: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBlock supports only groups=1 and base_width=64")
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual
        self.preactivated_shortcut = False  # (set on a stage's first block: ResNet does)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = _preact_shortcut(self, x, out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + shortcut if self.residual else out


class PreActBottleneck(nn.Module):
    """BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (He et al. 2016, ResNet-164 and -1001)."""

    expansion = 4
    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        residual: bool = True,
        dropout: float = 0.0,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual
        self.preactivated_shortcut = False  # (set on a stage's first block: ResNet does)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = _preact_shortcut(self, x, out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.dropout(self.relu(self.bn3(out))))
        return out + shortcut if self.residual else out


def _preact_shortcut(block: PreActBlock | PreActBottleneck, x: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """What a pre-activation block's shortcut carries: the first block of a stage takes its
    BN-ReLU before splitting into the two paths (He et al. 2016, section 4: "right after conv1
    and before splitting"; their code's "both_preact"), a projection from it too; the others
    carry their input as it is."""
    if block.downsample is not None:
        return block.downsample(out)
    return out if block.preactivated_shortcut else x


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBlock] | type[PreActBottleneck]


class ResNet(nn.Module):
    """Stem, stages of residual blocks (the first of each stage but the first halves the
    resolution), global average pooling, a linear classifier.

    stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pooling).
    shortcut: "A" (zero-padding identity), "B" (1x1 projection where the shape changes), or
    "none" (a plain network). Pre-activation blocks end the network with BN-ReLU.
    """

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
        stride_in_1x1: bool = False,
        dropout: float = 0.0,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} differ in length")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is invalid: allowed: {', '.join(SHORTCUTS)}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem={stem!r} is invalid: allowed: cifar, imagenet")
        if zero_init_residual and shortcut == "none" and not block.preact:
            raise ValueError(
                "zero_init_residual=True is invalid without shortcuts (shortcut='none'): it "
                "zeroes the last BatchNorm of every block, and with no shortcut to carry the "
                "input past it the network's output is constant and it cannot learn"
            )
        self.block = block
        self.shortcut = shortcut
        self.groups = groups
        self.base_width = width_per_group
        self.block_options = {
            "residual": shortcut != "none",
            "dropout": dropout,
            "stride_in_1x1": stride_in_1x1,
        }
        self.inplanes = stem_width or widths[0]

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, self.inplanes)
            self.maxpool = nn.Identity()
        # Pre-activation networks have no BN-ReLU in the stem: each block starts with its own,
        # and the first block's serves the stem: its shortcut takes the activated input too
        # (He et al. 2016's CIFAR code; for the ImageNet stem, after the max-pool).
        self.bn1 = None if block.preact else nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)

        for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True)):
            stage = self._make_layer(planes, blocks, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.num_stages = len(layers)
        out_features = widths[-1] * block.expansion
        self.final_bn = nn.BatchNorm2d(out_features) if block.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(out_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving Deep into Rectifiers"), fan-out as in torchvision.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017: each residual branch starts as zero, so each block starts as an
            # identity; improves ImageNet top-1 by 0.2-0.3% and eases large-batch training.
            # Pre-activation blocks end in a conv, not a BN, and are left as they are.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _shortcut(self, stride: int, out_planes: int) -> nn.Module | None:
        if self.shortcut == "none" or (stride == 1 and self.inplanes == out_planes):
            return None
        if self.shortcut == "A":
            return PadShortcut(stride, out_planes)
        if self.block.preact:  # the pre-activation papers project with a bare 1x1 conv
            return conv1x1(self.inplanes, out_planes, stride)
        return nn.Sequential(conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * self.block.expansion
        downsample = self._shortcut(stride, out_planes)
        layers = [
            self.block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                **self.block_options,
            )
        ]
        if self.block.preact:
            layers[0].preactivated_shortcut = True
        self.inplanes = out_planes
        layers += [
            self.block(
                self.inplanes,
                planes,
                groups=self.groups,
                base_width=self.base_width,
                **self.block_options,
            )
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        return self.maxpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.stages():
            x = stage(x)
        if self.final_bn is not None:
            x = self.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))
