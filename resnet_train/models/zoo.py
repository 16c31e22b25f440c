"""The named networks, each a ResNet of a given block, depth and width.

ImageNet family (torchvision's definitions, 1000 classes, "imagenet" stem by default) and the CIFAR
family (10 classes, "cifar" stem by default). Every factory takes the same keyword options as the
model config: num_classes, stem, shortcut, zero_init_residual, stride_in_1x1, dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_train.models.registry import register_model
from resnet_train.models.resnet import (
    BasicBlock,
    Block,
    Bottleneck,
    PreActBlock,
    PreActBottleneck,
    ResNet,
)

IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class Spec:
    block: Block
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str
    shortcut: str
    num_classes: int
    groups: int = 1
    width_per_group: int = 64
    stem_width: int | None = None
    doc: str = ""


def plain_with_shortcuts(name: str, shortcut: str, key: str = "shortcut") -> str:
    """The refusal of a shortcut for a plain net (its name would say plain of a ResNet)."""
    return (
        f"{key}={shortcut} is invalid for {name}: a plain net has no shortcuts; "
        f"{name.replace('plain', 'resnet')} with {key}={shortcut} is that net with them"
    )


def _register(name: str, spec: Spec) -> None:
    def factory(
        num_classes: int | None = None,
        stem: str | None = None,
        shortcut: str | None = None,
        **kwargs,
    ) -> ResNet:
        if spec.shortcut == "none" and shortcut not in (None, "none"):
            raise ValueError(plain_with_shortcuts(name, shortcut))
        return ResNet(
            spec.block,
            spec.layers,
            widths=spec.widths,
            num_classes=num_classes or spec.num_classes,
            stem=stem or spec.stem,
            shortcut=shortcut or spec.shortcut,
            groups=spec.groups,
            width_per_group=spec.width_per_group,
            stem_width=spec.stem_width,
            **kwargs,
        )

    factory.__name__ = name
    factory.__doc__ = spec.doc
    register_model(factory)


def imagenet(block: Block, layers, doc: str, shortcut: str = "B", **options) -> Spec:
    return Spec(
        block, tuple(layers), IMAGENET_WIDTHS, "imagenet", shortcut, 1000, doc=doc, **options
    )


def cifar(
    block: Block, n: int, doc: str, widths=CIFAR_WIDTHS, shortcut: str = "A", **options
) -> Spec:
    return Spec(block, (n,) * len(widths), tuple(widths), "cifar", shortcut, 10, doc=doc, **options)


# He et al. 2015, Table 1; wide and ResNeXt variants as in torchvision (Zagoruyko & Komodakis
# 2016, Xie et al. 2017): only the bottleneck's inner width and grouping change.
IMAGENET = {
    "resnet18": imagenet(BasicBlock, [2, 2, 2, 2], "ResNet-18"),
    "resnet34": imagenet(BasicBlock, [3, 4, 6, 3], "ResNet-34"),
    "resnet50": imagenet(Bottleneck, [3, 4, 6, 3], "ResNet-50"),
    "resnet101": imagenet(Bottleneck, [3, 4, 23, 3], "ResNet-101"),
    "resnet152": imagenet(Bottleneck, [3, 8, 36, 3], "ResNet-152"),
    "wide_resnet50_2": imagenet(Bottleneck, [3, 4, 6, 3], "Wide ResNet-50-2", width_per_group=128),
    "wide_resnet101_2": imagenet(
        Bottleneck, [3, 4, 23, 3], "Wide ResNet-101-2", width_per_group=128
    ),
    "resnext50_32x4d": imagenet(
        Bottleneck, [3, 4, 6, 3], "ResNeXt-50 32x4d", groups=32, width_per_group=4
    ),
    "resnext101_32x8d": imagenet(
        Bottleneck, [3, 4, 23, 3], "ResNeXt-101 32x8d", groups=32, width_per_group=8
    ),
    "resnext101_64x4d": imagenet(
        Bottleneck, [3, 4, 23, 3], "ResNeXt-101 64x4d", groups=64, width_per_group=4
    ),
    "preact_resnet18": imagenet(PreActBlock, [2, 2, 2, 2], "Pre-activation ResNet-18"),
    "plain18": imagenet(BasicBlock, [2, 2, 2, 2], "Plain-18 (no shortcuts)", shortcut="none"),
    "plain34": imagenet(BasicBlock, [3, 4, 6, 3], "Plain-34 (no shortcuts)", shortcut="none"),
}

# He et al. 2015 section 4.2: 6n+2 layers, 16/32/64 channels, option A; Table 6 gives the
# parameter counts the tests check.
CIFAR = {}
for _depth in (20, 32, 44, 56, 110, 1202):
    _n = (_depth - 2) // 6
    CIFAR[f"resnet{_depth}"] = cifar(BasicBlock, _n, f"CIFAR ResNet-{_depth}")
    if _depth <= 110:
        CIFAR[f"plain{_depth}"] = cifar(
            BasicBlock, _n, f"CIFAR plain-{_depth} (no shortcuts)", shortcut="none"
        )
CIFAR.update(
    {
        # He et al. 2016 ("Identity Mappings"), CIFAR: 1.7M parameters each.
        "preact_resnet110": cifar(PreActBlock, 18, "Pre-activation ResNet-110", shortcut="B"),
        "preact_resnet164": cifar(
            PreActBottleneck, 18, "Pre-activation ResNet-164 (bottleneck)", shortcut="B"
        ),
        # Zagoruyko & Komodakis 2016: WRN-d-k has (d-4)/6 pre-activation blocks per stage of
        # 16k/32k/64k channels behind a 16-channel stem; WRN-28-10 has 36.5M parameters.
        "wrn28_10": cifar(
            PreActBlock, 4, "Wide ResNet-28-10", widths=(160, 320, 640), shortcut="B", stem_width=16
        ),
        "wrn16_8": cifar(
            PreActBlock, 2, "Wide ResNet-16-8", widths=(128, 256, 512), shortcut="B", stem_width=16
        ),
        # Xie et al. 2017, CIFAR: 3 stages of 3 bottlenecks, cardinality C, 64 channels per group
        # in the first stage, a 64-channel stem; 34.4M (C=8) and 68.1M (C=16) parameters.
        "resnext29_8x64d": cifar(
            Bottleneck,
            3,
            "ResNeXt-29 8x64d",
            widths=(64, 128, 256),
            shortcut="B",
            groups=8,
            width_per_group=64,
        ),
        "resnext29_16x64d": cifar(
            Bottleneck,
            3,
            "ResNeXt-29 16x64d",
            widths=(64, 128, 256),
            shortcut="B",
            groups=16,
            width_per_group=64,
        ),
    }
)

SPECS = {**IMAGENET, **CIFAR}
for _name, _spec in SPECS.items():
    _register(_name, _spec)
