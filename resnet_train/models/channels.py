"""The channel widths of a pruned model: recorded as data, so that a pruned checkpoint rebuilds
from this package's own model code (and loads with weights_only=True; no pickled modules).

A record maps each module whose width differs from the architecture's own to its shape:
Conv2d -> [out_channels, in_channels], BatchNorm2d -> [num_features], Linear -> [out_features,
in_features]. A checkpoint that holds a pruned model keeps it under "channels"; whoever builds a
model for such a checkpoint (fine-tuning from it, resuming, evaluating, exporting, distilling
from it) applies it to the freshly built architecture before loading the weights.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _shape(module: nn.Module) -> list[int] | None:
    if isinstance(module, nn.Conv2d):
        return [module.out_channels, module.in_channels]
    if isinstance(module, nn.BatchNorm2d):
        return [module.num_features]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    return None


def channel_record(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """The shapes of model's conv, BN and linear layers that differ from reference's (the same
    architecture unpruned)."""
    own = dict(reference.named_modules())
    record = {}
    for name, module in model.named_modules():
        shape = _shape(module)
        if shape is not None and shape != _shape(own[name]):
            record[name] = shape
    return record


def _resized(module: nn.Module, shape: list[int]) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels = shape
        groups = module.groups
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{shape} does not split into the conv's {groups} groups")
        new: nn.Module = nn.Conv2d(
            in_channels, out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, groups, bias=module.bias is not None,
        )  # fmt: skip
    elif isinstance(module, nn.BatchNorm2d):
        new = nn.BatchNorm2d(shape[0], module.eps, module.momentum, module.affine)
    elif isinstance(module, nn.Linear):
        # its inputs follow the pruned features; its outputs stay the classes of the model
        # being built (fine-tuning on another data set replaces the classifier)
        new = nn.Linear(shape[1], module.out_features, bias=module.bias is not None)
    else:
        raise ValueError(f"a {type(module).__name__} has no channel width to set")
    return new.train(module.training)


def apply_channels(model: nn.Module, record: dict[str, Any] | None) -> nn.Module:
    """Resize model's layers to a pruned model's record (in place); model.channels keeps the
    record, so that the checkpoints of a run that trains it carry it on."""
    if not record:
        return model
    for name, shape in record.items():
        try:
            module = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _resized(module, list(shape)))
        except (AttributeError, ValueError) as e:
            raise ValueError(
                f"the pruned model's layer {name} {list(shape)} does not fit: {e}"
            ) from None
    model.channels = {name: list(shape) for name, shape in record.items()}
    return model


def channels_of(model: nn.Module) -> dict[str, list[int]] | None:
    """The record a pruned model was built with (None for an unpruned one)."""
    return getattr(model, "channels", None)
