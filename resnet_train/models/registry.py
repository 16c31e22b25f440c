"""Model names to factories: ``create_model("resnet50", num_classes=10)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[factory.__name__] = factory
    return factory


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a registered model. Keyword options are the model config's: num_classes, stem
    ("cifar" | "imagenet"), shortcut ("A" | "B" | "none"), zero_init_residual, stride_in_1x1,
    dropout; weights loads a state-dict file (torchvision's, or a resnet-train checkpoint)."""
    if name not in _MODELS:
        raise ValueError(f"model {name!r} is unknown: allowed: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    if weights is not None:
        from resnet_train.models.weights import load_weights

        load_weights(model, weights)
    return model
