"""resnet-train-report: a sweep's jobs as one table, seeds grouped, CSV and PNG written; and each
run's hyperparameters in TensorBoard's HParams view."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from resnet_train.report import report
from tests.conftest import SMOKE, compose_config, run_cli, run_program

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(sweep: Path, name: str, overrides: list[str], valid: float | None, test: float):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if valid is not None:
        metrics = {
            "valid": {"acc": valid, "loss": 1 - valid / 100},
            "test": {"acc": test, "loss": 1 - test / 100},
            "images_per_s": 500.0,
        }
        (job / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    accs = {("resnet20", 0): 50.0, ("resnet20", 1): 52.0, ("resnet32", 0): 55.0,
            ("resnet32", 1): 58.0, ("resnet44", 0): 40.0}  # fmt: skip
    for (model, seed), acc in accs.items():
        overrides = [f"model={model}", f"seed={seed}", "data.root=/data", "trainer.epochs=1"]
        make_job(sweep, f"model-{model}+seed-{seed}", overrides, acc, acc - 1)
    make_job(sweep, "model-resnet56+seed-0", ["model=resnet56", "seed=0", "data.root=/data",
                                              "trainer.epochs=1"], None, 0)  # fmt: skip
    (sweep / "multirun.yaml").write_text("{}")  # Hydra's own record, not a job
    return sweep


def test_report_groups_seeds_sorts_by_validation_and_writes_csv_and_png(sweep):
    text = report(sweep)
    assert "6 jobs (5 finished), swept: model, seed" in text
    table = [line for line in text.splitlines() if line.startswith("resnet")]
    assert [line.split()[0] for line in table] == ["resnet32", "resnet20", "resnet44", "resnet56"]
    std32 = statistics.stdev([55.0, 58.0])
    assert f"56.50 ± {std32:.2f}" in table[0] and "0,1" in table[0] and "2/2" in table[0]
    assert "40.00" in table[2] and "±" not in table[2].split("40.00")[1].split()[0]
    assert table[3].split()[2:6] == ["0/1", "(1", "unfinished)", "-"]  # listed, not ranked

    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["resnet32", "resnet20", "resnet44", "resnet56"]
    assert float(rows[0]["valid_acc_mean"]) == pytest.approx(56.5)
    assert float(rows[0]["valid_acc_std"]) == pytest.approx(std32)
    assert float(rows[1]["test_acc_mean"]) == pytest.approx(50.0)
    assert rows[0]["seeds"] == "0 1" and rows[3]["valid_acc_mean"] == ""
    with open(sweep / "jobs.csv") as f:
        jobs = list(csv.DictReader(f))
    assert len(jobs) == 6 and {j["finished"] for j in jobs} == {"True", "False"}
    png = (sweep / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_a_key_added_to_a_finished_sweep_shows_the_old_jobs_own_value(tmp_path):
    """optim.lr=0.2 given when two finished jobs were relaunched beside them: those two show the
    rate their runs had (their .hydra/config.yaml), not a blank."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        make_job(sweep, f"old-{seed}", ["experiment=smoke", f"seed={seed}"], 50.0 + seed, 49.0)
        (sweep / f"old-{seed}" / ".hydra" / "config.yaml").write_text(
            yaml.safe_dump({"optim": {"lr": 0.05}, "model": {"name": "resnet20"}, "seed": seed})
        )
        make_job(sweep, f"new-{seed}", ["experiment=smoke", f"seed={seed}", "optim.lr=0.2"],
                 40.0 + seed, 39.0)  # fmt: skip
    text = report(sweep)
    assert "4 jobs (4 finished), swept: seed, optim.lr" in text
    table = [line.split() for line in text.splitlines() if line[:4] in ("0.05", "0.2 ")]
    assert [(row[0], row[1]) for row in table] == [("0.05", "0,1"), ("0.2", "0,1")]


def test_the_jobs_an_interrupted_sweep_never_started_are_listed(tmp_path):
    """Of model=resnet20,resnet32 x seed=0,1,2 three jobs ran (one unfinished) before the sweep
    was stopped: the other three are in the table as not started, not left out."""
    sweep = tmp_path / "sweep"
    make_job(sweep, "a", ["model=resnet20", "seed=0", "trainer.epochs=1"], 50.0, 49.0)
    make_job(sweep, "b", ["model=resnet20", "seed=1", "trainer.epochs=1"], 52.0, 51.0)
    make_job(sweep, "c", ["model=resnet20", "seed=2", "trainer.epochs=1"], None, 0)
    record = {"hydra": {"overrides": {"task": ["model=resnet32,resnet20", "seed=range(0,3)",
                                               "trainer.epochs=1"]},
                        "sweeper": {"params": None}}}  # fmt: skip
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))
    text = report(sweep)
    assert "6 jobs (2 finished, 3 never started), swept: seed, model" in text
    with open(sweep / "jobs.csv") as f:
        assert next(csv.reader(f))[:3] == ["job", "seed", "model"]  # each key once
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("resnet")}
    assert "2/3 (1 unfinished)" in rows["resnet20"] and "0/3 (3 not started)" in rows["resnet32"]
    with open(sweep / "jobs.csv") as f:
        jobs = list(csv.DictReader(f))
    never = [(j["model"], j["seed"]) for j in jobs if j["failure"] == "never started"]
    assert sorted(never) == [("resnet32", "0"), ("resnet32", "1"), ("resnet32", "2")]
    # a key both in the sweeper's params and on the command line: the command line's values
    # a sweep stopped in its first job: the keys of the jobs that never started, once each
    first = tmp_path / "first"
    make_job(first, "a", ["seed=0"], None, 0)
    (first / "multirun.yaml").write_text(
        yaml.safe_dump(
            {"hydra": {"overrides": {"task": ["seed=0,1,2"]}, "sweeper": {"params": None}}}
        )
    )
    assert "3 jobs (0 finished, 2 never started), swept: seed\n" in report(first)
    record["hydra"]["sweeper"]["params"] = {"seed": "5,6"}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))
    assert "6 jobs (2 finished, 3 never started), swept: seed, model" in report(sweep)
    # an Optuna search's space is no grid: nothing is made up
    record["hydra"]["sweeper"]["params"] = {"optim.lr": "interval(0.01, 0.1)"}
    record["hydra"]["overrides"]["task"] = ["trainer.epochs=1"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(record))
    assert "3 jobs (2 finished), swept: seed" in report(sweep)


def test_report_command_says_what_is_wrong_in_one_line(tmp_path):
    nosub = tmp_path / "nosub"  # a sweep run with hydra.output_subdir=null: no overrides kept
    (nosub / "job").mkdir(parents=True)
    (nosub / "job" / "metrics.json").write_text("{}")
    for target, message in ((tmp_path / "nope", "is not a folder"),
                            (tmp_path / "nosub", "holds runs but no record of their overrides "
                             "(.hydra/overrides.yaml): a sweep run with hydra.output_subdir=null"),
                            (tmp_path, "holds no job folders")):  # fmt: skip
        result = run_program("resnet_train.report", str(target))
        assert result.returncode == 2
        assert result.stderr.startswith("resnet-train-report: error: ")
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_each_run_logs_its_hyperparameters_and_final_figures_for_the_hparams_view(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from resnet_train.engine.trainer import fit

    def read() -> tuple[list, list]:
        """The HParams sessions and the hparam/valid_acc values of the run's event files."""
        sessions, valid = [], []
        for events in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"):
            acc = EventAccumulator(str(events))
            acc.Reload()
            try:
                content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
                sessions.append(plugin_data_pb2.HParamsPluginData.FromString(content))
            except KeyError:  # the scalar event file
                pass
            if "hparam/valid_acc" in acc.Tags()["scalars"]:
                valid += [e.value for e in acc.Scalars("hparam/valid_acc")]
        return sessions, valid

    common = (*SMOKE, "data.train_size=64", "optim.lr=0.05", "trainer.early_stopping.patience=4")
    fit(compose_config(*common), tmp_path)
    sessions, valid = read()
    hp = sessions[0].session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(0.05)
    assert hp["model.name"].string_value == "resnet20"
    # a key that may change on resume and that a sweep may vary: recorded (it was left out)
    assert hp["trainer.early_stopping.patience"].number_value == 4
    assert "data.root" not in hp  # where the data is, not how the run trains
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert valid == [pytest.approx(metrics["valid"]["acc"])]
    # A finished run continued (longer): its one session and figures replace the earlier ones
    # (the view had two sessions, and hparam/* two values at step 0).
    fit(compose_config(*common, "trainer.epochs=2", "resume=auto"), tmp_path)
    sessions, valid = read()
    assert (
        len(sessions) == 1
        and sessions[0].session_start_info.hparams["trainer.epochs"].number_value == 2
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert valid == [pytest.approx(metrics["valid"]["acc"])]


@pytest.mark.slow
def test_report_of_a_real_multirun(tmp_path):
    result = run_cli("-m", *SMOKE, "data.train_size=128", "model=resnet20,plain20", "seed=0,1",
                     "name=sw", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "outputs" / "multirun" / "sw"
    out = run_program("resnet_train.report", str(sweep), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "4 jobs (4 finished), swept: model, seed" in out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if "/2" in line]
    assert sorted(rows) == ["plain20", "resnet20"]
    assert (sweep / "report.png").read_bytes().startswith(PNG_MAGIC)


def test_a_sweep_over_the_runs_length_gives_each_job_a_folder_and_a_relaunch_finds_them(
    tmp_path,
):
    """trainer.epochs may change on resume, so it does not name a run; swept, it names the
    sweep's jobs (they used to share one folder: the second job was refused)."""
    sweep = ["-m", *SMOKE, "data.train_size=64", "data.test_size=32", "trainer.epochs=1,2",
             "name=length"]  # fmt: skip
    result = run_cli(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "outputs" / "multirun" / "length"
    done = sorted(json.loads(m.read_text())["epochs_done"] for m in folder.glob("*/metrics.json"))
    assert done == [1, 2]
    out = run_program("resnet_train.report", str(folder), cwd=tmp_path)
    assert "2 jobs (2 finished), swept: trainer.epochs" in out.stdout, out.stdout
    again = run_cli(*sweep, "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished; nothing to do") == 2, again.stdout
    # a sweep folder of one's own (hydra.sweep.dir): the same
    mine = [*sweep[:-1], "hydra.sweep.dir=mine"]
    assert run_cli(*mine, cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "mine").glob("*/metrics.json"))) == 2


def test_a_sweep_over_a_key_that_may_change_on_resume_keeps_its_jobs_apart(tmp_path):
    """data.num_workers may change on resume (it does not name a run): swept, its jobs shared
    one folder, the second found the first finished, and the report said "swept: nothing"."""
    sweep = ["-m", *SMOKE, "data.train_size=64", "data.test_size=32", "data.num_workers=0,1",
             "name=nw"]  # fmt: skip
    result = run_cli(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "outputs" / "multirun" / "nw"
    assert len(list(folder.glob("*/metrics.json"))) == 2
    out = run_program("resnet_train.report", str(folder), cwd=tmp_path)
    assert "2 jobs (2 finished), swept: data.num_workers" in out.stdout, out.stdout
    # a damaged metrics.json: that job is listed as failed, saying why; the others are reported
    (next(folder.glob("*/metrics.json"))).write_text('{"test": ')
    out = run_program("resnet_train.report", str(folder), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 jobs (1 finished), swept: data.num_workers" in out.stdout, out.stdout
    with open(folder / "jobs.csv") as f:
        jobs = list(csv.DictReader(f))
    assert sum("its metrics.json is not readable JSON (" in j["failure"] for j in jobs) == 1, jobs


def test_a_diverged_job_shows_its_nan_and_a_foreign_metrics_file_is_a_failed_job(tmp_path):
    """A job whose test loss was nan (the trainer writes it, warning) made the report crash in
    statistics.stdev; a metrics.json that holds a list made it crash in .get."""
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        make_job(sweep, f"seed-{seed}", [f"seed={seed}", "optim.lr=0.1"], 50.0 + seed, 49.0)
        make_job(sweep, f"lr-{seed}", [f"seed={seed}", "optim.lr=9"], 10.0, 10.0)
    bad = json.loads((sweep / "lr-1" / "metrics.json").read_text())
    bad["test"]["loss"] = float("nan")
    bad["valid"]["loss"] = float("inf")
    (sweep / "lr-1" / "metrics.json").write_text(json.dumps(bad))
    make_job(sweep, "lr-2", ["seed=2", "optim.lr=9"], None, 0)
    (sweep / "lr-2" / "metrics.json").write_text("[]")
    make_job(sweep, "lr-3", ["seed=3", "optim.lr=9"], None, 0)
    (sweep / "lr-3" / "metrics.json").write_text("null")
    make_job(sweep, "diverged", ["seed=0", "optim.lr=5"], 1.0, 1.0)  # (listed first on disk)
    nan = json.loads((sweep / "diverged" / "metrics.json").read_text())
    nan["valid"]["acc"] = float("nan")
    (sweep / "diverged" / "metrics.json").write_text(json.dumps(nan))
    text = report(sweep)
    assert "7 jobs (5 finished), swept: seed, optim.lr" in text, text
    rows = [line for line in text.splitlines() if line[:2] in ("0.", "9 ", "5 ")]
    assert [r.split()[0] for r in rows] == ["0.1", "9", "5"], text  # nan last, not first
    assert "10.00 ± 0.00" in rows[1] and "(2 failed)" in rows[1], rows[1]
    with open(sweep / "report.csv") as f:
        rows = {r["optim.lr"]: r for r in csv.DictReader(f)}
    assert rows["9"]["test_loss_mean"] == "nan" and rows["9"]["test_loss_std"] == ""
    with open(sweep / "jobs.csv") as f:
        jobs = {j["job"]: j for j in csv.DictReader(f)}
    assert jobs["lr-2"]["failure"] == "its metrics.json does not hold a JSON object"
    assert jobs["lr-3"]["failure"] == "its metrics.json does not hold a JSON object"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_png_stays_readable_for_many_swept_keys(tmp_path):
    sweep = tmp_path / "sweep"
    keys = ["optim.lr", "optim.weight_decay", "seed", "model", "trainer.label_smoothing",
            "data.batch_size", "optim.momentum"]  # fmt: skip
    for i in range(8):
        values = [f"{0.01 * 2**i}", f"{1e-5 * 3**i}", str(i % 2), f"resnet{20 + 12 * (i % 3)}",
                  f"{0.02 * i}", str(32 * (1 + i % 2)), f"0.{9 - i % 2}"]  # fmt: skip
        overrides = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        # the resume-only keys differ between jobs (one was resumed, on another machine)
        overrides += ["resume=auto"] * (i % 2) + [f"data.root=/data{i % 2}"]
        make_job(sweep, f"job{i}", overrides, 50.0 + i, 49.0)
    text = report(sweep)
    swept = text.splitlines()[0].split("swept: ")[1].split(", ")
    assert swept == keys  # not resume, not data.root
    width, height = _png_size(sweep / "report.png")
    # 6 panels (seed is grouped, not plotted): 3 a row, 2 rows
    assert width <= 1500 and 600 <= height <= 800, (width, height)


@pytest.mark.slow
def test_an_optuna_search_killed_and_relaunched_finishes_its_trials_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    search = ["-m", "experiment=cifar10_cpu", "data=synthetic", "data.train_size=96",
              "data.test_size=32", "data.batch_size=32", "trainer.epochs=2", "name=search",
              "hydra/sweeper=optuna_cpu", "hydra.sweeper.n_trials=3"]  # fmt: skip
    sweep = tmp_path / "outputs" / "multirun" / "search"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "resnet_train", *search], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        # Kill it in its second trial, after that trial's first epoch is saved.
        deadline = time.monotonic() + 240
        while True:
            jobs = [p for p in sweep.glob("*/") if (p / ".hydra").is_dir()]
            if len(jobs) == 2 and any((j / "last.pt").exists() and not (j / "metrics.json").exists()
                                      for j in jobs):  # fmt: skip
                break
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "first.log"
            ).read_text()
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    again = run_cli(*search, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "1 trials finished, 1 killed run again first, 2 to run" in again.stdout
    assert "setup plugin" not in again.stdout + (tmp_path / "first.log").read_text()  # alembic's

    storage = f"sqlite:///{sweep / 'optuna.db'}"
    trials = optuna.load_study(study_name="resnet-train", storage=storage).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(done) == 3 and len(failed) == 1 and len(trials) == 4
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == 3  # no trial run twice
    rerun = next(t for t in done if t.params == failed[0].params)
    jobs = [p for p in sweep.iterdir() if (p / "metrics.json").is_file()]
    assert len(jobs) == 3
    assert again.stdout.count("resumed from") == 1  # the killed trial continued its checkpoint

    text = report(sweep)
    assert "Optuna study of 4 trials (3 finished), 3 job folders" in text
    rows = [line for line in text.splitlines() if line[:1].isdigit()]
    assert [r.split()[1] for r in rows[:3]] == ["COMPLETE"] * 3
    assert f"killed, rerun as {rerun.number}" in rows[3]
    values = [float(r.split()[5]) for r in rows[:3]]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(max(t.value for t in done), abs=0.01)
    assert (sweep / "trials.csv").is_file() and _png_size(sweep / "report.png")[0] > 0
    # trials.csv holds each trial's parameters as drawn (4 digits: not the trial to rerun)
    with open(sweep / "trials.csv") as f:
        written = {int(r["trial"]): r for r in csv.DictReader(f)}
    for t in trials:
        for key, value in t.params.items():
            assert float(written[t.number][key]) == value


def test_an_optuna_search_records_a_diverging_trial_as_failed_and_goes_on(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    search = ["-m", *SMOKE, "data.train_size=64", "name=div", "hydra/sweeper=optuna_cpu",
              "hydra.sweeper.n_trials=2", "optim.lr=choice(1e30,1e31)"]  # fmt: skip
    result = run_cli(*search, cwd=tmp_path)
    assert result.returncode == 2
    assert "resnet-train: error: 2 job(s) of the sweep failed" in result.stderr
    assert "Traceback" not in result.stderr
    storage = f"sqlite:///{tmp_path / 'outputs' / 'multirun' / 'div' / 'optuna.db'}"
    trials = optuna.load_study(study_name="resnet-train", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]  # not left RUNNING
    # Their outcome is known: relaunched, the search has nothing left to run.
    again = run_cli(*search, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 trials finished, 0 killed run again first, 0 to run" in again.stdout
    assert ("nothing to run: study resnet-train has its 2 trials (2 of them failed: a relaunch "
            "does not run them again); hydra.sweeper.n_trials=4 runs 2 more in it, or a new "
            "name= starts a new search") in again.stdout + again.stderr  # fmt: skip
    assert len(optuna.load_study(study_name="resnet-train", storage=storage).get_trials()) == 2


def test_an_optuna_search_without_the_optuna_extra_is_one_line(monkeypatch, capsys):
    import importlib.util

    from resnet_train import cli

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "hydra_plugins.hydra_optuna_sweeper" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(sys, "argv", ["resnet-train", "-m", "hydra/sweeper=optuna_cpu"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "resnet-train: error: hydra/sweeper=optuna_cpu needs Hydra's Optuna sweeper, which is not "
        'installed: pip install "resnet-train[optuna]" (or -e ".[optuna]" in a checkout)\n'
    )
