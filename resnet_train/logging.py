"""What a run shows and records: tqdm bars, one summary line per epoch, TensorBoard scalars."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("resnet_train")


def progress_bar(iterable, total: int, desc: str, enabled: bool | None) -> tqdm:
    """A tqdm bar on stderr; `enabled=None` shows it only when stderr is a terminal."""
    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=disable)


def tensorboard_writer(run_dir: Path) -> SummaryWriter:
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
