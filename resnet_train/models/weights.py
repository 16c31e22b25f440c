"""Loading weight files into our models: torchvision's .pth files, our checkpoints, DDP dumps."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_train.config import file_sha256  # noqa: F401 (read from here too)
from resnet_train.errors import CheckpointError

log = logging.getLogger("resnet_train")
CLASSIFIER = ("fc.weight", "fc.bias")


def _short(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@dataclass
class WeightsFile:
    """A weights file as read: its state dict, and the run's config when it is a resnet-train
    checkpoint (None for torchvision's and other bare state dicts)."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    checkpoint: dict[str, Any] | None


def is_exported_program(path: Path) -> bool:
    """torch.export.save's archive: a zip whose folder holds archive_format and models/."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def read_weights(path: str | Path, key: str = "model.weights", peek: bool = False) -> WeightsFile:
    """Read a torchvision .pth, a resnet-train checkpoint or a DDP dump; raise CheckpointError
    naming `key` when the file is missing, unreadable or holds no state dict. With `peek`, the
    tensors are memory-mapped, not read: for a look at the config and the shapes before the
    file is loaded for real."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{key}={path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch's note on a pickle protocol it did not write: the file is refused below
            # in one line, or read
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=peek)
            except RuntimeError:  # a file of torch's legacy format cannot be mapped: read it
                if not peek:
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        what = f"is unreadable ({type(e).__name__})"
        if is_exported_program(path):
            what = "is a torch.export program (what task=export writes), not weights"
        elif path.suffix == ".onnx":
            what = "is an ONNX model (what task=export writes), not weights"
        raise CheckpointError(
            f"{key}={path} {what}: give a torchvision .pth or a resnet-train checkpoint (.pt)"
        ) from None
    checkpoint = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        checkpoint, state = state, state["model"]  # a resnet-train checkpoint
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{key}={path} holds no state dict of model weights")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    config = checkpoint.get("config") if checkpoint is not None else None
    return WeightsFile(path, state, config if isinstance(config, dict) else None, checkpoint)


# Checkpoints of this version say so: in earlier ones a pre-activation net's first block carried
# its un-activated input past itself (its identity shortcut), where He et al. 2016 activate it
# before the split; the same tensors compute another function now.
PREACT_KEY = "preact_shortcut"
PREACT_REVISION = "activated"


def check_preact_revision(model: nn.Module, checkpoint: dict | None, path: object) -> None:
    """Refuse a resnet-train checkpoint of a pre-activation net made before that change."""
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        return  # (torchvision's weights, a state dict alone: no such nets)
    if checkpoint.get(PREACT_KEY) == PREACT_REVISION:
        return
    if any(getattr(m, "preactivated_shortcut", False) and m.downsample is None and m.residual
           for m in model.modules()):  # fmt: skip
        raise CheckpointError(
            f"{path} holds a pre-activation net saved by an earlier resnet-train, whose first "
            "block's shortcut carried the un-activated stem output (now activated before the "
            "split, as He et al. 2016): its weights compute another function here; train it "
            "again"
        )


def load_weights(
    model: nn.Module, path: str | Path, replace_classifier: bool = True, key: str = "model.weights"
) -> bool:
    """Load a state dict from `path` into `model`, strictly; with replace_classifier, a classifier
    of another number of classes is left freshly initialised, for fine-tuning. Returns whether it
    was."""
    return load_state(model, read_weights(path, key), replace_classifier, key)


def load_state(
    model: nn.Module,
    weights: WeightsFile,
    replace_classifier: bool,
    key: str = "model.weights",
    classes: list[str] | None = None,
    check_only: bool = False,
    model_name: str | None = None,
) -> bool:
    """Load `weights` into `model` strictly; with replace_classifier, a classifier of another
    size, or one the file's run trained on other classes (by name, where both are known), is
    left freshly initialised. Returns whether it was. check_only: raise if the file does not
    fit the model, load nothing (the model may be on the meta device). model_name: the model's
    name (model.name), for the hint when the file holds another."""
    path, state = weights.path, weights.state
    check_preact_revision(model, weights.checkpoint, path)
    own = model.state_dict()
    file_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    saved_names = (weights.checkpoint or {}).get("classes")
    renamed = bool(classes and saved_names and list(saved_names) != list(classes))
    replaced = (
        replace_classifier
        and "fc.weight" in state
        and (state["fc.weight"].shape != own["fc.weight"].shape or renamed)
    )
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
        saved_model = ((weights.config or {}).get("model") or {}).get("name")
        kernel = state["conv1.weight"].shape[-1] if "conv1.weight" in state else None
        if saved_model and model_name and saved_model != model_name:
            hint = f"; the file holds a {saved_model}: set model={saved_model}"
        elif "conv1.weight" in mismatched and kernel != own["conv1.weight"].shape[-1]:
            hint = f"; the file has the {'imagenet' if kernel == 7 else 'cifar'} stem: set "
            hint += f"model.stem={'imagenet' if kernel == 7 else 'cifar'}"
        elif "fc.weight" in mismatched:
            hint = (
                f"; the file's classifier has {file_classes} classes, this model "
                f"{own['fc.weight'].shape[0]}"
            )
        raise CheckpointError(f"{key}={path} does not fit this model ({'; '.join(problems)}){hint}")
    if check_only:
        return replaced
    model.load_state_dict(state, strict=not replaced)
    if replaced and renamed and file_classes == own["fc.weight"].shape[0]:
        log.info("loaded %s; classifier replaced (the file's classes %s, here %s)", path,
                 _short(list(saved_names)), _short(list(classes or [])))  # fmt: skip
    elif replaced:
        log.info(
            "loaded %s; classifier replaced (%d classes in the file, %d here)",
            path,
            file_classes,
            own["fc.weight"].shape[0],
        )
    else:
        log.info("loaded %s", path)
    return replaced
