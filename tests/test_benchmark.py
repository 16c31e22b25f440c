"""scripts/benchmark.py: runs the compared things and records a row in the benchmark table."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_benchmark_prints_the_figures_and_adds_a_consistent_row_to_the_table(tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    head = (REPO / "BENCHMARKS.md").read_text().split("\n\n## ")[0]
    table.write_text(head.rstrip("\n") + "\n\n## Another section\n\ntext\n")
    before = table.read_text().splitlines()
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--steps", "2", "--repeats", "1",
         "--batch", "16", "--data-images", "256", "--output", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trainer / bare" in result.stdout and "tensor / PIL" in result.stdout
    after = table.read_text().splitlines()
    assert len(after) == len(before) + 1
    new = next(line for line in after if line not in before)
    # The row closes the first table, before the next section.
    assert after.index(new) < after.index("## Another section") - 1
    cells = [c.strip() for c in new.strip("|").split("|")]
    assert len(cells) == 11 and "--steps 2" in cells[1]
    trainer, bare, ratio = (float(c.replace(",", "")) for c in cells[4:7])
    # The table shows whole images/s and the ratio of the unrounded figures.
    assert trainer > 0 and bare > 0
    assert (trainer - 0.5) / (bare + 0.5) - 1e-3 <= ratio <= (trainer + 0.5) / (bare - 0.5) + 1e-3
    tensor, pil = (float(c.replace(",", "")) for c in cells[7:9])
    speedup = float(cells[9].rstrip("x"))
    assert (tensor - 0.5) / (pil + 0.5) - 0.05 <= speedup <= (tensor + 0.5) / (pil - 0.5) + 0.05
    assert 0 < float(cells[10].rstrip("%")) < 100
