"""`resnet-train-report SWEEP_DIR`: a Hydra multirun's jobs as one table.

Each job folder holds `.hydra/overrides.yaml` (what the job was given) and, once it has
finished, `metrics.json`. The swept keys are the overrides whose values differ between jobs;
jobs that differ only by `seed` form one row with the mean and standard deviation of their
figures. The jobs of the sweep's grid (its `multirun.yaml`) that have no folder, as an
interrupted sweep leaves them, are listed as never started. Rows are sorted by validation
accuracy (the test accuracy is shown, never used to rank). The table is printed and written
as CSV (report.csv, and jobs.csv with one row per job), with a PNG plot of the validation
accuracy against each swept key's values (report.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resnet_train.config import (
    MAY_CHANGE,
    SWEEPABLE_MAY_CHANGE,
    flatten,
    override_key,
    sweep_values,
    swept_in,
)
from resnet_train.search import Trial, read_trials

SEED = "seed"


class ReportError(Exception):
    pass


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, Any] | None  # None: not finished
    failure: str | None = None  # why it failed, where its log says it did and it has no metrics
    started: bool = True  # False: a job of the sweep's grid that has no folder

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
        if not all(math.isfinite(x) for x in xs):  # a diverged job: its nan or inf shows
            return statistics.fmean(xs), None
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
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except (ValueError, OSError) as e:  # listed as failed; the other jobs are reported
        return Job(folder, overrides, None, f"its metrics.json is not readable JSON ({e})")
    if metrics_file.is_file() and not isinstance(metrics, dict):
        return Job(folder, overrides, None, "its metrics.json does not hold a JSON object")
    return Job(folder, overrides, metrics, None if metrics else _failure(folder))


FAILED = "this job failed: "


def _failure(folder: Path) -> str | None:
    """The error a sweep job ended with (the line cli.train logs), from its log; None for a job
    that is running, was interrupted, or never started."""
    reason = None
    for log_file in sorted(folder.glob("*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if FAILED in line:
                reason = line.split(FAILED, 1)[1].strip()
    return reason


def read_sweep(sweep: Path) -> list[Job]:
    if not sweep.is_dir():
        raise ReportError(f"{sweep} is not a folder: give the multirun folder of a sweep")
    jobs = [job for folder in sorted(sweep.iterdir()) if folder.is_dir()
            if (job := read_job(folder)) is not None]  # fmt: skip
    if not jobs:
        if any((folder / "metrics.json").is_file() for folder in sweep.iterdir()):
            raise ReportError(
                f"{sweep} holds runs but no record of their overrides (.hydra/overrides.yaml): "
                "a sweep run with hydra.output_subdir=null keeps none, so what each job swept "
                "is unknown; run the sweep without it to compare its jobs"
            )
        raise ReportError(
            f"{sweep} holds no job folders (sub-folders with .hydra/overrides.yaml): give the "
            "folder of a multirun, outputs/multirun/<sweep>"
        )
    return jobs


def swept_keys(jobs: list[Job], command_swept: set[str] | None = None) -> list[str]:
    """The override keys whose values are not the same in every job, in command-line order.
    Keys that only say where or how a run is done (data.root, trainer.device, resume, ...) are
    not taken as swept (a job relaunched with resume=auto or on another machine is the same)
    unless the sweep's command swept them (`command_swept`: data.num_workers=0,4)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    wanted = set(SWEEPABLE_MAY_CHANGE) | (command_swept or set())
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1
            if k not in MAY_CHANGE or k in wanted]  # fmt: skip


def fill_from_configs(jobs: list[Job], keys: list[str]) -> None:
    """A swept key that some jobs were not given (added when a finished sweep was relaunched:
    optim.lr=0.1 beside jobs run at the default) shows, for those, the value their run had (their
    .hydra/config.yaml), not a blank."""
    for job in jobs:
        missing = [k for k in keys if k not in job.overrides]
        record = job.path / ".hydra" / "config.yaml"
        if not missing or not record.is_file():
            continue
        try:
            config = yaml.safe_load(record.read_text())
        except yaml.YAMLError:
            continue
        flat = flatten(config) if isinstance(config, dict) else {}
        for key in missing:
            key_of = key if key in flat else f"{key}.name"  # (a group: model=resnet20)
            if key_of in flat:
                value = flat[key_of]
                job.overrides[key] = ("null" if value is None else str(value).lower()
                                      if isinstance(value, bool) else str(value))  # fmt: skip


def _command(sweep: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The sweep's command-line overrides and its sweeper's params, from the multirun.yaml
    Hydra writes into the sweep's folder (of its latest launch); none where there is none."""
    path = sweep / "multirun.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
        hydra = saved["hydra"] if saved else {}
        overrides = hydra["overrides"]["task"] if hydra else []
        params = (hydra.get("sweeper") or {}).get("params") if hydra else None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        return [], None
    return [str(o) for o in overrides or []], params if isinstance(params, dict) else None


def command_swept_keys(sweep: Path) -> set[str]:
    """The keys the sweep's command line swept (key=a,b, key=range(...))."""
    return swept_in(_command(sweep)[0])


# A grid of more jobs than this is not spelt out to find the ones that never started.
MAX_GRID = 10_000


def unstarted_jobs(sweep: Path, jobs: list[Job]) -> list[Job]:
    """The jobs of the sweep's grid (its latest launch's key=a,b overrides and sweeper params)
    that have no folder: an interrupted sweep's jobs that never started. None for an Optuna
    search (no grid), a glob() or where the grid cannot be read."""
    import itertools
    import math

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, params = _command(sweep)
    given = {override_key(o) for o in overrides}  # (the command line wins over the params)
    lines = overrides + [f"{k}={v}" for k, v in (params or {}).items() if k not in given]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception:  # (not a grid Hydra reads)
        return []
    axes = []
    for o in parsed:
        if o.is_hydra_override() or not o.is_sweep_override():
            continue
        if (values := sweep_values(o)) is None:  # interval() (a search space), glob()
            return []
        axes.append([(override_key(o.input_line or ""), v) for v in values])
    if not axes or math.prod(len(axis) for axis in axes) > MAX_GRID:
        return []
    missing = []
    for combination in itertools.product(*axes):
        if not any(all(_same_value(j.overrides.get(k), v) for k, v in combination) for j in jobs):
            missing.append(Job(sweep, dict(combination), None, started=False))
    return missing


def _same_value(given: str | None, value: str) -> bool:
    if given is None:
        return False
    if given == value:
        return True
    try:
        return float(given) == float(value)
    except ValueError:
        return False


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
        known = acc is not None and not math.isnan(acc)  # (nan: last, as none)
        return (not known, -acc if known else 0.0, [_sort_key(v) for v in g.values.values()])

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
            f"{len(g.finished())}/{len(g.jobs)}" + _unfinished(g.jobs),
            _pm(*g.stat("valid", "acc")),
            _pm(*g.stat("valid", "loss")),
            _pm(*g.stat("test", "acc")),
            _pm(*_images_per_s(g)),
        ])  # fmt: skip
    return header, rows


def _unfinished(jobs: list[Job]) -> str:
    """Why jobs have no figures: " (1 failed, 1 unfinished, 2 not started)", or nothing."""
    counts = {
        "failed": sum(j.failure is not None for j in jobs),
        "unfinished": sum(j.started and j.metrics is None and j.failure is None for j in jobs),
        "not started": sum(not j.started for j in jobs),
    }
    parts = [f"{n} {what}" for what, n in counts.items() if n]
    return f" ({', '.join(parts)})" if parts else ""


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
        w.writerow(["job", *keys, "finished", *(f"{s}_{n}" for s, n in figures), "images_per_s",
                    "failure"])  # fmt: skip
        for job in jobs:
            w.writerow([
                job.path.name if job.started else "", *(job.overrides.get(k, "") for k in keys),
                job.metrics is not None,
                *("" if (v := job.figure(s, n)) is None else v for s, n in figures),
                (job.metrics or {}).get("images_per_s", ""),
                job.failure or ("" if job.started else "never started"),
            ])  # fmt: skip


# Panels per row of report.png: the figure wraps into rows, so it stays readable for any number of
# swept keys.
PANELS_PER_ROW = 3


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(out: Path, jobs: list[Job], keys: list[str], title: str) -> Path | None:
    """Validation accuracy of every finished job (dots) and each value's mean (bars) against each
    swept key's values, one panel per key, PANELS_PER_ROW panels a row. Numeric keys get a
    numeric axis (logarithmic where the values span a factor of 10 or more, as learning rates
    do); others one tick per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in keys if k != SEED] or keys
    done = [j for j in jobs if j.figure("valid", "acc") is not None]
    if not done or not shown:
        return None
    cols = min(PANELS_PER_ROW, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, shown, strict=False):
        values = sorted({j.overrides.get(key, "") for j in done}, key=_sort_key)
        numbers = _numbers(values)
        if numbers is not None and len(values) > 1:
            log = min(numbers) > 0 and max(numbers) / min(numbers) >= 10
            positions = numbers
            width = 0.0
        else:
            log, positions, width = False, list(range(len(values))), 0.2
        for x, value in zip(positions, values, strict=True):
            accs = [j.figure("valid", "acc") for j in done if j.overrides.get(key, "") == value]
            ax.scatter([x] * len(accs), accs, color="tab:blue", alpha=0.6, s=22)
            if width:
                ax.plot([x - width, x + width], [statistics.fmean(accs)] * 2, color="tab:red")
        if log:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            # Labels at the powers of ten only: under a decade, the minor ticks' labels
            # (4x10^-2, 6x10^-2, ...) ran into each other.
            ax.xaxis.set_minor_formatter(NullFormatter())
        if width:
            labels = [v if len(v) <= 14 else v[:13] + "…" for v in values]
            ax.set_xticks(positions, labels, rotation=30 if len(values) > 4 else 0, ha="right"
                          if len(values) > 4 else "center")  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _same(override: str | None, param: Any) -> bool:
    if override is None:
        return False
    if isinstance(param, float):
        try:
            return float(override) == param
        except ValueError:
            return False
    return override == str(param)


def _holds(job: Job, params: dict[str, Any]) -> bool:
    return bool(params) and all(_same(job.overrides.get(k), v) for k, v in params.items())


def trial_rows(
    trials: list[Trial], jobs: list[Job], exact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """One row per Optuna trial: finished ones by their value (the validation accuracy, best
    first), then the failed, killed and waiting ones by number. A trial's job is the folder
    whose overrides hold its parameters (a killed trial and its re-run share one)."""
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.params if k not in keys]
    done = sorted((t for t in trials if t.state == "COMPLETE" and t.value is not None),
                  key=lambda t: (math.isnan(t.value), -t.value))  # fmt: skip
    rest = sorted((t for t in trials if t not in done), key=lambda t: t.number)
    header = ["trial", "state", *keys, "valid acc %", "test acc %", "job"]
    rows = []

    def state(t: Trial) -> str:
        rerun = next((r for r in trials if r.number > t.number and r.params == t.params), None)
        return f"killed, rerun as {rerun.number}" if t.state == "FAIL" and rerun else t.state

    for t in done + rest:
        job = next((j for j in jobs if _holds(j, t.params)), None)
        test = job.figure("test", "acc") if job else None
        rows.append([
            str(t.number), state(t),
            *(_exact(t.params.get(k)) if exact else _short(t.params.get(k)) for k in keys),
            "-" if t.value is None else f"{t.value:.2f}",
            "-" if test is None or t.state != "COMPLETE" else f"{test:.2f}",
            job.path.name if job else "-",
        ])  # fmt: skip
    return header, rows


def _exact(value: Any) -> str:
    return "-" if value is None else repr(value) if isinstance(value, float) else str(value)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report(sweep: Path, out: Path | None = None) -> str:
    """Read the sweep, write report.csv, jobs.csv and report.png into `out` (the sweep folder
    by default) and return the printed table. An Optuna search (its optuna.db in the sweep)
    is shown as its trials, one row each, also written as trials.csv."""
    jobs = read_sweep(sweep)
    keys = swept_keys(jobs, command_swept_keys(sweep))
    fill_from_configs(jobs, keys)
    trials = read_trials(sweep)
    if trials is None:
        unstarted = unstarted_jobs(sweep, jobs)
        for job in unstarted:
            keys += [k for k in job.overrides if k not in keys]
        jobs += unstarted
    groups = group_jobs(jobs, keys)
    out = out or sweep
    out.mkdir(parents=True, exist_ok=True)
    if trials is not None:
        header, rows = trial_rows(trials, jobs)
        with open(out / "trials.csv", "w", newline="") as f:  # (the parameters as drawn)
            csv.writer(f).writerows([header, *trial_rows(trials, jobs, exact=True)[1]])
        finished = sum(t.state == "COMPLETE" for t in trials)
        heading = [
            f"{sweep}: Optuna study of {len(trials)} trials ({finished} finished), "
            f"{len(jobs)} job folders",
            "sorted by validation accuracy (the value the study maximises)",
        ]
        written = [out / "trials.csv"]
    else:
        header, rows = table_rows(groups, keys)
        finished = sum(j.metrics is not None for j in jobs)
        unstarted = sum(not j.started for j in jobs)
        swept = ", ".join(keys) if keys else "nothing (every job has the same overrides)"
        heading = [
            f"{sweep}: {len(jobs)} jobs ({finished} finished"
            + (f", {unstarted} never started" if unstarted else "")
            + f"), swept: {swept}",
            "sorted by validation accuracy; mean ± sample std over seeds",
        ]
        written = []
    write_csvs(out, groups, jobs, keys)
    png = plot(out, jobs, keys, sweep.name)
    written += [out / "report.csv", out / "jobs.csv"]
    lines = [
        *heading,
        "",
        format_table(header, rows),
        "",
        f"wrote {', '.join(str(p) for p in written)}"
        + (
            f", {png}"
            if png
            else " (no plot: "
            + ("no key is swept)" if not keys else "no job has a validation accuracy)")
        ),
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
        sys.stdout.flush()
    except BrokenPipeError:  # (| head): the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (ReportError, OSError, json.JSONDecodeError, yaml.YAMLError, ImportError) as e:
        print(f"resnet-train-report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
