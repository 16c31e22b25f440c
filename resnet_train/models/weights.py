"""Loading weight files into our models: torchvision's .pth files, our checkpoints, DDP dumps."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from resnet_train.errors import CheckpointError

log = logging.getLogger("resnet_train")
CLASSIFIER = ("fc.weight", "fc.bias")


def _short(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, path: str | Path) -> bool:
    """Load a state dict from `path` into `model` (strict but for the classifier). A classifier of
    another number of classes is left freshly initialised, for fine-tuning; returns whether it was.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.weights={path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"model.weights={path} is unreadable ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resnet-train checkpoint
    if not isinstance(state, dict):
        raise CheckpointError(f"model.weights={path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP

    own = model.state_dict()
    file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    replaced = "fc.weight" in state and state["fc.weight"].shape != own["fc.weight"].shape
    if replaced:
        state = {k: v for k, v in state.items() if k not in CLASSIFIER}
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not (replaced and k in CLASSIFIER)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        problems = [
            f"{label}: {_short(keys)}"
            for label, keys in (
                ("shapes differ", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        ]
        hint = ""
        if "conv1.weight" in mismatched:
            kernel = state["conv1.weight"].shape[-1]
            hint = f"; the file has the {'imagenet' if kernel == 7 else 'cifar'} stem: set "
            hint += f"model.stem={'imagenet' if kernel == 7 else 'cifar'}"
        raise CheckpointError(
            f"model.weights={path} does not fit this model ({'; '.join(problems)}){hint}"
        )
    model.load_state_dict(state, strict=not replaced)
    if replaced:
        log.info(
            "loaded %s; classifier replaced (%d classes in the file, %d here)",
            path,
            file_classes,
            own["fc.weight"].shape[0],
        )
    else:
        log.info("loaded %s", path)
    return replaced
