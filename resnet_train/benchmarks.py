"""What the benchmark scripts under scripts/ share: fixed batches, a timed trainer epoch, and
BENCHMARKS.md's tables, where they add their rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from resnet_train.engine.trainer import Training, sync_device, train_one_epoch
from resnet_train.models.registry import list_models


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


def check_options(
    fail: Callable[[str], None],
    counts: Iterable[tuple[str, int, int]] = (),
    output: Path | None = None,
    model: str | None = None,
    device: str | None = None,
) -> torch.device | None:
    """Call fail (one line, status 2) on the first bad option, before any work: a count below
    its least value ((flag, value, least)), an --output whose folder does not exist, an unknown
    --model, a --device that is not the CPU or an available CUDA device. Returns the device."""
    for flag, value, least in counts:
        if value < least:
            fail(f"{flag} {value}: must be at least {least}")
    if output is not None and not output.expanduser().resolve().parent.is_dir():
        fail(f"--output {output}: the folder {output.parent} does not exist")
    if model is not None and model not in list_models():
        fail(f"--model {model!r} is unknown: one of {', '.join(list_models())}")
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        fail(f"--device {device!r}: use cpu or cuda (cuda:N)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this machine has no CUDA device; use --device cpu")
    return parsed


def append_rows(path: Path, section: str, intro: str, header: str, rows: list[str]) -> None:
    """Add rows below the last row of the table that follows the heading `section` in path
    (header: the table's first line, then its separator line). A missing file, section or
    table is made: the section at the end, with its intro paragraph. Sections after the table
    stay where they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").splitlines()
    columns = header.count("|") - 1
    table = [header, "| " + " | ".join(["---"] * columns) + " |"]
    if section not in lines:
        lines += ["", section, "", intro, "", *table]
    start = lines.index(section)
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    head = next((i for i in range(start, stop) if lines[i].startswith("| date |")), None)
    if head is None:  # the section without its table: the table at the section's end
        while stop > start + 1 and not lines[stop - 1].strip():
            stop -= 1
        lines[stop:stop] = ["", *table]
        after = stop + 1 + len(table)
        if after < len(lines) and lines[after].strip():
            lines.insert(after, "")
        head = stop + 1
    end = head + 1
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines[end + 1 : end + 1] = rows
    path.write_text("\n".join(lines) + "\n")
