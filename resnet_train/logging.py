"""What a run shows and records: tqdm bars, one summary line per epoch, TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("resnet_train")


def progress_bar(total_images: int, desc: str, enabled: bool | None) -> tqdm:
    """A tqdm bar on stderr counting images, so its rate is images/s; `enabled=None` shows it
    only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(
        total=total_images, desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=disable
    )


def loss_text(value: float) -> str:
    """A loss for a log line: 4 decimals, or 4 significant digits where that would be a wall of
    digits (a diverging run's 1130141577115666627952640.0000 is 1.13e+24)."""
    return f"{value:.4f}" if not math.isfinite(value) or abs(value) < 1e5 else f"{value:.4g}"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A JSON record (metrics.json, eval.json, ...), replaced whole: never half-written. A
    non-finite number (the loss of a diverged epoch) is written as null: NaN and Infinity are
    not JSON, and strict readers (jq, JavaScript, most non-Python parsers) refuse the file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite_or_null(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def tensorboard_writer(run_dir: Path, purge_step: int | None = None) -> SummaryWriter:
    """Every scalar is logged against the optimizer step. purge_step (a resumed run's first
    step) hides the events a killed run wrote at or after it, so no step appears twice.

    TensorBoard reads a folder's event files in the order of their names, which start with the
    second they were opened in: a run resumed within the second its killed predecessor started
    would be read first and have its steps purged by the older file. So a new file is opened
    in a later second than every file already there (a wait of under a second, only then)."""
    import time

    folder = run_dir / "tensorboard"
    # events.out.tfevents.<second>.<host>.<pid>.<n>
    seconds = [p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*")]
    opened = [int(second) for second in seconds if second.isdigit()]
    if opened and (wait := max(opened) + 1 - time.time()) > 0:
        time.sleep(wait)
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)
