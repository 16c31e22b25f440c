"""From the config to a model: the one place where model and data settings meet."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from resnet_train.models.channels import apply_channels
from resnet_train.models.registry import create_model
from resnet_train.models.zoo import SPECS, plain_with_shortcuts


def build_model(cfg: DictConfig, classes: list[str] | None = None) -> nn.Module:
    """The model of cfg.model for the data of cfg.data: unless set, the stem follows the image
    size (64 px or less: the CIFAR stem) and the classes follow the data set. model.weights
    loads a weights file; a pruned model's file (task=prune) first gives the model its widths.
    `classes`: the data's class names, so that a classifier trained on others is replaced."""
    m = cfg.model
    model = create_model(m.name, **model_options(cfg))
    if m.weights is not None:
        from resnet_train.models.weights import load_state, read_weights

        weights = read_weights(m.weights)
        check_same_network(cfg, model, weights)
        apply_pruned_widths(model, weights, "model.weights")
        replaced = load_state(model, weights, replace_classifier=True, classes=classes,
                              model_name=m.name)  # fmt: skip
        check_new_classifier_trains(cfg, replaced)
    return model


def build_resumed_model(cfg: DictConfig, channels: dict | None, source: object) -> nn.Module:
    """The model of a resumed run, without reading model.weights: the checkpoint (`source`)
    holds every weight, and a pruned model's widths (`channels`); the file it was fine-tuned
    from may have changed or gone since."""
    model = create_model(cfg.model.name, **model_options(cfg))
    _apply_widths(model, channels, source)
    return model


def without_weights(cfg: DictConfig) -> DictConfig:
    """cfg with model.weights=None (a model built to load a file strictly, or to resume)."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.weights = None
    return out


def model_options(cfg: DictConfig) -> dict:
    """create_model's keyword options for cfg's model on cfg's data."""
    m = cfg.model
    return {
        "num_classes": m.num_classes or cfg.data.num_classes,
        "stem": m.stem or ("cifar" if cfg.data.image_size <= 64 else "imagenet"),
        "shortcut": m.shortcut,
        "zero_init_residual": m.zero_init_residual,
        "stride_in_1x1": m.stride_in_1x1,
        "dropout": m.dropout,
    }


def check_model(cfg: DictConfig) -> None:
    """The model keys that only the model itself can judge, checked on a model without storage
    (the meta device) before a run starts: model.freeze names parts this model has and leaves
    something to train; model.zero_init_residual needs residual branches. (The classes need
    not be known yet: an image folder's are counted later.)"""
    import torch

    from resnet_train.errors import ConfigError
    from resnet_train.models.freeze import freeze

    m = cfg.model
    spec = SPECS.get(m.name)
    if spec is not None and spec.shortcut == "none" and m.shortcut not in (None, "none"):
        raise ConfigError(plain_with_shortcuts(m.name, m.shortcut, key="model.shortcut"))
    with torch.device("meta"):  # (zero_init_residual is judged below, in the config's words)
        model = create_model(m.name, **{**model_options(cfg), "zero_init_residual": False})
    block = getattr(model, "block", None)
    preact = block is not None and block.preact  # (not zeroed: model_notes says so)
    if m.zero_init_residual and getattr(model, "shortcut", None) == "none" and not preact:
        raise ConfigError(
            f"model.zero_init_residual=true is invalid for {m.name} without shortcuts: it zeroes "
            "the last BatchNorm of every block, and with no shortcut to carry the input past "
            "it the network's output is constant and it cannot learn"
        )
    if m.freeze is not None:
        freeze(model, m.freeze, False)


def model_notes(cfg: DictConfig, model: nn.Module) -> list[str]:
    """Model keys set to values this model does not use (said at the start of the run)."""
    m, notes = cfg.model, []
    block = getattr(model, "block", None)
    if block is None:
        return notes
    if m.stride_in_1x1 and block.expansion == 1:
        notes.append(f"model.stride_in_1x1=true does nothing in {m.name}: it places the stride "
                     "in bottleneck blocks, and this model has none")  # fmt: skip
    if m.zero_init_residual and block.preact:
        notes.append(f"model.zero_init_residual=true does nothing in {m.name}: its "
                     "pre-activation blocks end in a conv, not a BatchNorm")  # fmt: skip
    return notes


def check_weights(cfg: DictConfig) -> None:
    """model.weights is readable and fits this model: checked on a model without storage (the
    meta device), with the file's tensors mapped, not read, before a run makes its directory.
    cfg.data is settled (settle_data: num_classes known)."""
    m = cfg.model
    if m.weights is None:
        return
    import torch

    from resnet_train.models.weights import load_state, read_weights

    with torch.device("meta"):
        model = create_model(m.name, **model_options(cfg))
    weights = read_weights(m.weights, peek=True)
    check_same_network(cfg, model, weights)
    apply_pruned_widths(model, weights, "model.weights")
    replaced = load_state(model, weights, replace_classifier=True, check_only=True,
                          model_name=cfg.model.name)  # fmt: skip
    check_new_classifier_trains(cfg, replaced)


def check_same_network(cfg: DictConfig, model: nn.Module, weights) -> None:
    """A resnet-train checkpoint as model.weights holds the network its run trained: another
    one whose tensors have the same shapes loaded silently (a resnet20's weights in a plain20,
    option A's in a net without shortcuts, stride-on-1x1 bottlenecks in stride-on-3x3 ones)."""
    from resnet_train.errors import CheckpointError

    saved = (weights.config or {}).get("model") or {}
    name, where = saved.get("name"), f"model.weights={weights.path}"
    if not isinstance(name, str):  # (torchvision's weights: a state dict alone)
        return
    if name != cfg.model.name:
        raise CheckpointError(
            f"{where} holds a {name}, not a {cfg.model.name}: set model={name} (a checkpoint's "
            "weights go into the network they were trained in)"
        )
    spec = SPECS.get(name)
    shortcut = saved.get("shortcut") or (spec.shortcut if spec else None)
    if shortcut is not None and shortcut != getattr(model, "shortcut", shortcut):
        raise CheckpointError(
            f"{where} was trained with model.shortcut={shortcut}: set model.shortcut={shortcut} "
            f"(here {model.shortcut})"
        )
    block = getattr(model, "block", None)
    strided = bool(saved.get("stride_in_1x1"))
    if block is not None and block.expansion != 1 and strided != bool(cfg.model.stride_in_1x1):
        raise CheckpointError(
            f"{where} was trained with model.stride_in_1x1={str(strided).lower()}: set "
            f"model.stride_in_1x1={str(strided).lower()} (its bottlenecks halve the resolution "
            f"in their {'first 1x1' if strided else '3x3'} conv)"
        )


def check_new_classifier_trains(cfg: DictConfig, replaced: bool) -> None:
    """A classifier that model.weights could not give (another number of classes, or other
    classes) starts random: frozen, it would stay so."""
    from resnet_train.config import frozen_parts
    from resnet_train.errors import ConfigError

    names = frozen_parts(cfg.model.freeze)
    if replaced and "fc" in names:
        raise ConfigError(
            f"model.freeze={names} is invalid here: it freezes fc, but the classifier of "
            f"model.weights={cfg.model.weights} does not fit this data's classes and starts "
            "new and random; frozen, it would stay random (leave fc out)"
        )


def apply_pruned_widths(model: nn.Module, weights, key: str) -> None:
    """Give model the widths of the pruned model in `weights` (a WeightsFile), if it is one."""
    _apply_widths(model, (weights.checkpoint or {}).get("channels"), f"{key}={weights.path}")


def _apply_widths(model: nn.Module, channels: dict | None, source: object) -> None:
    """A pruned model's widths (its channel record, None for none) given to model; a record
    that does not fit it is a CheckpointError naming `source`."""
    from resnet_train.errors import CheckpointError

    try:
        apply_channels(model, channels)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# The model settings a resnet-train checkpoint's own run decided (besides its classes and stem).
SAVED_MODEL_KEYS = ("shortcut", "zero_init_residual", "stride_in_1x1", "dropout")


def options_of(weights) -> dict:
    """create_model's options that a weights file (a WeightsFile) fixes: its classes (the
    classifier's rows), its stem (its run's, or a 7x7 first conv: ImageNet's) and a resnet-train
    checkpoint's model settings (shortcut, ...)."""
    saved = (weights.config or {}).get("model") or {}
    options = {k: saved[k] for k in SAVED_MODEL_KEYS if saved.get(k) is not None}
    conv1 = weights.state.get("conv1.weight")
    stem = "imagenet" if conv1 is not None and conv1.shape[-1] == 7 else "cifar"
    options["stem"] = saved.get("stem") or stem
    if "fc.weight" in weights.state:
        options["num_classes"] = int(weights.state["fc.weight"].shape[0])
    return options


def model_from_file(name: str, path, **kwargs) -> nn.Module:
    """create_model(name, weights=path, **kwargs): the model the file holds, its widths (a
    pruned model's), classes, stem and settings as the file has them, unless kwargs say
    otherwise; a num_classes other than the file's gets a new classifier (fine-tuning), with a
    warning."""
    import warnings

    from resnet_train.models.weights import load_state, read_weights

    weights = read_weights(path, key="weights")
    saved = ((weights.config or {}).get("model") or {}).get("name")
    if isinstance(saved, str) and saved != name:  # (same shapes would load: another network)
        raise ValueError(f"weights={path} holds a {saved}, not a {name}: give {saved!r}")
    model = create_model(name, **{**options_of(weights), **kwargs})
    apply_pruned_widths(model, weights, "weights")
    if load_state(model, weights, replace_classifier=True, key="weights", model_name=name):
        warnings.warn(
            f"{path}: its classifier of {options_of(weights)['num_classes']} classes was replaced "
            f"by a new one of num_classes={kwargs['num_classes']} (for fine-tuning)",
            stacklevel=3,
        )
    return model
