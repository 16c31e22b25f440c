"""The trainer's training step in each precision, memory format and compile setting, side by
side in one process: which is fastest on this machine, and by how much.

    python scripts/benchmark_variants.py [--model resnet20] [--batch 128] [--steps 5]
        [--repeats 5] [--variants fp32 fp32-cl bf16 bf16-cl fp32-compile fp32-cl-compile]
        [--device cpu] [--write]

A variant is a precision (fp32, bf16, fp16) with `-cl` for channels_last and `-compile` for
torch.compile (default mode). Each variant trains its own copy of the same model on the same
fixed batches with the trainer's step (fused SGD, the finite guard, the running sums); the
variants take turns, one epoch each per round, so that all see the same machine state. The
first epoch of each (warm-up, and compilation for compiled variants) is timed apart. Prints
images/s per variant (median over the rounds) and its ratio to the first variant; with
--write, appends a row per variant to BENCHMARKS.md's variants table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from resnet_train import create_model
from resnet_train.benchmarks import (
    append_rows,
    check_options,
    command_line,
    fused_sgd,
    make_training,
    random_batches,
    trainer_epoch,
)
from resnet_train.config import PRECISIONS, TrainerConfig
from resnet_train.engine.trainer import Training

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Precision, memory format and compile"
HEADER = (
    "| date | command | machine | torch | model, batch | variant | img/s | vs first variant "
    "| first epoch (s) |"
)


def fail(message: str) -> None:
    print(f"benchmark_variants.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_variant(name: str) -> tuple[str, bool, bool]:
    """'bf16-cl-compile' -> ('bf16', True, True)."""
    precision, *flags = name.split("-")
    if (
        precision not in PRECISIONS
        or not set(flags) <= {"cl", "compile"}
        or len(set(flags)) < len(flags)
    ):
        fail(
            f"--variants {name!r}: a precision ({', '.join(PRECISIONS)}) with -cl "
            "(channels_last) and/or -compile, e.g. bf16-cl"
        )
    return precision, "cl" in flags, "compile" in flags


def make_variant(name: str, args: argparse.Namespace, device: torch.device) -> Training:
    precision, channels_last, compiled = parse_variant(name)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)  # the same initial weights for every variant
    stem = "cifar" if args.image_size <= 64 else "imagenet"  # (as the trainer chooses)
    model = create_model(args.model, num_classes=args.classes, stem=stem)
    model = model.to(device, memory_format=memory)
    cfg = TrainerConfig(device=str(device), precision=precision, progress=False)
    t = make_training(model, fused_sgd(model), cfg, device, memory_format=memory)
    if compiled:
        t.forward, t.compiled = torch.compile(model), True
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each variant once)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--variants", nargs="+",
                        default=["fp32", "fp32-cl", "bf16", "bf16-cl", "fp32-compile",
                                 "fp32-cl-compile"])  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="append the rows to BENCHMARKS.md")
    parser.add_argument(
        "--output", type=Path, help="append the rows to this file (implies --write)"
    )
    args = parser.parse_args()
    counts = [("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
              ("--batch", args.batch, 1), ("--image-size", args.image_size, 8),
              ("--classes", args.classes, 2)]  # fmt: skip
    device = check_options(fail, counts, args.output, args.model, args.device)
    for name in args.variants:
        parse_variant(name)

    g = torch.Generator().manual_seed(0)
    size = args.image_size
    batches = random_batches(args.steps, args.batch, size, args.classes, device, g)
    runs = {name: make_variant(name, args, device) for name in args.variants}
    first = {name: trainer_epoch(t, batches) for name, t in runs.items()}  # warm-up, compilation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, t in runs.items():
            times[name].append(trainer_epoch(t, batches))
    images = args.batch * args.steps
    ips = {name: images / statistics.median(s) for name, s in times.items()}
    base = args.variants[0]

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if device.type == "cpu":
        machine += f", {torch.backends.cpu.get_cpu_capability()}"
    else:
        machine = torch.cuda.get_device_name(device)
    rounds = f"median of {args.repeats} epochs of {args.steps} steps"
    print(f"{args.model}, batch {args.batch}, {size} px, {device}, {machine}, "
          f"torch {torch.__version__}, {rounds}")  # fmt: skip
    rows = []
    command = command_line("scripts/benchmark_variants.py")
    for name in runs:
        ratio = ips[name] / ips[base]
        print(f"  {name:18s} {ips[name]:8,.0f} img/s  {ratio:5.2f}x  first epoch "
              f"{first[name]:.2f} s")  # fmt: skip
        rows.append(
            f"| {datetime.date.today()} | `{command.strip()}` | {machine} | {torch.__version__} "
            f"| {args.model}, {args.batch} | {name} | {ips[name]:,.0f} | {ratio:.2f}x "
            f"| {first[name]:.2f} |"
        )
    if args.write or args.output is not None:
        intro = (
            "Rows appended by `scripts/benchmark_variants.py`: the trainer's step in each variant, "
            "side by side in one process (medians of rounds; the first epoch, with any "
            "compilation, apart)."
        )
        append_rows(args.output or REPO / "BENCHMARKS.md", SECTION, intro, HEADER, rows)


if __name__ == "__main__":
    main()
