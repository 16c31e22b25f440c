"""resnet-train-report: a sweep's jobs as one table, seeds grouped, CSV and PNG written; and each
run's hyperparameters in TensorBoard's HParams view."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_train.report import report
from tests.conftest import SMOKE, compose_config, run_cli

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
    assert table[3].split()[2:4] == ["0/1", "-"]  # unfinished: listed, not ranked

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


def test_report_command_says_what_is_wrong_in_one_line(tmp_path):
    for target, message in ((tmp_path / "nope", "is not a folder"),
                            (tmp_path, "holds no job folders")):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-m", "resnet_train.report", str(target)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2
        assert result.stderr.startswith("resnet-train-report: error: ")
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_each_run_logs_its_hyperparameters_and_final_figures_for_the_hparams_view(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_train.engine.trainer import fit

    fit(compose_config(*SMOKE, "optim.lr=0.05"), tmp_path)
    plugin_data = {}
    for events in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            plugin_data.update(acc.PluginTagToContent("hparams"))
        except KeyError:  # the scalar event file
            pass
        if "hparam/valid_acc" in acc.Tags()["scalars"]:
            valid = acc.Scalars("hparam/valid_acc")[0].value
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.HParamsPluginData.FromString(plugin_data["_hparams_/session_start_info"])
    hp = info.session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(0.05)
    assert hp["model.name"].string_value == "resnet20"
    assert "data.root" not in hp  # where the data is, not how the run trains
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert valid == pytest.approx(metrics["valid"]["acc"])


@pytest.mark.slow
def test_report_of_a_real_multirun(tmp_path):
    result = run_cli("-m", *SMOKE, "data.train_size=128", "model=resnet20,plain20", "seed=0,1",
                     "name=sw", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "outputs" / "multirun" / "sw"
    out = subprocess.run(
        [sys.executable, "-m", "resnet_train.report", str(sweep)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "4 jobs (4 finished), swept: model, seed" in out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if "/2" in line]
    assert sorted(rows) == ["plain20", "resnet20"]
    assert (sweep / "report.png").read_bytes().startswith(PNG_MAGIC)
