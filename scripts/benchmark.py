"""Where the time goes: the trainer's training step against a bare hand-written loop, and the
tensor data path against the DataLoader + PIL path, side by side in one process.

    python scripts/benchmark.py [--model resnet20] [--batch 128] [--steps 10] [--repeats 5]
                                [--precision fp32] [--device cpu] [--write]
    # ResNet-50 on ImageNet-shaped synthetic batches, as on a GPU box:
    python scripts/benchmark.py --model resnet50 --image-size 224 --classes 1000 --batch 256 \
        --precision bf16 --device cuda --compile --skip-data
    # ResNet-18 on CIFAR-sized images drawn and augmented by the tensor data path each step:
    python scripts/benchmark.py --model resnet18 --batch 512 --precision bf16 --device cuda \
        --compile --tensor-loader --skip-data
    # What the trainer does per step besides the model's arithmetic, and its share of a step:
    python scripts/benchmark.py --bookkeeping [--write]

Prints the figures (medians over the repeats, interleaved so both sides see the same machine
state) and their ratios; with --write, appends a row to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from resnet_train import create_model
from resnet_train.benchmarks import (
    Batches,
    CountOps,
    append_rows,
    check_options,
    command_line,
    fused_sgd,
    make_training,
    random_batches,
    trainer_epoch,
)
from resnet_train.config import COMPILE_MODES, CUDA_GRAPH_MODES, AugmentConfig, TrainerConfig
from resnet_train.data.tensor_loader import TensorLoader
from resnet_train.engine.trainer import (
    sync_device,
)
from resnet_train.precision import autocast, channels_last_for

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
REPO = Path(__file__).resolve().parents[1]


def fail(message: str) -> None:
    """A bad option: one line (no usage text) and status 2."""
    print(f"benchmark.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def bare_epoch(
    model, optimizer, criterion, batches: Batches, device, precision, graphs: bool = False
) -> float:
    """What a hand-written loop does per step, and nothing else."""
    model.train()  # (a compiled module forwards train() to the model it wraps)
    sync_device(device)
    start = time.perf_counter()
    for images, targets in batches:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, precision):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync_device(device)
    return time.perf_counter() - start


class PilCifar(Dataset):
    """torchvision's CIFAR10 way: a PIL image per item, per-image transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def data_epoch(loader, device) -> float:
    sync_device(device)
    start = time.perf_counter()
    for images, _ in loader:
        images.to(device, non_blocking=True)
    sync_device(device)
    return time.perf_counter() - start


def profile_sides(folder: Path, device: torch.device, sides: dict) -> None:
    """One epoch of each side under torch.profiler: wall time, the time the device spent in
    kernels (its busy share; a low share means the host cannot issue work fast enough), how many
    operators and kernels were launched, and each side's busiest operators, into folder."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for name, epoch in sides.items():
        with profile(activities=activities) as prof:
            wall = epoch()
        events = prof.key_averages()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (folder / f"{name}.txt").write_text(
            events.table(sort_by=sort, row_limit=40)
            + "\n\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=40)  # fmt: skip
        )
        print(f"  profile {name:8s} wall {wall * 1e3:8.1f} ms, device busy {busy * 1e3:8.1f} ms "
              f"({100 * busy / wall:.0f}%), {len(kernels)} kernels, {ops} aten ops")  # fmt: skip


def bookkeeping(args: argparse.Namespace, device: torch.device) -> dict:
    """The trainer's per-step work besides the model's arithmetic (finite guard, running loss and
    accuracy, the per-step scalars and TensorBoard, progress), measured where it is visible: on
    tiny batches (--bookkeeping-batch images of --bookkeeping-size px), whose arithmetic takes
    little time, the trainer's epoch and the bare loop's are timed in pairs, alternating, and
    the median of their differences per step is the bookkeeping's time. On the CPU the tiny
    epochs run on one thread and are timed in process CPU time (the TensorBoard writer's thread
    included), which this machine's neighbours do not inflate as they do wall time. Its share
    is that time over the bare step's wall time at the real size (--batch images of
    --image-size px, all threads). The trainer runs as a run does: a TensorBoard writer, the
    default log_every_steps, progress lines."""
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    steps = args.bookkeeping_steps
    g = torch.Generator().manual_seed(0)

    def model_and_optimizer():
        torch.manual_seed(0)
        stem = "cifar" if args.image_size <= 64 else "imagenet"  # (the real batches' model)
        model = create_model(args.model, num_classes=args.classes, stem=stem).to(device)
        return model, fused_sgd(model)

    tiny = random_batches(steps, args.bookkeeping_batch, args.bookkeeping_size, args.classes,
                          device, g)  # fmt: skip
    real = random_batches(args.steps, args.batch, args.image_size, args.classes, device, g)
    model, opt = model_and_optimizer()
    bare_model, bare_opt = model_and_optimizer()
    criterion = nn.CrossEntropyLoss()
    with tempfile.TemporaryDirectory() as logs:
        writer = SummaryWriter(logs)
        cfg = TrainerConfig(device=args.device, precision=args.precision, progress=False)
        t = make_training(model, opt, cfg, device, writer=writer)

        def bare(batches: Batches) -> float:
            return bare_epoch(bare_model, bare_opt, criterion, batches, device, args.precision)

        def timed(epoch) -> float:
            if device.type == "cuda":
                return epoch()
            start = time.process_time()
            epoch()
            return time.process_time() - start

        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        trainer_epoch(t, tiny)  # warm-up
        bare(tiny)
        differences = []
        for _ in range(args.bookkeeping_repeats):
            trainer_s = timed(lambda: trainer_epoch(t, tiny))
            differences.append((trainer_s - timed(lambda: bare(tiny))) / steps)
        torch.set_num_threads(threads)
        # Operators per step: an epoch of all the steps against one of half of them, so that
        # what an epoch does once (its sums, its end) is not counted.
        half = Batches(tiny.batches[: steps // 2])
        ops = {}
        for name, epoch in (("trainer", lambda b: trainer_epoch(t, b)), ("bare", bare)):
            with CountOps() as whole:
                epoch(tiny)
            with CountOps() as first_half:
                epoch(half)
            ops[name] = (whole.ops - first_half.ops) / (steps - steps // 2)
            ops[f"{name}_reads"] = whole.reads
        bare(real)
        real_step = statistics.median(bare(real) / args.steps for _ in range(args.repeats))
        writer.close()
    per_step = statistics.median(differences)
    quartiles = statistics.quantiles(differences, n=4)
    return {
        "bookkeeping_s": per_step,
        "bookkeeping_quartiles_s": [quartiles[0], quartiles[2]],
        "real_step_s": real_step,
        "share": per_step / real_step,
        "extra_ops": ops["trainer"] - ops["bare"],
        "bare_ops": ops["bare"],
        "reads_per_epoch": ops["trainer_reads"],
        "steps": steps,
    }


def write_bookkeeping_row(path: Path, machine: str, figures: dict) -> None:
    """A row of BENCHMARKS.md's per-step bookkeeping table (made if it is not there)."""
    header = (
        "| date | command | machine | torch | bookkeeping per step | bare step at the real size "
        "| share of the step | extra operators per step | device reads per epoch |"
    )
    intro = (
        "Rows appended by `scripts/benchmark.py --bookkeeping`: the trainer's step minus the "
        "bare loop's on tiny batches (medians of alternating epochs), over the bare step at the "
        "real size."
    )
    command = command_line("scripts/benchmark.py")
    low, high = (q * 1e6 for q in figures["bookkeeping_quartiles_s"])
    row = (
        f"| {datetime.date.today()} | `{command.strip()}` | {machine} | {torch.__version__} "
        f"| {figures['bookkeeping_s'] * 1e6:,.0f} us (quartiles {low:,.0f} to {high:,.0f}) "
        f"| {figures['real_step_s'] * 1e3:,.1f} ms "
        f"| {100 * figures['share']:.2f}% | {figures['extra_ops']:.1f} "
        f"(bare loop: {figures['bare_ops']:.0f}) | {figures['reads_per_epoch']} "
        f"({figures['steps']} steps) |"
    )
    append_rows(path, "## Per-step bookkeeping", intro, header, [row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for both sides (with --compile)")  # fmt: skip
    parser.add_argument("--skip-data", action="store_true", help="time the training step only")
    parser.add_argument(
        "--tensor-loader",
        action="store_true",
        help="both sides take their batches from the tensor data path (random uint8 images, "
        "crop with padding and flip per step) instead of a fixed list of device batches",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--bookkeeping",
        action="store_true",
        help="measure the trainer's per-step work besides the model's arithmetic and its share of "
        "a step (see bookkeeping() in this script) instead of the comparisons above",
    )
    parser.add_argument("--bookkeeping-steps", type=int, default=100)
    parser.add_argument("--bookkeeping-repeats", type=int, default=21)
    parser.add_argument("--bookkeeping-batch", type=int, default=2)
    parser.add_argument("--bookkeeping-size", type=int, default=8)
    parser.add_argument(
        "--profile",
        type=Path,
        help="after timing, profile one more epoch of each side: the busiest operators of each "
        "go to PROFILE/trainer.txt and PROFILE/bare.txt, and the device's busy share is printed",
    )
    parser.add_argument("--write", action="store_true",
                        help="append the row to BENCHMARKS.md (else only printed)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None,
                        help="append the row to this file instead (implies --write)")  # fmt: skip
    args = parser.parse_args()
    counts = [("--batch", args.batch, 1), ("--steps", args.steps, 1),
              ("--repeats", args.repeats, 1), ("--image-size", args.image_size, 8),
              ("--classes", args.classes, 2), ("--data-images", args.data_images, 1),
              ("--workers", args.workers, 0)]  # fmt: skip
    if args.bookkeeping:  # pairs for quartiles; an epoch and its half for operators per step
        counts += [("--bookkeeping-steps", args.bookkeeping_steps, 2),
                   ("--bookkeeping-repeats", args.bookkeeping_repeats, 2),
                   ("--bookkeeping-batch", args.bookkeeping_batch, 1),
                   ("--bookkeeping-size", args.bookkeeping_size, 8)]  # fmt: skip
    device = check_options(
        fail,
        counts,
        args.output,
        args.model,
        args.device,
        files=[("--json", args.json)],
        folders=[("--profile", args.profile)],
    )
    if args.compile_mode != "default" and not args.compile:
        fail(f"--compile-mode {args.compile_mode} needs --compile")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    if args.bookkeeping:
        figures = bookkeeping(args, device)
        print(f"{args.model}, {args.precision}, {device}, {machine}, torch {torch.__version__}")
        low, high = (q * 1e6 for q in figures["bookkeeping_quartiles_s"])
        print(
            f"  bookkeeping per step            {figures['bookkeeping_s'] * 1e6:,.0f} us "
            f"(quartiles {low:,.0f} to {high:,.0f})"
        )
        print(
            f"  bare step, batch {args.batch}, {args.image_size} px   "
            f"{figures['real_step_s'] * 1e3:,.1f} ms"
        )
        print(f"  share of the step               {100 * figures['share']:.2f}%")
        print(
            f"  extra operators per step        {figures['extra_ops']:.1f} "
            f"(bare loop {figures['bare_ops']:.0f})"
        )
        print(f"  device reads in {figures['steps']} steps     {figures['reads_per_epoch']}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        if args.write or args.output is not None:
            write_bookkeeping_row(args.output or REPO / "BENCHMARKS.md", machine, figures)
        return
    channels_last = channels_last_for(None, device)  # the trainer's default layout
    memory = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = args.image_size
    stem = "cifar" if size <= 64 else "imagenet"

    # (a) and (b): the same model weights, batches, precision and memory format.
    if args.tensor_loader:  # both sides draw and augment each step's batch on the device
        pixels = torch.randint(0, 256, (args.batch * args.steps, 3, size, size), generator=g,
                               dtype=torch.uint8)  # fmt: skip
        targets = torch.randint(0, args.classes, (args.batch * args.steps,), generator=g)
        batches = TensorLoader(pixels.to(device), targets.to(device), args.batch, 0, True,
                               AugmentConfig(), MEAN, STD, channels_last)  # fmt: skip
    else:
        batches = random_batches(args.steps, args.batch, size, args.classes, device, g, memory)
    base = create_model(args.model, num_classes=args.classes, stem=stem)
    base = base.to(device, memory_format=memory)
    bare_model = create_model(args.model, num_classes=args.classes, stem=stem)
    bare_model = bare_model.to(device, memory_format=memory)
    bare_model.load_state_dict(base.state_dict())
    cfg = TrainerConfig(device=args.device, precision=args.precision, progress=False,
                        log_every_steps=10**9)  # fmt: skip
    # Both sides use the optimizer the trainer builds: torch's fused SGD.
    t = make_training(base, fused_sgd(base), cfg, device, memory_format=memory)
    bare_opt = fused_sgd(bare_model)
    bare_forward = bare_model
    graphs = args.compile and device.type == "cuda" and args.compile_mode in CUDA_GRAPH_MODES
    if args.compile:
        t.forward, t.compiled = torch.compile(base, mode=args.compile_mode), True
        t.cuda_graphs = graphs
        bare_forward = torch.compile(bare_model, mode=args.compile_mode)
    criterion = nn.CrossEntropyLoss()
    trainer_epoch(t, batches)  # warm-up (and compilation), both sides
    bare_epoch(bare_forward, bare_opt, criterion, batches, device, args.precision, graphs)
    trainer_s, bare_s = [], []
    for _ in range(args.repeats):
        trainer_s.append(trainer_epoch(t, batches))
        bare_s.append(
            bare_epoch(bare_forward, bare_opt, criterion, batches, device, args.precision, graphs)
        )
    n_images = args.batch * args.steps
    if args.profile:
        profile_sides(args.profile, device, {
            "trainer": lambda: trainer_epoch(t, batches),
            "bare": lambda: bare_epoch(bare_forward, bare_opt, criterion, batches, device,
                                       args.precision, graphs),
        })  # fmt: skip
    trainer_ips = n_images / statistics.median(trainer_s)
    bare_ips = n_images / statistics.median(bare_s)

    tensor_ips = pil_ips = data_share = None
    if not args.skip_data:
        # (c) the data paths alone, with the same augmentation (crop with padding 4 + flip).
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (args.data_images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.data_images)
        tensor = TensorLoader(
            torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device),
            torch.from_numpy(labels).to(device), args.batch, 0, True, AugmentConfig(), MEAN, STD,
            channels_last,
        )  # fmt: skip
        pil = DataLoader(PilCifar(pixels, labels), batch_size=args.batch, shuffle=True,
                         num_workers=args.workers, persistent_workers=args.workers > 0,
                         pin_memory=device.type == "cuda")  # fmt: skip
        data_epoch(tensor, device)
        data_epoch(pil, device)  # starts the workers
        tensor_s, pil_s = [], []
        for epoch in range(max(5, args.repeats)):
            tensor.set_epoch(epoch)
            tensor_s.append(data_epoch(tensor, device))
            pil_s.append(data_epoch(pil, device))
        tensor_ips = args.data_images / statistics.median(tensor_s)
        pil_ips = args.data_images / statistics.median(pil_s)
        data_share = (1 / tensor_ips) / (1 / trainer_ips)  # data time per image / step time

    rows = [
        ("trainer step", f"{trainer_ips:,.0f} img/s"),
        ("bare loop", f"{bare_ips:,.0f} img/s"),
        ("trainer / bare", f"{trainer_ips / bare_ips:.3f}"),
    ]
    data = ["-"] * 4
    if tensor_ips is not None:
        data = [f"{tensor_ips:,.0f}", f"{pil_ips:,.0f}", f"{tensor_ips / pil_ips:.1f}x",
                f"{100 * data_share:.2f}%"]  # fmt: skip
        rows += [
            ("tensor data path", f"{tensor_ips:,.0f} img/s"),
            (f"DataLoader+PIL, {args.workers} workers", f"{pil_ips:,.0f} img/s"),
            ("tensor / PIL", f"{tensor_ips / pil_ips:.1f}x"),
            ("tensor path share of step time", f"{100 * data_share:.2f}%"),
        ]
    compiled = ""
    if args.compile:
        mode = "" if args.compile_mode == "default" else f" {args.compile_mode}"
        compiled = f"compiled{mode}, "
    layout = "channels_last" if channels_last else "contiguous"
    source = "tensor data path" if args.tensor_loader else "fixed batches"
    print(f"{args.model}, batch {args.batch}, {size} px, {args.precision}, {layout}, {source}, "
          f"{device}, {compiled}{machine}, torch {torch.__version__}")  # fmt: skip
    for name, value in rows:
        print(f"  {name:34s} {value}")
    if args.json:
        figures = {
            "model": args.model, "batch": args.batch, "image_size": size,
            "precision": args.precision, "channels_last": channels_last,
            "compile": args.compile, "compile_mode": args.compile_mode,
            "tensor_loader": args.tensor_loader,
            "device": str(device), "machine": machine, "torch": torch.__version__,
            "trainer_images_per_s": trainer_ips, "bare_images_per_s": bare_ips,
            "trainer_over_bare": trainer_ips / bare_ips,
            "tensor_data_images_per_s": tensor_ips, "pil_data_images_per_s": pil_ips,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.write or args.output is not None:
        path = args.output or REPO / "BENCHMARKS.md"
        header = (
            "| date | command | machine | torch | trainer img/s | bare img/s | trainer/bare "
            "| tensor data img/s | PIL data img/s | tensor/PIL | data share of step |"
        )
        if not path.exists():  # the file's first table, under its title
            path.write_text(
                "# Benchmarks\n\nRows appended by `scripts/benchmark.py` (medians over repeats; "
                "each row's command says what was compared).\n"
            )
        command = command_line("scripts/benchmark.py")
        row = (
            f"| {datetime.date.today()} | `{command.strip()}` | {machine} "
            f"| {torch.__version__} "
            f"| {trainer_ips:,.0f} | {bare_ips:,.0f} | {trainer_ips / bare_ips:.3f} "
            f"| {' | '.join(data)} |"
        )
        append_rows(path, "# Benchmarks", "", header, [row])


if __name__ == "__main__":
    main()
