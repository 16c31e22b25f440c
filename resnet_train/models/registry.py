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
    dropout. `weights` loads a file (torchvision's state dict, or a resnet-train checkpoint or
    pruned.pt) and builds the model it holds: its classes, stem, widths and (a checkpoint's) model
    settings, unless given here; a num_classes other than the file's gets a new classifier, with
    a warning (fine-tuning)."""
    if name not in _MODELS:
        raise ValueError(f"model {name!r} is unknown: allowed: {', '.join(list_models())}")
    classes = kwargs.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or classes < 1):
        raise ValueError(f"num_classes={classes!r} is invalid: must be an integer >= 1")
    dropout = kwargs.get("dropout")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} is invalid: must be in [0, 1)")
    if weights is not None:
        from resnet_train.models.build import model_from_file

        return model_from_file(name, weights, **kwargs)
    return _MODELS[name](**kwargs)
