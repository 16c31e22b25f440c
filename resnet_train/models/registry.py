"""Model names to factories: ``create_model("resnet50", num_classes=10)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[factory.__name__] = factory
    return factory


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; keyword arguments go to its factory (num_classes, stem, ...)."""
    if name not in _MODELS:
        raise ValueError(f"model {name!r} is unknown: allowed: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
