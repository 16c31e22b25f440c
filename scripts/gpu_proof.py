"""The GPU proof: every CUDA test, the fast CIFAR-10 recipe timed to 94%, and the trainer's
throughput against a bare loop, in one command that fits a short lease of one GPU.

    python scripts/gpu_proof.py --data-root /data --out results/          # a GPU box, ~8 min
    python scripts/gpu_proof.py --data-root /data --out results/ --tiny   # toy size, CPU

Parts, each in its own process with its own time limit (a part that fails or runs out of time is
reported as such, and the others still run):
  tests     pytest -m cuda tests/test_cuda.py
  recipe    experiment=cifar10_resnet18_fast for each seed: test accuracy after every epoch,
            training seconds (compilation apart), time to 94%
  resnet50  scripts/benchmark.py: ResNet-50, 224 px, batch 256, bf16, channels_last, compile,
            synthetic batches: trainer and bare-loop images/s
  resnet18  the same for ResNet-18 on CIFAR-sized images from the tensor data path, batch 512

--out receives four files: proof.log (every part's output), results.json, results.md (the
table, printed last) and benchmark-rows.md (the rows added to BENCHMARKS.md, which is also
updated in place unless --no-write; --tiny writes nothing there).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_ACC = 94.0  # percent, mean over the seeds (airbench's bar for CIFAR-10)
TARGET_SECONDS = 30.0  # training seconds per seed on one H100
TARGET_RESNET50 = 4400.0  # images/s on one H100
TARGET_RATIO = 0.97  # trainer / bare loop


class Clock:
    """The proof's whole time budget: each part gets its own limit, cut to what is left."""

    def __init__(self, budget: float | None):
        self.end = None if budget is None else time.monotonic() + budget

    def limit(self, timeout: float) -> float:
        if self.end is None:
            return timeout
        return max(0.0, min(timeout, self.end - time.monotonic()))


def fail(message: str) -> None:
    """A bad option: one line (no usage text) and status 2."""
    print(f"gpu_proof.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_part(name: str, command: list[str], log, timeout: float, cwd: Path = REPO) -> dict:
    """Run one part's command, copying its output into the log; never raises. A part left with
    under 5 s of the budget is not started (exit None, output says so)."""
    if timeout < 5:
        log.write(f"\n===== {name}: not started, the time budget is spent\n")
        log.flush()
        return {"command": shlex.join(command), "exit": None, "seconds": 0.0, "started": False,
                "output": "[not started: the time budget is spent]"}  # fmt: skip
    log.write(f"\n===== {name}: {shlex.join(command)}\n")
    log.flush()
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n[timed out after {timeout:.0f} s]"
        code = None
    seconds = time.perf_counter() - start
    log.write(output)
    log.write(f"\n===== {name}: exit {code}, {seconds:.1f} s\n")
    log.flush()
    return {"command": shlex.join(command), "exit": code, "seconds": seconds, "output": output,
            "started": True, "timed_out": code is None}  # fmt: skip


def outcome(done: dict) -> dict:
    """The part of run_part's answer a result keeps: its exit, whether it started, timed out."""
    return {k: done.get(k) for k in ("exit", "started", "timed_out")}


def unfinished(result: dict) -> str:
    """Why a part (or seed) has no figures, for the table."""
    if result.get("started") is False:
        return "not run (the time budget was spent)"
    if result.get("timed_out"):
        return "did not finish (timed out)"
    return f"did not finish (exit {result['exit']})"


def tests_part(args, log) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "-p", "no:xdist", "tests/test_cuda.py"]  # fmt: skip
    done = run_part("tests", command, log, args.clock.limit(args.timeout))
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    words = r"(\d+) (passed|failed|skipped|errors?|deselected)"
    summary = [line for line in done["output"].splitlines() if re.search(words, line)]
    for number, word in re.findall(words, summary[-1] if summary else ""):
        if word != "deselected":
            counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return {**outcome(done), "seconds": done["seconds"], **counts}


def recipe_part(args, log, runs: Path) -> dict:
    per_seed = []
    for seed in args.seeds:
        run_dir = runs / f"seed{seed}"
        command = [sys.executable, "-m", "resnet_train", "experiment=cifar10_resnet18_fast",
                   f"data.root={args.data_root}", f"seed={seed}", "trainer.test_every_epoch=true",
                   f"hydra.run.dir={run_dir}"]  # fmt: skip
        if args.tiny:  # (before the variant's own overrides, which win)
            command += ["model=resnet20", "data.train_size=200", "data.test_size=50",
                        "trainer.epochs=2", "trainer.device=cpu", "trainer.compile=false",
                        "trainer.compile_mode=default",
                        "trainer.precision=fp32"]  # bf16 runs ~15x slower on a CPU  # fmt: skip
        command += args.recipe_overrides
        done = run_part(f"recipe seed {seed}", command, log, args.clock.limit(args.timeout))
        entry = {"seed": seed, "command": done["command"], **outcome(done),
                 "process_seconds": done["seconds"]}  # fmt: skip
        metrics_file = run_dir / "metrics.json"
        if done["exit"] == 0 and metrics_file.is_file():
            entry.update(summarize_history(json.loads(metrics_file.read_text())))
        per_seed.append(entry)
    finished = [e for e in per_seed if "test_acc" in e]
    mean = statistics.mean(e["test_acc"] for e in finished) if finished else None
    return {"seeds": per_seed, "mean_test_acc": mean,
            "all_finished": len(finished) == len(per_seed)}  # fmt: skip


def summarize_history(metrics: dict) -> dict:
    """Per epoch test accuracy and the training clock: seconds spent training (compilation
    apart) up to each epoch, and up to the first epoch at TARGET_ACC or above."""
    elapsed, by_epoch, reached = 0.0, [], None
    for record in metrics["history"]:
        elapsed += record["train_seconds"]
        by_epoch.append({"epoch": record["epoch"], "test_acc": record.get("test_acc"),
                         "train_seconds": round(elapsed, 2)})  # fmt: skip
        if reached is None and (record.get("test_acc") or 0) >= TARGET_ACC:
            reached = elapsed
    return {
        "test_acc": metrics["test"]["acc"],
        "train_seconds": elapsed,
        "compile_seconds": sum(r.get("compile_seconds", 0.0) for r in metrics["history"]),
        "seconds_to_target": reached,
        "epochs": by_epoch,
    }


def benchmark_part(name: str, flags: list[str], args, log, runs: Path) -> dict:
    """scripts/benchmark.py with these flags; its row goes into BENCHMARKS.md (or, with
    --no-write, into a scratch copy) and is returned too."""
    out = runs / f"{name}.json"
    table_file = args.benchmarks
    if args.no_write:
        table_file = runs / "BENCHMARKS.md"
        if args.benchmarks.is_file() and not table_file.exists():
            table_file.write_text(args.benchmarks.read_text())
    before = table_file.read_text().splitlines() if table_file.is_file() else []
    command = [sys.executable, "scripts/benchmark.py", *flags, "--json", str(out),
               "--output", str(table_file)]  # fmt: skip
    done = run_part(name, command, log, args.clock.limit(args.timeout))
    figures = json.loads(out.read_text()) if done["exit"] == 0 and out.is_file() else {}
    after = table_file.read_text().splitlines() if table_file.is_file() else []
    rows = [line for line in after if line not in before]
    return {**outcome(done), "seconds": done["seconds"], "rows": rows, **figures}


def benchmark_flags(args) -> dict[str, list[str]]:
    mode = [] if args.compile_mode == "default" else ["--compile-mode", args.compile_mode]
    if args.tiny:
        return {
            "resnet50": ["--model", "resnet50", "--image-size", "64", "--classes", "10", "--batch",
                         "4", "--steps", "2", "--repeats", "1", "--device", "cpu", "--skip-data"],
            "resnet18": ["--model", "resnet18", "--batch", "8", "--steps", "2", "--repeats", "1",
                         "--device", "cpu", "--tensor-loader", "--skip-data"],
        }  # fmt: skip
    return {
        "resnet50": ["--model", "resnet50", "--image-size", "224", "--classes", "1000", "--batch",
                     "256", "--precision", "bf16", "--device", "cuda", "--compile", "--skip-data",
                     *mode],
        "resnet18": ["--model", "resnet18", "--batch", "512", "--precision", "bf16", "--device",
                     "cuda", "--compile", "--tensor-loader", "--skip-data", *mode],
    }  # fmt: skip


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def table(results: dict, machine: str) -> str:
    """The results as a Markdown table; at toy size (--tiny) the speed and accuracy targets are
    not judged."""
    rows = [("part", "figure", "target", "met")]
    judged = verdict if not results["tiny"] else (lambda ok: "-")
    t = results.get("tests")
    if t and t.get("started") is False:
        rows.append(("cuda tests", unfinished(t), "all pass", "NO"))
    elif t:
        ran = t["passed"] + t["failed"] + t["error"]
        rows.append(("cuda tests", f"{t['passed']} passed, {t['failed']} failed, "
                     f"{t['error']} errors, {t['skipped']} skipped",
                     "all pass", verdict(None if ran == 0 and t["exit"] is not None
                                         else t["exit"] == 0)))  # fmt: skip
    r = results.get("recipe")
    if r:
        for e in r["seeds"]:
            if "test_acc" not in e:
                rows.append((f"fast recipe seed {e['seed']}", unfinished(e), "", "NO"))
                continue
            to_target = (f"{e['seconds_to_target']:.1f} s" if e["seconds_to_target"] is not None
                         else "not reached")  # fmt: skip
            rows.append((
                f"fast recipe seed {e['seed']}",
                f"test {e['test_acc']:.2f}%, {e['train_seconds']:.1f} s training "
                f"(+{e['compile_seconds']:.1f} s compiling), {TARGET_ACC:g}% at {to_target}",
                f"<= {TARGET_SECONDS:g} s", judged(e["train_seconds"] <= TARGET_SECONDS),
            ))  # fmt: skip
        if r["mean_test_acc"] is not None:
            met = r["all_finished"] and r["mean_test_acc"] >= TARGET_ACC
            mean = f"test {r['mean_test_acc']:.2f}% over {len(r['seeds'])} seeds"
            rows.append(("fast recipe mean", mean, f">= {TARGET_ACC:g}%", judged(met)))
    for name, target in (("resnet50", TARGET_RESNET50), ("resnet18", None)):
        b = results.get(name)
        if not b:
            continue
        if "trainer_images_per_s" not in b:
            rows.append((name, unfinished(b), "", "NO"))
            continue
        ok = b["trainer_over_bare"] >= TARGET_RATIO and (
            target is None or b["trainer_images_per_s"] >= target
        )
        goal = f">= {target:,.0f} img/s, " if target else ""
        rows.append((
            f"{name} {b['image_size']} px batch {b['batch']}",
            f"trainer {b['trainer_images_per_s']:,.0f} img/s, bare {b['bare_images_per_s']:,.0f}, "
            f"ratio {b['trainer_over_bare']:.3f}",
            f"{goal}ratio >= {TARGET_RATIO}", judged(ok),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"GPU proof on {machine}, {results['date']}"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
              for row in rows]  # fmt: skip
    lines.insert(2, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines) + "\n"


def recipe_rows(results: dict, machine: str, torch_version: str, command: str) -> list[str]:
    rows = []
    for e in results.get("recipe", {}).get("seeds", []):
        if "test_acc" not in e:
            continue
        to_target = f"{e['seconds_to_target']:.1f}" if e["seconds_to_target"] is not None else "-"
        rows.append(f"| {results['date']} | `{command} seed={e['seed']}` | {machine} | "
                    f"{torch_version} | {e['test_acc']:.2f} | {e['train_seconds']:.1f} | "
                    f"{e['compile_seconds']:.1f} | {to_target} |")  # fmt: skip
    return rows


RECIPE_HEADER = (
    "## Fast recipe runs\n\nRows appended by `scripts/gpu_proof.py`: test accuracy after the "
    "last epoch, training seconds (compilation apart), compilation seconds, training seconds "
    "to 94% test accuracy.\n\n| date | command | machine | torch | test acc % | training s | "
    "compile s | s to 94% |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def append_recipe_rows(path: Path, rows: list[str]) -> None:
    """Add rows at the end of the fast-recipe table of BENCHMARKS.md, making it if needed."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if "## Fast recipe runs" not in text:
        text = text.rstrip("\n") + "\n\n" + RECIPE_HEADER + "\n"
    lines = text.splitlines()
    start = lines.index("## Fast recipe runs")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("| --- "))
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines[end + 1 : end + 1] = rows
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, type=Path,
                        help="the folder that holds cifar-10-batches-py/")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, help="where the results go")
    parser.add_argument("--tiny", action="store_true", help="every part at toy size, on the CPU")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="fast-recipe seeds (default 0 1 2; --tiny: 0 1)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=["tests", "recipe", "resnet50", "resnet18"],
                        choices=["tests", "recipe", "resnet50", "resnet18"])  # fmt: skip
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per part and per seed (default 150; --tiny 300)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole proof: each part's limit is cut to what is "
                        "left, and parts with no time left are reported as not run")  # fmt: skip
    parser.add_argument("--recipe-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for each fast-recipe run (a variant)")  # fmt: skip
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode for the two benchmarks (both sides)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md as it is")
    parser.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md",
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    for flag, value in (("--budget", args.budget), ("--timeout", args.timeout)):
        if value is not None and not 0 < value < float("inf"):
            fail(f"{flag} {value:g} is invalid: must be a number of seconds > 0")
    import torch  # after the options are parsed: --help stays quick

    if not args.tiny and not torch.cuda.is_available():
        fail(
            "this machine has no CUDA device: the proof's figures need one (--tiny runs every "
            "part at toy size on the CPU)"
        )
    if not (args.data_root / "cifar-10-batches-py").is_dir():
        fail(f"--data-root {args.data_root}: no cifar-10-batches-py/ in it")
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if args.tiny else [0, 1, 2])
    args.timeout = args.timeout or (300.0 if args.tiny else 150.0)
    args.no_write = args.no_write or args.tiny
    args.data_root = args.data_root.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.clock = Clock(args.budget)
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (tiny)"
    results: dict = {"date": str(datetime.date.today()), "machine": machine,
                     "torch": torch.__version__, "tiny": args.tiny}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_proof_") as scratch, \
            open(args.out / "proof.log", "w") as log:  # fmt: skip
        runs = Path(scratch)
        parts = {"tests": lambda: tests_part(args, log),
                 "recipe": lambda: recipe_part(args, log, runs)}  # fmt: skip
        for name, flags in benchmark_flags(args).items():
            parts[name] = functools.partial(benchmark_part, name, flags, args, log, runs)
        for name in args.parts:
            results[name] = parts[name]()
            # after every part, so that a proof stopped from outside still leaves its figures
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (args.out / "results.md").write_text(table(results, machine))
    command = shlex.join(["resnet-train", "experiment=cifar10_resnet18_fast",
                          "trainer.test_every_epoch=true", *args.recipe_overrides])  # fmt: skip
    rows = recipe_rows(results, machine, torch.__version__, command)
    if rows and not args.no_write:
        append_recipe_rows(args.benchmarks, rows)
    rows += [
        row for name in ("resnet50", "resnet18") for row in results.get(name, {}).get("rows", [])
    ]
    (args.out / "benchmark-rows.md").write_text("\n".join(rows) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results, machine)
    (args.out / "results.md").write_text(text)
    print(text, end="")
    if not complete(results):
        sys.exit(1)


def complete(results: dict) -> bool:
    """Whether every part ran to its end (the cuda tests all passing); a target missed by a
    figure is the table's to say, not a failure of the proof."""
    recipe = results.get("recipe")
    parts = [results.get(n) for n in ("tests", "resnet50", "resnet18") if n in results]
    parts += recipe["seeds"] if recipe else []
    return all(p.get("exit") == 0 for p in parts)


if __name__ == "__main__":
    main()
