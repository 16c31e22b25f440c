"""Whole-process speed: `resnet-train` against a bare hand-written PyTorch script doing the same
work, each a process of its own, phase by phase.

    python scripts/benchmark_process.py --data-root /data [--repeats 3] [--write]

Both train a CIFAR ResNet-20 for one epoch on all of CIFAR-10's training images (no validation
split, batches of 128, a random crop of the 4-pixel padded image and a horizontal flip, SGD with
momentum 0.9) and test it once on the test set, on the CPU. The runs alternate (resnet-train,
bare, resnet-train, ...) so that both see the same machine, and each writes when it reached each
phase:

    start-up    launch -> the run's own code starts (interpreter, imports, config, checks)
    data        reading the data set, building the model, the optimizer and the loaders
    training    the epoch: each batch drawn and augmented, each step
    test        the test pass
    shut-down   tested -> the process has exited (records, checkpoints, plots, exit)

It prints the median of each phase and the ratio of the totals (bare / resnet-train: above 1,
resnet-train is the faster); with --write it adds a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("start-up", "data", "training", "test", "shut-down")
SECTION = "## Whole process: resnet-train against a bare script"


def fail(message: str) -> None:
    print(f"benchmark_process.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def bare(data_root: Path, out: Path, epochs: int, seed: int) -> None:
    """The bare script: what a person writes by hand for the same work, and nothing else."""
    started = time.time()
    import pickle

    import numpy as np
    import torch
    from torch import nn

    from resnet_train.models import create_model  # the same network

    timeline = {"fit": time.time()}
    folder = data_root / "cifar-10-batches-py"

    def read(names):
        images, labels = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(batch["data"].reshape(-1, 3, 32, 32))
            labels += batch["labels"]
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1) * 255
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    padded = nn.functional.pad(train_x, (4, 4, 4, 4))
    timeline["train"] = time.time()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), 128):
            idx = order[start : start + 128]
            dx, dy = torch.randint(0, 9, (2, len(idx))).tolist()
            x = torch.stack([padded[i, :, b : b + 32, a : a + 32]
                             for i, a, b in zip(idx.tolist(), dx, dy, strict=True)])  # fmt: skip
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(3)
            x = (x.float() - mean) / std
            loss = criterion(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    timeline["test"] = time.time()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_y), 256):
            x = (test_x[start : start + 256].float() - mean) / std
            correct += int((model(x).argmax(1) == test_y[start : start + 256]).sum())
    timeline["tested"] = time.time()
    torch.save(model.state_dict(), out.with_suffix(".pt"))
    out.write_text(json.dumps({"timeline": timeline, "started": started,
                               "test_acc": 100 * correct / len(test_y)}))  # fmt: skip


def run_side(side: str, args, scratch: Path, index: int) -> dict[str, float]:
    """One process of one side; its phases in seconds."""
    out = scratch / f"{side}-{index}.json"
    if side == "resnet-train":
        from resnet_train.cli import hydra_quoted  # (a root with a comma or a quote)

        run_dir = scratch / f"run-{index}"
        command = [sys.executable, "-m", "resnet_train", "model=resnet20", "data=cifar10",
                   f"data.root={hydra_quoted(str(args.data_root))}", "data.valid_ratio=0",
                   "data.batch_size=128",
                   f"trainer.epochs={args.epochs}", "trainer.device=cpu", f"seed={index}",
                   "trainer.progress=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    else:
        command = [sys.executable, __file__, "--bare", "--data-root", str(args.data_root),
                   "--epochs", str(args.epochs), "--bare-out", str(out), "--seed",
                   str(index)]  # fmt: skip
    launched = time.time()
    result = subprocess.run(command, cwd=scratch, capture_output=True, text=True)
    exited = time.time()
    if result.returncode != 0:
        fail(f"{side} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    if side == "resnet-train":
        record = json.loads((run_dir / "metrics.json").read_text())
    else:
        record = json.loads(out.read_text())
    t = record["timeline"]
    marks = [launched, t["fit"], t["train"], t["test"], t["tested"], exited]
    phases = {name: b - a for name, a, b in zip(PHASES, marks, marks[1:], strict=False)}
    phases["total"] = exited - launched
    phases["test_acc"] = record["test"]["acc"] if side == "resnet-train" else record["test_acc"]
    return phases


def table_row(medians: dict[str, dict[str, float]], command: str) -> str:
    ours, theirs = medians["resnet-train"], medians["bare"]
    cells = " / ".join(f"{ours[p]:.1f}" for p in (*PHASES, "total"))
    bare_cells = " / ".join(f"{theirs[p]:.1f}" for p in (*PHASES, "total"))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (f"| {datetime.date.today()} | `{command}` | {machine} | {cells} | {bare_cells} | "
            f"{theirs['total'] / ours['total']:.3f} |")  # fmt: skip


def write_row(path: Path, row: str) -> None:
    """The row at the end of the section's table (not of a later section's)."""
    from resnet_train.benchmarks import append_rows  # not at start-up: the bare side's is timed

    intro = (
        "One CIFAR-10 epoch of ResNet-20 (50,000 images, batch 128, crop and flip, one test pass) "
        "as a whole process, medians of alternating runs. Phases in seconds: start-up / data / "
        "training / test / shut-down / total. Ratio: bare total / resnet-train total."
    )
    header = "| date | command | machine | resnet-train (s) | bare script (s) | ratio |"
    append_rows(path, SECTION, intro, header, [row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True,
                        help="the folder holding cifar-10-batches-py/")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each run (default 1)")
    parser.add_argument("--write", action="store_true", help="add the row to BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md",
                        help="the table --write adds to")  # fmt: skip
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data_root = args.data_root.expanduser().resolve()
    if args.bare:
        bare(args.data_root, args.bare_out, args.epochs, args.seed)
        return
    from resnet_train.benchmarks import check_options

    check_options(fail, output=args.output)
    if not (args.data_root / "cifar-10-batches-py" / "data_batch_1").is_file():
        fail(f"--data-root {args.data_root} holds no cifar-10-batches-py/ (the python version)")
    if args.repeats < 1 or args.epochs < 1:
        fail(f"--repeats {args.repeats} --epochs {args.epochs}: both must be at least 1")
    runs: dict[str, list[dict[str, float]]] = {"resnet-train": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="benchmark-process-") as tmp:
        scratch = Path(tmp)
        for index in range(args.repeats):
            for side in runs:
                phases = run_side(side, args, scratch, index)
                runs[side].append(phases)
                print(f"{side:13s} run {index + 1}: " + "  ".join(
                    f"{k} {v:.2f}" for k, v in phases.items()), flush=True)  # fmt: skip
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for side, rs in runs.items()}  # fmt: skip
    print(f"\n{'phase (s, median)':18s} {'resnet-train':>12s} {'bare':>8s}")
    for phase in (*PHASES, "total", "test_acc"):
        ours, theirs = medians["resnet-train"][phase], medians["bare"][phase]
        print(f"{phase:18s} {ours:12.2f} {theirs:8.2f}")
    ratio = medians["bare"]["total"] / medians["resnet-train"]["total"]
    print(f"ratio bare / resnet-train (whole process): {ratio:.3f}")
    if args.write:
        from resnet_train.benchmarks import command_line

        command = command_line("scripts/benchmark_process.py")
        write_row(args.output, table_row(medians, command))
        print(f"row added to {args.output}")


if __name__ == "__main__":
    main()
