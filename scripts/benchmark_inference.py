"""Inference speed on this machine's CPU: eager PyTorch (fp32, channels_last, BN folded),
torch.compile, ONNX Runtime fp32 and int8, side by side in one process.

    python scripts/benchmark_inference.py [--models resnet20 resnet56] [--weights A.pt B.pt]
        [--data-root ~/data] [--batches 1 64 256] [--seconds 3] [--skip-compile]
        [--write]

Batch 1: latency per call, median and 90th percentile; larger batches: images/s from the
median call. Each variant is measured in rounds interleaved with the others, so that all see the
same machine state. Without --weights the models are freshly initialised (speed does not depend
on the weights); int8 is calibrated on CIFAR-10 training images from --data-root when they are
there, else on random images. Prints a table; with --write, appends its rows to BENCHMARKS.md
("Inference on the CPU").
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resnet_train.benchmarks import append_rows, check_options, command_line  # noqa: E402
from resnet_train.deploy.export import INPUT, export_onnx, onnx_session  # noqa: E402
from resnet_train.deploy.fold import fold_batchnorm  # noqa: E402
from resnet_train.deploy.quantize import quantize_int8  # noqa: E402
from resnet_train.models import create_model  # noqa: E402
from resnet_train.models.build import options_of  # noqa: E402
from resnet_train.models.summary import summarize  # noqa: E402
from resnet_train.models.weights import read_weights  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
SECTION = "## Inference on the CPU"
HEADER = (
    "| date | command | machine | torch / onnxruntime | model | variant | batch 1 median ms | "
    "batch 1 p90 ms | img/s by batch | speed-up over eager fp32 (largest batch) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def fail(message: str) -> None:
    """A bad option: one line (no usage text) and status 2."""
    print(f"benchmark_inference.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def cpu_name() -> str:
    """The CPU's model and the vector extensions that decide int8 speed (ONNX Runtime's u8 x s8
    kernels use VNNI or AMX where the CPU has them, AVX2's pairwise products otherwise)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())  # fmt: skip
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))  # fmt: skip
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def calibration_images(root: Path | None, mean: list[float], std: list[float],
                       n: int = 512) -> np.ndarray:  # fmt: skip
    """CIFAR-10 training images (random ones without the data), normalised with mean and std."""
    batch = root.expanduser() / "cifar-10-batches-py" / "data_batch_1" if root else None
    if batch is not None and batch.is_file():
        import pickle

        with open(batch, "rb") as f:
            rows = pickle.load(f, encoding="latin1")["data"][:n]
        x = rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255
    else:
        x = np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32)
    mean_, std_ = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (mean, std))
    return (x - mean_) / std_


def load_model(name: str, weights: Path | None) -> torch.nn.Module:
    """The model; with a weights file, the model it holds (its classes, widths, shortcut)."""
    if weights is None:
        return create_model(name, num_classes=10, stem="cifar").eval()
    return create_model(name, weights=weights).eval()


def normalisation(weights: Path | None) -> tuple[list[float], list[float]]:
    """The mean and std the weights' run trained with (CIFAR-10's without a run's record)."""
    data = ((read_weights(weights, key="--weights").config or {}).get("data") or {}
            if weights is not None else {})  # fmt: skip
    mean, std = data.get("mean"), data.get("std")
    return (mean, std) if isinstance(mean, list) and isinstance(std, list) else (MEAN, STD)


def model_label(name: str, weights: Path | None) -> str:
    """The model's name; for a pruned model, its MACs and how many fewer than unpruned."""
    model = load_model(name, weights)
    if weights is None or not getattr(model, "channels", None):
        return name
    macs = summarize(model, 32).macs
    unpruned = options_of(read_weights(weights, key="--weights"))  # (without its widths)
    full = summarize(create_model(name, **unpruned), 32).macs
    return f"{name} pruned ({macs / 1e6:.1f}M MACs, {100 * (1 - macs / full):.0f}% fewer)"


def variants(
    name: str, weights: Path | None, tmp: Path, data_root: Path | None, compile_: bool
) -> dict[str, Callable[[np.ndarray], object]]:
    model = load_model(name, weights)
    folded, _ = fold_batchnorm(model)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fp32, int8 = tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx"
    export_onnx(folded, torch.randn(2, 3, 32, 32), fp32)
    x = calibration_images(data_root, *normalisation(weights))
    quantize_int8(fp32, int8, (x[i : i + 64] for i in range(0, len(x), 64)), INPUT)
    # Without spinning: ONNX Runtime's idle threads would busy-wait through PyTorch's turns.
    sessions = {
        "ONNX Runtime fp32": onnx_session(fp32, spin=False),
        "ONNX Runtime int8": onnx_session(int8, spin=False),
    }

    def eager(m: torch.nn.Module, layout=torch.contiguous_format):
        def run(batch: np.ndarray) -> object:
            with torch.inference_mode():
                return m(torch.from_numpy(batch).contiguous(memory_format=layout))

        return run

    out = {
        "eager fp32": eager(model),
        "eager channels_last": eager(channels_last, torch.channels_last),
        "eager BN folded": eager(folded),
    }
    if compile_:
        out["torch.compile (BN folded)"] = eager(torch.compile(folded, dynamic=False))
    for label, session in sessions.items():
        out[label] = lambda batch, s=session: s.run(None, {INPUT: batch})
    return out


def measure(runs: dict[str, Callable], batch: np.ndarray, seconds: float) -> dict[str, list]:
    """Per variant, the time of each call; rounds of a few calls each, interleaved."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up (compilation, ONNX Runtime's first-run allocations)
        run(batch)
        run(batch)
    deadline = time.perf_counter() + seconds * len(runs)
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 5:
        for label, run in runs.items():
            for _ in range(3 if len(batch) == 1 else 1):
                start = time.perf_counter()
                run(batch)
                times[label].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--weights", nargs="*", type=Path, default=[],
                        help="a checkpoint per model (optional)")  # fmt: skip
    parser.add_argument("--data-root", type=Path, default=Path("~/data"),
                        help="the folder of cifar-10-batches-py/")  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per variant and batch size")  # fmt: skip
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--write", action="store_true", help="append the rows to BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md",
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.weights and len(args.weights) != len(args.models):
        fail("--weights takes one checkpoint per model in --models")
    if min(args.batches) < 1:
        fail(f"--batches {' '.join(map(str, args.batches))} is invalid: each must be >= 1")
    if not 0 < args.seconds < math.inf:
        fail(f"--seconds {args.seconds} is invalid: must be a number > 0")
    for name in args.models:
        check_options(fail, model=name, model_flag="--models")
    for weights in args.weights:
        if not weights.expanduser().is_file():
            fail(f"--weights {weights}: no such file")
    check_options(fail, output=args.output)  # (as the other benchmarks: with or without --write)
    import onnxruntime

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs"
    versions = f"{torch.__version__} / {onnxruntime.__version__}"
    command = command_line("scripts/benchmark_inference.py")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.models):
            weights = args.weights[i] if args.weights else None
            runs = variants(name, weights, Path(tmp), args.data_root, not args.skip_compile)
            shown = model_label(name, weights)
            figures: dict[str, dict[str, str]] = {k: {} for k in runs}
            speed: dict[int, dict[str, float]] = {}
            for b in args.batches:
                batch = rng.standard_normal((b, 3, 32, 32), dtype=np.float32)
                times = measure(runs, batch, args.seconds)
                speed[b] = {k: b / statistics.median(t) for k, t in times.items()}
                for label, t in times.items():
                    if b == 1:
                        figures[label]["median"] = f"{1000 * statistics.median(t):.2f}"
                        figures[label]["p90"] = f"{1000 * float(np.percentile(t, 90)):.2f}"
            largest = max(args.batches)
            for label in runs:
                per_batch = ", ".join(f"{b}: {speed[b][label]:,.0f}" for b in args.batches if b > 1)
                ratio = speed[largest][label] / speed[largest]["eager fp32"]
                rows.append(
                    f"| {datetime.date.today()} | `{command}` | {machine} | {versions} | {shown} | "
                    f"{label} | {figures[label].get('median', '-')} | "
                    f"{figures[label].get('p90', '-')} | {per_batch} | {ratio:.2f}x |"
                )
            for b in [b for b in args.batches if b > 1]:
                s = speed[b]
                print(
                    f"{shown} batch {b}: eager fp32 {s['eager fp32']:,.0f} img/s, "
                    f"ONNX Runtime fp32 {s['ONNX Runtime fp32']:,.0f} img/s; "
                    "int8 / ONNX Runtime fp32 "
                    f"{s['ONNX Runtime int8'] / s['ONNX Runtime fp32']:.2f}x, int8 / eager fp32 "
                    f"{s['ONNX Runtime int8'] / s['eager fp32']:.2f}x"
                )
    print(HEADER)
    print("\n".join(rows))
    if args.write:
        append_rows(
            args.output,
            SECTION,
            "Rows appended by `scripts/benchmark_inference.py`.",
            HEADER.splitlines()[0],
            rows,
        )


if __name__ == "__main__":
    main()
