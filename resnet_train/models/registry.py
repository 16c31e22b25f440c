"""Model names to factories: ``create_model("resnet50", num_classes=10)``."""

from __future__ import annotations

import numbers
import os
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
    kwargs = check_options(kwargs)
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights={weights!r} is invalid: give the path of a weights file")
        if Path(weights).expanduser().is_dir():
            raise ValueError(f"weights={weights} is a folder: give a weights file in it")
        from resnet_train.models.build import model_from_file

        return model_from_file(name, weights, **kwargs)
    return _MODELS[name](**kwargs)


OPTIONS = ("num_classes", "stem", "shortcut", "zero_init_residual", "stride_in_1x1", "dropout")


def check_options(kwargs: dict) -> dict:
    """create_model's keyword options, checked; those given as None (the model's default, or
    the weights file's) left out."""
    from resnet_train.models.resnet import SHORTCUTS

    unknown = [k for k in kwargs if k not in OPTIONS]
    if unknown:
        hint = " (a model moves to a device with .to(device))" if unknown[0] == "device" else ""
        raise TypeError(
            f"create_model() got an unknown option {unknown[0]!r}: allowed: {', '.join(OPTIONS)}"
            + hint
        )
    out = {k: v for k, v in kwargs.items() if v is not None}
    classes = out.get("num_classes")
    if classes is not None:
        if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 1:
            raise ValueError(f"num_classes={classes!r} is invalid: must be an integer >= 1")
        out["num_classes"] = int(classes)
    dropout = out.get("dropout")
    if dropout is not None:
        real = isinstance(dropout, numbers.Real) and not isinstance(dropout, bool)
        if not real or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} is invalid: must be in [0, 1)")
        out["dropout"] = float(dropout)
    for key, allowed in (("stem", ("cifar", "imagenet")), ("shortcut", SHORTCUTS)):
        if key in out and out[key] not in allowed:
            raise ValueError(f"{key}={out[key]!r} is invalid: allowed: {', '.join(allowed)}")
    for key in ("zero_init_residual", "stride_in_1x1"):
        if key in out:
            if type(out[key]).__name__ not in ("bool", "bool_"):  # (numpy's bool too)
                raise ValueError(f"{key}={out[key]!r} is invalid: must be True or False")
            out[key] = bool(out[key])
    return out
