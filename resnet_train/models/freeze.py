"""Freezing parts of a model for fine-tuning (model.freeze, model.freeze_bn).

A frozen part stays exactly as loaded: its parameters get no gradient (and are left out of the
optimizer), and its BatchNorm layers normalise with their running statistics and never update
them. model.freeze_bn=true keeps the statistics of every BatchNorm layer, frozen or not (small
batches of a new data set would otherwise overwrite statistics learnt on a large one).
"""

from __future__ import annotations

from torch import nn

from resnet_train.config import frozen_parts
from resnet_train.errors import ConfigError

# The classifier; everything else is the backbone (the part model.weights brings).
CLASSIFIER = "fc"


def part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Each freezable part's modules: stem (the layers before the first stage), layer1, ...,
    fc, and backbone (all but fc)."""
    stem, stages, after = [], [], []
    for name, module in model.named_children():
        if name.startswith("layer"):
            stages.append((name, module))
        elif name == CLASSIFIER:
            continue
        elif not stages:
            stem.append(module)
        else:
            after.append(module)  # a pre-activation net's final BN: part of the backbone
    parts = {"stem": stem, **{name: [module] for name, module in stages}}
    parts[CLASSIFIER] = [model.get_submodule(CLASSIFIER)]
    parts["backbone"] = stem + [m for _, m in stages] + after
    return parts


def freeze(model: nn.Module, freeze: object, freeze_bn: bool) -> tuple[list[str], list[nn.Module]]:
    """Freeze model.freeze's parts of `model`; return the names frozen and the BatchNorm layers
    that must stay in eval mode while training (call hold_norms after every model.train())."""
    names = frozen_parts(freeze)
    parts = part_modules(model)
    frozen: list[nn.Module] = []
    for name in names:
        if name not in parts:
            raise ConfigError(
                f"model.freeze={name} is invalid: this model's parts are {', '.join(parts)}"
            )
        frozen += parts[name]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    if names and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"model.freeze={names} is invalid: it freezes every parameter, nothing would train"
        )
    norm_sources = [model] if freeze_bn else frozen
    norms = [
        m for source in norm_sources for m in source.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]  # fmt: skip
    return names, list(dict.fromkeys(norms))  # each once, in order


def hold_norms(norms: list[nn.Module]) -> None:
    """Put the held BatchNorm layers back in eval mode (after model.train())."""
    for norm in norms:
        norm.eval()


def backbone_parameters(model: nn.Module) -> set[int]:
    """ids of the backbone's parameters (all but the classifier's)."""
    head = {id(p) for p in model.get_submodule(CLASSIFIER).parameters()}
    return {id(p) for p in model.parameters() if id(p) not in head}
