"""Checkpoint files: written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from resnet_train.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "config")


def _replace_atomically(path: Path, write) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a failed or killed save leaves the previous file intact and no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _replace_atomically(Path(path), lambda f: torch.save(state, f))


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    with open(src, "rb") as source:
        _replace_atomically(Path(dst), lambda f: shutil.copyfileobj(source, f))


def _reason(error: Exception) -> str:
    """The informative line of a torch.load error (they can run to a page)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
    return f"{type(error).__name__}: {detail[:200]}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, foreign formats: all unreadable
        raise CheckpointError(f"checkpoint {path} is unreadable ({_reason(e)})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a resnet-train checkpoint")
    return state
