"""The named networks. ImageNet family: torchvision's definitions (stem "imagenet" unless told
otherwise). CIFAR family: He et al. 2015 section 4.2, 6n+2 layers, shortcut option A."""

from __future__ import annotations

from resnet_train.models.registry import register_model
from resnet_train.models.resnet import BasicBlock, Bottleneck, ResNet


def _imagenet(block, layers, stem: str | None, **kwargs) -> ResNet:
    return ResNet(block, layers, stem=stem or "imagenet", **kwargs)


@register_model
def resnet18(stem: str | None = None, **kwargs) -> ResNet:
    return _imagenet(BasicBlock, [2, 2, 2, 2], stem, **kwargs)


@register_model
def resnet34(stem: str | None = None, **kwargs) -> ResNet:
    return _imagenet(BasicBlock, [3, 4, 6, 3], stem, **kwargs)


@register_model
def resnet50(stem: str | None = None, **kwargs) -> ResNet:
    return _imagenet(Bottleneck, [3, 4, 6, 3], stem, **kwargs)


@register_model
def resnet101(stem: str | None = None, **kwargs) -> ResNet:
    return _imagenet(Bottleneck, [3, 4, 23, 3], stem, **kwargs)


@register_model
def resnet152(stem: str | None = None, **kwargs) -> ResNet:
    return _imagenet(Bottleneck, [3, 8, 36, 3], stem, **kwargs)


def cifar_resnet(depth: int, stem: str | None = None, num_classes: int = 10, **kwargs) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth {depth} is invalid: must be 6n+2 (20, 32, 44, ...)")
    n = (depth - 2) // 6
    kwargs.setdefault("shortcut", "A")
    return ResNet(
        BasicBlock,
        [n, n, n],
        widths=(16, 32, 64),
        num_classes=num_classes,
        stem=stem or "cifar",
        **kwargs,
    )


def _register_cifar(depth: int) -> None:
    def factory(**kwargs) -> ResNet:
        return cifar_resnet(depth, **kwargs)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2015, Table 6)."
    register_model(factory)


for _depth in (20, 32, 44, 56, 110, 1202):
    _register_cifar(_depth)
