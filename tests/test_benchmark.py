"""scripts/benchmark.py: runs the compared things and records a row in the benchmark table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_program


def test_benchmark_prints_the_figures_and_adds_a_consistent_row_to_the_table(tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    head = (REPO / "BENCHMARKS.md").read_text().split("\n\n## ")[0]
    table.write_text(head.rstrip("\n") + "\n\n## Another section\n\ntext\n")
    before = table.read_text().splitlines()
    result = run_program("scripts/benchmark.py", "--steps", "2", "--repeats", "1", "--batch", "16",
                         "--data-images", "256", "--output", str(table))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trainer / bare" in result.stdout and "tensor / PIL" in result.stdout
    after = table.read_text().splitlines()
    assert len(after) == len(before) + 1
    new = next(line for line in after if line not in before)
    # The row closes the first table, before the next section.
    assert after.index(new) < after.index("## Another section") - 1
    cells = [c.strip() for c in new.strip("|").split("|")]
    assert len(cells) == 11 and "--steps 2" in cells[1]
    assert "--output" not in cells[1] and str(tmp_path) not in cells[1]  # where, not what
    trainer, bare, ratio = (float(c.replace(",", "")) for c in cells[4:7])
    # The table shows whole images/s and the ratio of the unrounded figures.
    assert trainer > 0 and bare > 0
    assert (trainer - 0.5) / (bare + 0.5) - 1e-3 <= ratio <= (trainer + 0.5) / (bare - 0.5) + 1e-3
    tensor, pil = (float(c.replace(",", "")) for c in cells[7:9])
    speedup = float(cells[9].rstrip("x"))
    assert (tensor - 0.5) / (pil + 0.5) - 0.05 <= speedup <= (tensor + 0.5) / (pil - 0.5) + 0.05
    assert 0 < float(cells[10].rstrip("%")) < 100


def test_bookkeeping_mode_measures_the_per_step_work_and_adds_a_row_to_its_table(tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\n| date | command |\n| --- | --- |\n| x | y |\n")
    args = ["--bookkeeping", "--bookkeeping-steps", "6", "--bookkeeping-repeats", "3",
            "--steps", "2", "--repeats", "1", "--batch", "8", "--image-size", "16",
            "--json", str(tmp_path / "figures.json"), "--output", str(table)]  # fmt: skip
    for _ in range(2):  # the second run adds its row to the table the first one made
        result = run_program("scripts/benchmark.py", *args)
        assert result.returncode == 0, result.stderr
    assert "bookkeeping per step" in result.stdout and "share of the step" in result.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    low, high = figures["bookkeeping_quartiles_s"]
    assert low <= figures["bookkeeping_s"] <= high
    assert figures["real_step_s"] > 0
    assert figures["share"] == pytest.approx(figures["bookkeeping_s"] / figures["real_step_s"])
    # Seven kernels a step on top of the bare loop's (the guard 2, the loss 1, the accuracy 4),
    # and the device is read only at log steps and the epoch's end (6 steps: the end only).
    assert figures["extra_ops"] == 7 and figures["bare_ops"] > 100
    assert figures["reads_per_epoch"] <= 4
    lines = table.read_text().splitlines()
    assert lines[:5] == ["# Benchmarks", "", "| date | command |", "| --- | --- |", "| x | y |"]
    assert lines.count("## Per-step bookkeeping") == 1
    rows = [line for line in lines[5:] if line.startswith("| 20")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert len(cells) == 9 and "--bookkeeping" in cells[1]
    assert "--json" not in cells[1] and str(tmp_path) not in cells[1]
    assert cells[6].startswith(f"{100 * figures['share']:.2f}%"[:3])
    assert cells[7].startswith("7.0 (bare loop:")


def test_variants_benchmark_times_each_variant_and_adds_its_rows(tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    args = ["--batch", "4", "--steps", "1", "--repeats", "2", "--image-size", "8",
            "--variants", "fp32", "fp32-cl", "bf16-cl", "--output", str(table)]  # fmt: skip
    result = run_program("scripts/benchmark_variants.py", *args)
    assert result.returncode == 0, result.stderr
    printed = re.findall(r"^  (\S+) +([\d,]+) img/s +([\d.]+)x", result.stdout, re.MULTILINE)
    assert [name for name, _, _ in printed] == ["fp32", "fp32-cl", "bf16-cl"]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 3
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[5] for c in cells] == ["fp32", "fp32-cl", "bf16-cl"]
    assert cells[0][7] == "1.00x"  # the first variant is the reference
    ips = [float(c[6].replace(",", "")) for c in cells]
    for c, value in zip(cells, ips, strict=True):
        assert value > 0 and float(c[8]) >= 0
        # The row shows whole images/s and the ratio of the unrounded figures (to 2 places).
        low, high = (value - 0.5) / (ips[0] + 0.5), (value + 0.5) / max(ips[0] - 0.5, 1e-9)
        assert low - 0.006 <= float(c[7].rstrip("x")) <= high + 0.006


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("variants", ["--variants", "fp64"], "--variants 'fp64': a precision (fp32, fp16, bf16)"),
        ("variants", ["--variants", "fp32-cl-cl"], "--variants 'fp32-cl-cl': a precision"),
        ("variants", ["--steps", "0"], "--steps 0: must be at least 1"),
        ("variants", ["--model", "nosuch"], "--model 'nosuch' is unknown: one of "),
        ("variants", ["--classes", "0"], "--classes 0: must be at least 2"),
        ("variants", ["--image-size", "0"], "--image-size 0: must be at least 8"),
        ("variants", ["--device", "mps"], "--device 'mps': use cpu or cuda"),
        ("variants", ["--output", "no/such/x.md"], "--output no/such/x.md: the folder no/such "),
        ("", ["--bookkeeping", "--bookkeeping-repeats", "1"],
         "--bookkeeping-repeats 1: must be at least 2"),
        ("", ["--bookkeeping", "--bookkeeping-steps", "0"],
         "--bookkeeping-steps 0: must be at least 2"),
        ("", ["--bookkeeping", "--bookkeeping-batch", "0"],
         "--bookkeeping-batch 0: must be at least 1"),
        ("", ["--steps", "0"], "--steps 0: must be at least 1"),
        ("", ["--output", "no/such/x.md"], "--output no/such/x.md: the folder no/such "),
        ("", ["--device", "meta"], "--device 'meta': use cpu or cuda"),
        ("inference", ["--output", "no/such/x.md"], "--output no/such/x.md: the folder "),
        # paths that failed only after the measurements (their figures lost)
        ("", ["--output", "scripts"], "--output scripts: is a folder; give a file to write"),
        ("", ["--json", "no/such/x.json"], "--json no/such/x.json: the folder no/such "),
        ("", ["--profile", "README.md"], "--profile README.md: is a file; give a folder"),
        ("variants", ["--output", "scripts"], "--output scripts: is a folder"),
        ("inference", ["--models", "resnet20", "resnet19"], "--models 'resnet19' is unknown"),
        ("inference", ["--models", "resnet20", "--weights", "no/such.pt"],
         "--weights no/such.pt: no such file"),
        ("inference", ["--seconds", "inf"], "--seconds inf is invalid: must be a number > 0"),
        ("process", ["--data-root", ".", "--output", "scripts"], "--output scripts: is a folder"),
    ],
)  # fmt: skip
def test_benchmarks_reject_a_bad_option_in_one_line_before_any_work(script, args, message):
    name = f"benchmark_{script}.py" if script else "benchmark.py"
    result = run_program(f"scripts/{name}", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith(f"{name}: error: ")


def test_rows_go_to_their_own_section_s_table_made_where_missing(tmp_path):
    from resnet_train.benchmarks import append_rows

    path = tmp_path / "t.md"
    later = ["## C", "", "| date | x |", "| --- | --- |", "| d | 1 |"]
    path.write_text("\n".join(["# B", "", "## A", "", "notes only", "", *later]) + "\n")
    append_rows(path, "## A", "intro", "| date | y | z |", ["| new | 1 | 2 |"])
    append_rows(path, "## A", "intro", "| date | y | z |", ["| newer | 3 | 4 |"])
    assert path.read_text().splitlines() == [
        "# B", "", "## A", "", "notes only", "", "| date | y | z |", "| --- | --- | --- |",
        "| new | 1 | 2 |", "| newer | 3 | 4 |", "", *later,
    ]  # fmt: skip
    append_rows(path, "## D", "Rows of D.", "| date | w |", ["| e | 5 |"])  # a new section
    assert path.read_text().endswith("| d | 1 |\n\n## D\n\nRows of D.\n\n| date | w |\n"
                                     "| --- | --- |\n| e | 5 |\n")  # fmt: skip
    path.write_text("# B\n\n## A\n\nnotes only\n")  # the section last, without a table
    append_rows(path, "## A", "intro", "| date | y |", ["| f | 6 |"])
    table = "| date | y |\n| --- | --- |\n| f | 6 |\n"
    assert path.read_text() == "# B\n\n## A\n\nnotes only\n\n" + table


@pytest.mark.slow
def test_gpu_proof_runs_every_part_at_toy_size_and_prints_its_table_last(tmp_path):
    from tests.conftest import make_cifar

    make_cifar(tmp_path / "data", "cifar10", per_file=60)
    benchmarks = (REPO / "BENCHMARKS.md").read_bytes()
    result = subprocess.run(
        [sys.executable, "scripts/gpu_proof.py", "--data-root", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--tiny", "--seeds", "0",
         "--recipe-overrides", "data.augment.cutout=4", "trainer.epochs=3"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (REPO / "BENCHMARKS.md").read_bytes() == benchmarks  # --tiny writes nothing there
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "benchmark-rows.md", "proof.log", "results.json", "results.md"
    ]  # fmt: skip
    table = (out / "results.md").read_text()
    assert result.stdout.endswith(table)
    for part in ("cuda tests", "fast recipe seed 0", "fast recipe mean", "resnet50 64 px",
                 "resnet18 32 px"):  # fmt: skip
        assert f"| {part}" in table, table
    results = json.loads((out / "results.json").read_text())
    cuda_tests = (REPO / "tests" / "test_cuda.py").read_text().count("\ndef test_")
    assert results["tests"]["skipped"] >= cuda_tests and results["tests"]["failed"] == 0
    (seed,) = results["recipe"]["seeds"]
    assert [e["epoch"] for e in seed["epochs"]] == [1, 2, 3]  # the variant's, not --tiny's 2
    assert all(0 <= e["test_acc"] <= 100 for e in seed["epochs"])
    assert seed["train_seconds"] > 0 and seed["test_acc"] == seed["epochs"][-1]["test_acc"]
    for name in ("resnet50", "resnet18"):
        assert results[name]["trainer_images_per_s"] > 0 and results[name]["exit"] == 0
    rows = (out / "benchmark-rows.md").read_text().splitlines()
    assert len(rows) == 3 and all(row.startswith(f"| {results['date']} |") for row in rows)
    assert "trainer.test_every_epoch=true data.augment.cutout=4 trainer.epochs=3 seed=0`" in rows[0]
    assert "data.augment.cutout=4" in results["recipe"]["seeds"][0]["command"]


@pytest.mark.slow
def test_inference_benchmark_adds_one_row_per_variant_to_its_own_section(tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\n| date | a |\n| --- | --- |\n| x | 1 |\n")
    args = [
        "scripts/benchmark_inference.py",
        "--models",
        "resnet20",
        "--batches",
        "1",
        "4",
        "--seconds",
        "0.05",
        "--skip-compile",
        "--output",
        str(table),
    ]
    before = table.read_text()
    result = run_program(*args)  # without --write: printed only
    assert result.returncode == 0, result.stderr
    assert "| ONNX Runtime int8 |" in result.stdout and table.read_text() == before
    # the second run, of a pruned model, appends below the first one's rows; the third, of a
    # pruned checkpoint with the projection shortcut (B), builds that model (it failed to load)
    for extra in ([], ["--weights", str(pruned_weights(tmp_path))],
                  ["--weights", str(pruned_weights(tmp_path, shortcut="B"))]):  # fmt: skip
        result = run_program(*args, "--write", *extra)
        assert result.returncode == 0, result.stderr
    assert "int8 / ONNX Runtime fp32" in result.stdout
    lines = table.read_text().splitlines()
    assert lines[:5] == ["# Benchmarks", "", "| date | a |", "| --- | --- |", "| x | 1 |"]
    rows = [line for line in lines if "| resnet20" in line]
    variants = ["eager fp32", "eager channels_last", "eager BN folded", "ONNX Runtime fp32",
                "ONNX Runtime int8"]  # fmt: skip
    assert [row.split(" | ")[5] for row in rows] == variants * 3
    assert all(" | resnet20 | " in row for row in rows[:5])
    # a pruned model is named with its MACs and how many fewer than unpruned
    assert all("| resnet20 pruned (" in row and "M MACs, 49% fewer) |" in row for row in rows[5:10])
    assert all("| resnet20 pruned (" in row and "M MACs, 55% fewer) |" in row for row in rows[10:])
    for row in rows:
        cells = row.split(" | ")
        assert float(cells[6]) > 0 and cells[8].startswith("4: ")
    assert lines.count("## Inference on the CPU") == 1


def pruned_weights(folder: Path, shortcut: str = "A") -> Path:
    """A ResNet-20 as task=prune saves it: with shortcut A, half of each block's inner channels
    pruned (blocks); with B, 0.3 of each dependency group (groups, round_to 8)."""
    import copy

    import torch

    from resnet_train.deploy.prune import prune_blocks, prune_groups
    from resnet_train.models import create_model
    from resnet_train.models.channels import channel_record

    model = create_model("resnet20", shortcut=shortcut)
    reference = copy.deepcopy(model)
    if shortcut == "A":
        prune_blocks(model, 0.5, "l1", seed=0)
    else:
        prune_groups(model, 0.3, "l1", 32, 8)
    weights = folder / f"pruned-{shortcut}.pt"
    config = {"model": {"name": "resnet20", "shortcut": shortcut, "stem": "cifar"},
              "data": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}  # fmt: skip
    torch.save({"model": model.state_dict(), "channels": channel_record(model, reference),
                "config": config}, weights)  # fmt: skip
    return weights


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--batches", "0", "4"], "--batches 0 4 is invalid: each must be >= 1"),
     (["--seconds", "-1"], "--seconds -1.0 is invalid: must be a number > 0")],
)  # fmt: skip
def test_inference_benchmark_refuses_bad_options_in_one_line(option, message):
    result = run_program("scripts/benchmark_inference.py", *option)
    assert result.returncode == 2
    assert result.stderr == f"benchmark_inference.py: error: {message}\n"


def test_gpu_proof_with_its_budget_spent_reports_the_parts_it_did_not_start(tmp_path):
    from tests.conftest import make_cifar

    make_cifar(tmp_path / "data", "cifar10", per_file=10)
    result = subprocess.run(
        [sys.executable, "scripts/gpu_proof.py", "--data-root", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--tiny", "--seeds", "0", "--budget", "1",
         "--parts", "recipe", "resnet18"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # (it exited 0: parts missing)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["recipe"]["seeds"][0]["exit"] is None and results["resnet18"]["exit"] is None
    assert "not started, the time budget is spent" in (tmp_path / "out" / "proof.log").read_text()
    table = (tmp_path / "out" / "results.md").read_text()
    assert re.search(r"\| fast recipe seed 0 +\| not run \(the time budget was spent\)", table)
    assert re.search(r"\| resnet18 +\| not run \(the time budget was spent\) ", table), table
    for budget in ("0", "-5", "inf"):
        refused = run_program(
            "scripts/gpu_proof.py",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "o2"),
            "--tiny",
            "--budget",
            budget,
        )
        assert refused.returncode == 2 and not (tmp_path / "o2").exists()
        assert f"--budget {float(budget):g} is invalid: must be a number of seconds > 0" in (
            refused.stderr
        )


def test_gpu_proof_exits_1_when_a_part_fails(tmp_path):
    """A seed whose run failed was a row "did not finish (exit 2) | NO", with status 0."""
    from tests.conftest import make_cifar

    make_cifar(tmp_path / "data", "cifar10", per_file=10)
    result = subprocess.run(
        [sys.executable, "scripts/gpu_proof.py", "--data-root", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--tiny", "--seeds", "0", "--parts", "recipe",
         "--recipe-overrides", "optim.lr=-1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert re.search(r"\| fast recipe seed 0 +\| did not finish \(exit 2\) ", result.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_scripts_refuse_a_missing_cuda_device_in_one_line(tmp_path):
    proof = ["--data-root", str(tmp_path), "--out", str(tmp_path)]
    for script, args in (("benchmark.py", ["--device", "cuda"]), ("gpu_proof.py", proof)):
        result = run_program(f"scripts/{script}", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"{script}: error: ") and "no CUDA device" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_whole_process_benchmark_times_each_phase_of_both_sides(tmp_path):
    from tests.conftest import make_cifar

    make_cifar(tmp_path / "data", "cifar10", per_file=26)  # 130 training images, 26 to test
    table = tmp_path / "BENCHMARKS.md"
    old_row = "| old | row | x | 1 / 1 / 1 / 1 / 1 / 5 | 1 / 1 / 1 / 1 / 1 / 5 | 1.000 |"
    later = "## A later section\n\n| date | other |\n| --- | --- |\n| a | b |\n"
    table.write_text("# Benchmarks\n\n## Whole process: resnet-train against a bare script\n\n"
                     "| date | command | machine | resnet-train (s) | bare script (s) | ratio |\n"
                     f"| --- | --- | --- | --- | --- | --- |\n{old_row}\n\n{later}")  # fmt: skip
    result = run_program("scripts/benchmark_process.py", "--data-root", str(tmp_path / "data"),
                         "--repeats", "1", "--write", "--output", str(table))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    figures = {r[0]: r[1:] for r in rows if r[0] in ("start-up", "total", "test_acc")}
    assert all(float(v) > 0 for v in figures["start-up"] + figures["total"])
    ratio = float(result.stdout.strip().splitlines()[-2].rsplit(" ", 1)[1])
    ours, bare = (float(v) for v in figures["total"])  # printed to 0.01 s, the ratio to 0.001
    assert (bare - 0.005) / (ours + 0.005) - 5e-4 <= ratio <= (bare + 0.005) / (ours - 0.005) + 5e-4
    lines = table.read_text().splitlines()
    row = lines[lines.index(old_row) + 1]  # in its own section's table, not the later one
    assert table.read_text().endswith("\n\n" + later)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("`python scripts/benchmark_process.py --data-root ")
    phases = [[float(v) for v in cell.split(" / ")] for cell in cells[3:5]]
    for side in phases:  # five phases and their total
        assert len(side) == 6 and abs(sum(side[:5]) - side[5]) <= 0.35
    assert float(cells[5]) == pytest.approx(ratio, abs=2e-3)
    bad = run_program("scripts/benchmark_process.py", "--data-root", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("benchmark_process.py: error: --data-root")


def test_a_row_s_command_names_what_was_compared_not_where_results_went():
    from resnet_train.benchmarks import command_line

    argv = ["--model", "resnet18", "--json", "/tmp/x/r.json", "--output=/tmp/B.md", "--write",
            "--batch", "512", "--output", "/tmp/BENCHMARKS.md", "--label", "a b"]  # fmt: skip
    assert command_line("scripts/benchmark.py", argv) == (
        "python scripts/benchmark.py --model resnet18 --batch 512 --label 'a b'"
    )
