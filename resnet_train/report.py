"""`resnet-train-report SWEEP_DIR`: a Hydra multirun's jobs as one table.

Each job folder holds `.hydra/overrides.yaml` (what the job was given) and, once it has
finished, `metrics.json`. The swept keys are the overrides whose values differ between jobs;
jobs that differ only by `seed` form one row with the mean and standard deviation of their
figures. Rows are sorted by validation accuracy (the test accuracy is shown, never used to
rank). The table is printed and written as CSV (report.csv, and jobs.csv with one row per job),
with a PNG plot of the validation accuracy against each swept key's values (report.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEED = "seed"


class ReportError(Exception):
    pass


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, Any] | None  # None: not finished

    def figure(self, split: str, name: str) -> float | None:
        part = (self.metrics or {}).get(split)
        return None if not part else part.get(name)


@dataclass
class Group:
    values: dict[str, str]  # the swept keys other than seed
    jobs: list[Job] = field(default_factory=list)

    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.metrics is not None]

    def stat(self, split: str, name: str) -> tuple[float | None, float | None]:
        """(mean, sample standard deviation) over the finished jobs that have the figure."""
        xs = [v for j in self.finished() if (v := j.figure(split, name)) is not None]
        if not xs:
            return None, None
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def read_job(folder: Path) -> Job | None:
    overrides_file = folder / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    items = yaml.safe_load(overrides_file.read_text()) or []
    overrides = {}
    for item in items:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Job(folder, overrides, metrics)


def read_sweep(sweep: Path) -> list[Job]:
    if not sweep.is_dir():
        raise ReportError(f"{sweep} is not a folder: give the multirun folder of a sweep")
    jobs = [job for folder in sorted(sweep.iterdir()) if folder.is_dir()
            if (job := read_job(folder)) is not None]  # fmt: skip
    if not jobs:
        raise ReportError(
            f"{sweep} holds no job folders (sub-folders with .hydra/overrides.yaml): give the "
            "folder of a multirun, outputs/multirun/<sweep>"
        )
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """The override keys whose values are not the same in every job, in command-line order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def _sort_key(value: str | None) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def group_jobs(jobs: list[Job], keys: list[str]) -> list[Group]:
    by_values: dict[tuple, Group] = {}
    for job in jobs:
        values = {k: job.overrides.get(k, "") for k in keys if k != SEED}
        by_values.setdefault(tuple(values.values()), Group(values)).jobs.append(job)
    groups = list(by_values.values())

    def rank(g: Group) -> tuple:
        acc, _ = g.stat("valid", "acc")
        return (acc is None, -(acc or 0.0), [_sort_key(v) for v in g.values.values()])

    return sorted(groups, key=rank)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def table_rows(groups: list[Group], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    shown = [k for k in keys if k != SEED]
    header = [*shown, "seeds", "finished", "valid acc %", "valid loss", "test acc %", "img/s"]
    rows = []
    for g in groups:
        seeds = sorted((j.overrides.get(SEED, "-") for j in g.jobs), key=_sort_key)
        rows.append([
            *(g.values[k] for k in shown),
            ",".join(seeds),
            f"{len(g.finished())}/{len(g.jobs)}",
            _pm(*g.stat("valid", "acc")),
            _pm(*g.stat("valid", "loss")),
            _pm(*g.stat("test", "acc")),
            _pm(*_images_per_s(g)),
        ])  # fmt: skip
    return header, rows


def _images_per_s(g: Group) -> tuple[float | None, float | None]:
    xs = [j.metrics["images_per_s"] for j in g.finished() if j.metrics.get("images_per_s")]
    if not xs:
        return None, None
    return statistics.fmean(xs), None


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, ["-" * w for w in widths], *rows]]  # fmt: skip
    return "\n".join(lines)


def write_csvs(out: Path, groups: list[Group], jobs: list[Job], keys: list[str]) -> None:
    shown = [k for k in keys if k != SEED]
    figures = [("valid", "acc"), ("valid", "loss"), ("test", "acc"), ("test", "loss")]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*shown, "n_jobs", "n_finished", "seeds",
                    *(f"{s}_{n}_{m}" for s, n in figures for m in ("mean", "std"))])  # fmt: skip
        for g in groups:
            stats = [g.stat(s, n) for s, n in figures]
            w.writerow([
                *(g.values[k] for k in shown), len(g.jobs), len(g.finished()),
                " ".join(sorted((j.overrides.get(SEED, "") for j in g.jobs), key=_sort_key)),
                *("" if v is None else v for pair in stats for v in pair),
            ])  # fmt: skip
    with open(out / "jobs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *keys, "finished", *(f"{s}_{n}" for s, n in figures), "images_per_s"])
        for job in jobs:
            w.writerow([
                job.path.name, *(job.overrides.get(k, "") for k in keys), job.metrics is not None,
                *("" if (v := job.figure(s, n)) is None else v for s, n in figures),
                (job.metrics or {}).get("images_per_s", ""),
            ])  # fmt: skip


def plot(out: Path, jobs: list[Job], keys: list[str], title: str) -> Path | None:
    """Validation accuracy of every finished job (dots) and each value's mean against each
    swept key's values, one panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in keys if k != SEED] or keys
    done = [j for j in jobs if j.figure("valid", "acc") is not None]
    if not done or not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), squeeze=False)
    for ax, key in zip(axes[0], shown, strict=True):
        values = sorted({j.overrides.get(key, "") for j in done}, key=_sort_key)
        for x, value in enumerate(values):
            accs = [j.figure("valid", "acc") for j in done if j.overrides.get(key, "") == value]
            ax.scatter([x] * len(accs), accs, color="tab:blue", alpha=0.6, s=22)
            ax.plot([x - 0.2, x + 0.2], [statistics.fmean(accs)] * 2, color="tab:red", lw=2)
        ax.set_xticks(range(len(values)), values, rotation=30 if len(values) > 4 else 0)
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(sweep: Path, out: Path | None = None) -> str:
    """Read the sweep, write report.csv, jobs.csv and report.png into `out` (the sweep folder
    by default) and return the printed table."""
    jobs = read_sweep(sweep)
    keys = swept_keys(jobs)
    groups = group_jobs(jobs, keys)
    out = out or sweep
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(groups, keys)
    table = format_table(header, rows)
    write_csvs(out, groups, jobs, keys)
    png = plot(out, jobs, keys, sweep.name)
    finished = sum(j.metrics is not None for j in jobs)
    swept = ", ".join(keys) if keys else "nothing (every job has the same overrides)"
    lines = [
        f"{sweep}: {len(jobs)} jobs ({finished} finished), swept: {swept}",
        "sorted by validation accuracy; mean ± sample std over seeds",
        "",
        table,
        "",
        f"wrote {out / 'report.csv'}, {out / 'jobs.csv'}"
        + (f", {png}" if png else " (no plot: no job has a validation accuracy)"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="resnet-train-report",
        description="Summarise a resnet-train multirun: a table sorted by validation accuracy, "
        "seeds grouped into mean ± std, CSV files and a PNG plot.",
    )
    parser.add_argument("sweep", type=Path, help="the multirun folder, outputs/multirun/<sweep>")
    parser.add_argument("--out", type=Path, help="where to write the files (default: SWEEP)")
    args = parser.parse_args(argv)
    try:
        print(report(args.sweep, args.out))
    except (ReportError, OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        print(f"resnet-train-report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
