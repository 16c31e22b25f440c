"""What the benchmark scripts under scripts/ share: fixed batches, a timed trainer epoch, and
BENCHMARKS.md's tables, where they add their rows."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from resnet_train.engine.trainer import Training, sync_device, train_one_epoch


class Batches:
    """A fixed list of device batches, iterated like a loader."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = list(batches)
        self.dataset = range(sum(len(y) for _, y in self.batches))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def trainer_epoch(t: Training, batches: Batches) -> float:
    """Seconds of one pass of the trainer's step over batches (fresh running sums)."""
    sync_device(t.device)
    start = time.perf_counter()
    t.sums = None
    train_one_epoch(t, batches, "benchmark")
    sync_device(t.device)
    return time.perf_counter() - start


def append_rows(path: Path, section: str, intro: str, header: str, rows: list[str]) -> None:
    """Add rows below the last row of the table that follows the heading `section` in path
    (header: the table's first line, then its separator line). A missing file, section or
    table is made: the section at the end, with its intro paragraph. Sections after the table
    stay where they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").splitlines()
    if section not in lines:
        columns = header.count("|") - 1
        separator = "| " + " | ".join(["---"] * columns) + " |"
        lines += ["", section, "", intro, "", header, separator]
    start = lines.index(section)
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| date |"))
    end = head + 1
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines[end + 1 : end + 1] = rows
    path.write_text("\n".join(lines) + "\n")
