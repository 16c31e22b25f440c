"""What the benchmark scripts under scripts/ share: fixed random batches, the optimizer and the
trainer's state they time, a timed trainer epoch, their option checks, and BENCHMARKS.md's
tables, where they add their rows."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_train.config import TrainerConfig
from resnet_train.engine.trainer import Training, build_criterion, sync_device, train_one_epoch
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


class CountOps(TorchDispatchMode):
    """Counts the operators dispatched that compute (each a kernel on a GPU; views are not
    counted) and the reads of a value into Python (aten._local_scalar_dense: .item(), bool():
    where the host waits for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def random_batches(
    n: int,
    batch: int,
    size: int,
    classes: int,
    device: torch.device,
    generator: torch.Generator,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Batches:
    """n batches of normal noise images (batch x 3 x size x size) and labels below classes."""
    return Batches([
        (torch.randn(batch, 3, size, size, generator=generator).to(
            device, memory_format=memory_format),
         torch.randint(0, classes, (batch,), generator=generator).to(device))
        for _ in range(n)
    ])  # fmt: skip


def fused_sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """The optimizer the trainer builds on the CPU and CUDA: torch's fused SGD."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                           fused=True)  # fmt: skip


def make_training(model, optimizer, cfg: TrainerConfig, device: torch.device, **extra) -> Training:
    """The trainer's state for a benchmark: a constant rate, no label smoothing."""
    return Training(
        model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
        criterion=build_criterion(0.0), device=device, cfg=cfg, **extra,
    )  # fmt: skip


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
    files: Iterable[tuple[str, Path | None]] = (),
    folders: Iterable[tuple[str, Path | None]] = (),
    model_flag: str = "--model",
) -> torch.device | None:
    """Call fail (one line, status 2) on the first bad option, before any work (so that no
    measurement is lost to a path found wrong at its end): a count below its least value
    ((flag, value, least)); an --output (or another file to write, `files`: (flag, path)) that is
    a folder or whose folder does not exist; a folder to write in (`folders`) that is a file; an
    unknown --model; a --device that is not the CPU or an available CUDA device. Returns the
    device."""
    for flag, value, least in counts:
        if value < least:
            fail(f"{flag} {value}: must be at least {least}")
    for flag, path in (("--output", output), *files):
        if path is None:
            continue
        if path.expanduser().is_dir():
            fail(f"{flag} {path}: is a folder; give a file to write")
        if not path.expanduser().resolve().parent.is_dir():
            fail(f"{flag} {path}: the folder {path.parent} does not exist")
    for flag, path in folders:
        if path is not None and path.expanduser().exists() and not path.expanduser().is_dir():
            fail(f"{flag} {path}: is a file; give a folder (made if it does not exist)")
    if model is not None and model not in list_models():
        fail(f"{model_flag} {model!r} is unknown: one of {', '.join(list_models())}")
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


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How a row's figures were made: the script and its options, less those that only say
    where the results go (--json, --output, --write): a row names what was compared."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--output"):
            skip = True
        elif arg != "--write" and not arg.startswith(("--json=", "--output=")):
            kept.append(arg)
    return shlex.join(["python", script, *kept])


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
