"""Training runs end to end: the CLI, checkpoints, TensorBoard, metrics, resume, sweeps."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_train import create_model
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.trainer import fit
from tests.conftest import (
    REPO,
    SHARED_DATA,
    SMOKE,
    compose_config,
    run_cli,
    run_dir_name,
    run_program,
)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_trains_one_epoch_and_leaves_checkpoints_logs_and_metrics(tmp_path):
    result = run_cli(*SMOKE, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert "epoch 1/1  train loss" in result.stdout and "test loss" in result.stdout

    for name in ("last.pt", "best.pt"):
        state = torch.load(run / name, weights_only=True)
        assert state["epoch"] == 1 and state["config"]["model"]["name"] == "resnet20"
        assert {"optimizer", "scheduler", "global_step"} <= set(state)
        create_model("resnet20", num_classes=10).load_state_dict(state["model"])

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["selected_checkpoint"] == "best.pt"
    for split in ("train", "valid", "test"):
        # One epoch of 15 steps: BatchNorm's running statistics have not settled, so the
        # eval-mode losses can still be large; test_loss_falls_... checks learning.
        assert math.isfinite(metrics[split]["loss"]) and metrics[split]["loss"] > 0
        assert 0 <= metrics[split]["acc"] <= 100
    assert metrics["train"]["loss"] < 3.0  # below a random guess's ln(10) = 2.30 plus slack
    assert metrics["images_per_s"] > 0 and metrics["wall_time_s"] > 0

    tags = scalars(run)
    for tag in (
        "train/loss",
        "train/acc",
        "valid/loss",
        "valid/acc",
        "lr",
        "train/epoch_time_s",
        "train/images_per_s",
        "test/acc",
    ):
        assert tag in tags and len(tags[tag]) >= 1, tag
    assert tags["lr"][0] == (1, pytest.approx(0.1))  # logged at every optimizer step
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    assert "epoch 1/1" in (run / "train.log").read_text()


def test_console_script_and_progress_bar(tmp_path):
    script = Path(sys.executable).parent / "resnet-train"
    assert script.is_file()
    import subprocess

    result = subprocess.run(
        [str(script), *SMOKE, "data.train_size=64", "trainer.progress=true", "hydra.run.dir=run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # The tqdm bar: images/s as its rate, loss and accuracy as its postfix.
    assert "epoch 1/1 train" in result.stderr and "img/s" in result.stderr
    assert "loss=" in result.stderr and "acc=" in result.stderr
    # The command ends without the interpreter's teardown: everything is written and closed
    # first (the log's last line, TensorBoard's events, metrics.json, curves.png).
    run = tmp_path / "run"
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith("(mean per-class recall over 10 classes)")
    assert (run / "train.log").read_text().strip().splitlines()[-1] == last
    assert len(scalars(run)["train/loss"]) == 1 and json.loads((run / "metrics.json").read_text())
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    bad = subprocess.run([str(script), "optim.lr=-1"], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr == (
        "resnet-train: error: optim.lr=-1.0 is invalid: must be > 0\n"
    )


def test_no_progress_bar_when_not_on_a_terminal(tmp_path):
    result = run_cli(*SMOKE, "data.train_size=64", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "it/s" not in result.stderr and "\r" not in result.stderr


def epoch_lrs(run_dir: Path, epochs: int) -> list[float]:
    """The learning rate of each epoch, from the per-step TensorBoard points."""
    lrs = [value for _, value in scalars(run_dir)["lr"]]
    per_epoch = len(lrs) // epochs
    assert lrs == [lrs[i - i % per_epoch] for i in range(len(lrs))]  # constant within an epoch
    return lrs[::per_epoch]


def test_step_schedule_sets_the_learning_rate_of_each_epoch(tmp_path):
    cfg = compose_config(*SMOKE, "data.train_size=64", "trainer.epochs=5", "schedule=step",
                         "schedule.step_size=2", "schedule.gamma=0.1", "optim.lr=0.2")  # fmt: skip
    fit(cfg, tmp_path)
    assert epoch_lrs(tmp_path, 5) == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002])


def test_cosine_schedule_anneals_to_min_lr(tmp_path):
    cfg = compose_config(*SMOKE, "data.train_size=64", "trainer.epochs=4", "schedule=cosine",
                         "schedule.min_lr=0.01", "optim.lr=0.1")  # fmt: skip
    fit(cfg, tmp_path)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert epoch_lrs(tmp_path, 4) == pytest.approx(expected)


def test_no_validation_set_keeps_the_last_checkpoint(tmp_path):
    result = run_cli(*SMOKE, "data.valid_ratio=0", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no validation set (data.valid_ratio=0.0)" in result.stdout
    run = tmp_path / "run"
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected_checkpoint"] == "last.pt" and metrics["valid"] is None
    assert "valid/acc" not in scalars(run)


def test_resume_continues_model_optimizer_schedule_and_epoch(tmp_path):
    common = [
        *SMOKE,
        "data.train_size=64",
        "schedule=step",
        "schedule.step_size=1",
        "schedule.gamma=0.5",
    ]
    first = fit(compose_config(*common, "trainer.epochs=2"), tmp_path / "a")
    assert first["epochs_run"] == 2
    resume = tmp_path / "a" / "last.pt"
    second = fit(compose_config(*common, "trainer.epochs=3", f"resume={resume}"), tmp_path / "b")
    assert second["epochs_run"] == 1 and second["epochs_total"] == 3
    before, after = (
        torch.load(resume, weights_only=True),
        torch.load(tmp_path / "b" / "last.pt", weights_only=True),
    )
    assert after["epoch"] == 3
    assert after["global_step"] == before["global_step"] * 3 // 2
    assert after["scheduler"]["last_epoch"] == 3
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # TensorBoard steps go on from where the first run stopped.
    lr_points = scalars(tmp_path / "b")["lr"]
    assert lr_points[0][0] == before["global_step"] + 1
    assert [value for _, value in lr_points] == pytest.approx([0.1 * 0.5**2] * len(lr_points))
    # The best checkpoint of the first run came along, so the test set used a real best.pt.
    assert (tmp_path / "b" / "best.pt").is_file()


def test_resume_from_a_bad_file_or_another_model_fails_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli(*SMOKE, f"resume={bad}", "hydra.run.dir=run1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line
        for line in result.stderr.strip().splitlines()
        if line.startswith("resnet-train: error:")
    ]
    assert f"checkpoint {bad} is unreadable" in result.stderr
    assert not (tmp_path / "run1" / "last.pt").exists()

    assert run_cli(*SMOKE, "data.train_size=64", "hydra.run.dir=run2", cwd=tmp_path).returncode == 0
    result = run_cli(
        *SMOKE,
        "model=resnet32",
        "data.train_size=64",
        f"resume={tmp_path / 'run2' / 'last.pt'}",
        "trainer.epochs=2",
        "hydra.run.dir=run3",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "was made with another config: model.name: 'resnet20' -> 'resnet32'." in result.stderr
    assert not (tmp_path / "run3").exists()  # refused before Hydra made the directory


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    assert run_cli(*SMOKE, "data.train_size=64", "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    digest = sha256(tmp_path / "run" / "last.pt")
    result = run_cli(*SMOKE, "data.train_size=64", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    # a finished run: not "continue it with resume=auto", which would do nothing
    assert ("run directory run already holds last.pt, best.pt, metrics.json of a finished run: "
            "start another run with name=NEW_NAME (or train it on: resume=auto with a larger "
            "trainer.epochs)") in result.stderr  # fmt: skip
    assert sha256(tmp_path / "run" / "last.pt") == digest
    (tmp_path / "run" / "metrics.json").unlink()  # as if stopped before its end
    result = run_cli(*SMOKE, "data.train_size=64", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert "already holds last.pt, best.pt: continue it with resume=auto" in result.stderr


def test_multirun_gives_one_directory_per_job(tmp_path):
    sweep = ["-m", *SMOKE, "data.train_size=64", "optim.lr=0.1,0.05"]
    result = run_cli(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # An unnamed sweep gets a directory of its own, and each job one named as its single run's.
    (folder,) = (tmp_path / "outputs" / "multirun").iterdir()
    assert re.fullmatch(r"resnet20-synthetic-[0-9a-f]{8}", folder.name)
    jobs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert sorted(p.name for p in jobs) == sorted(
        run_dir_name(*SMOKE, "data.train_size=64", f"optim.lr={lr}") for lr in (0.1, 0.05)
    )
    lrs = []
    for job in jobs:
        assert (job / "last.pt").is_file() and (job / "metrics.json").is_file()
        lrs.append(OmegaConf.load(job / ".hydra" / "config.yaml").optim.lr)
    assert sorted(lrs) == [0.05, 0.1]
    # Relaunched without resume=: refused before anything is written (each job was refused
    # alone, after Hydra rewrote its .hydra/ record with the new command's settings)
    records = {p: p.read_bytes() for p in folder.rglob("*.yaml")}
    refused = run_cli(*sweep, "trainer.log_every_steps=7", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"resnet-train: error: {Path('outputs/multirun') / folder.name} holds the jobs of an "
        f"earlier sweep (2 with checkpoints or results, e.g. {jobs[0].name}): continue it with "
        "resume=auto (its finished jobs are left as they are), or give the sweep another name="
    ], refused.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*.yaml")} == records
    # The same sweep relaunched finds its own directory (trainer.epochs and resume may change:
    # its jobs continue); another sweep gets another (one used to overwrite the first's
    # multirun.yaml).
    again = run_cli(*sweep, "trainer.epochs=2", "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (tmp_path / "outputs" / "multirun").iterdir()] == [folder.name]
    assert [json.loads((j / "metrics.json").read_text())["epochs_done"] for j in jobs] == [2, 2]
    other = run_cli("-m", *SMOKE, "data.train_size=64", "optim.lr=0.1,0.2", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert len(list((tmp_path / "outputs" / "multirun").iterdir())) == 2


def test_a_failed_sweep_job_does_not_stop_the_others(tmp_path):
    """A job that diverges or has a bad value says so in one line; the sweep goes on to its other
    jobs and exits 2 at its end, naming how many failed."""
    result = run_cli("-m", *SMOKE, "data.train_size=64", "optim.lr=1e30,-1,0.1", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("resnet-train:")]
    assert len(errors) == 3, result.stderr
    assert errors[0].startswith("resnet-train: error: job 0 (") and "optim.lr=1e+30" in errors[0]
    assert "the training loss is" in errors[0] and "the step was not applied" in errors[0]
    assert errors[1].startswith("resnet-train: error: job 1 (") and "optim.lr=-1" in errors[1]
    assert "optim.lr=-1.0 is invalid" in errors[1]
    assert errors[2].startswith("resnet-train: error: 2 job(s) of the sweep failed")
    assert "Traceback" not in result.stderr
    assert "this job failed" not in result.stdout + result.stderr  # (a third copy; the log's)
    (folder,) = (tmp_path / "outputs" / "multirun").iterdir()
    finished = [j for j in folder.iterdir() if (j / "metrics.json").is_file()]
    assert len(finished) == 1 and (finished[0] / "last.pt").is_file()  # the lr 0.1 job ran
    assert OmegaConf.load(finished[0] / ".hydra" / "config.yaml").optim.lr == 0.1
    assert not list(folder.glob("*/last.pt"))[1:]  # the failed jobs saved nothing
    # the sweep's report tells its failed jobs from unfinished ones, and says why they failed
    from resnet_train.report import read_sweep

    jobs = {j.overrides["optim.lr"]: j for j in read_sweep(folder)}
    assert jobs["0.1"].failure is None and jobs["0.1"].metrics is not None
    assert "optim.lr=-1.0 is invalid" in jobs["-1"].failure
    assert "the training loss is" in jobs[next(k for k in jobs if "e" in k)].failure
    report = run_program("resnet_train.report", str(folder), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert report.stdout.count("0/1 (1 failed)") == 2 and "1/1" in report.stdout


def test_default_run_directory_is_under_outputs(tmp_path):
    result = run_cli(*SMOKE, "data.train_size=64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # <model>-<data>-<digest of the training config>; what was given is in .hydra/overrides.yaml
    (run,) = (tmp_path / "outputs").iterdir()
    assert re.fullmatch(r"resnet20-synthetic-[0-9a-f]{8}", run.name)
    assert (run / "metrics.json").is_file() and (run / "last.pt").is_file()
    assert "data.train_size=64" in (run / ".hydra" / "overrides.yaml").read_text()
    assert f"run directory: {run}" in result.stdout
    assert run_cli("name=mine", *SMOKE, "data.train_size=64", cwd=tmp_path).returncode == 0
    assert (tmp_path / "outputs" / "mine" / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="no real CIFAR-10")
def test_real_cifar10_subset_trains(tmp_path):
    result = run_cli(
        "model=resnet20",
        "data=cifar10",
        f"data.root={SHARED_DATA}",
        "data.train_size=2000",
        "data.test_size=1000",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "1800 training / 200 validation / 1000 test images" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["acc"] > 15  # two short epochs; chance is 10%


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path):
    import subprocess

    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("resnet_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resnet_train/configs/train.yaml" in names
    assert "resnet_train/configs/model/resnet50.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r}); import resnet_train; "
        f"assert resnet_train.__file__.startswith({str(site)!r}), resnet_train.__file__; "
        "from resnet_train.cli import main; "
        "sys.argv = ['resnet-train', '--cfg', 'job', 'model=resnet50', 'data=imagenet']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.name == "resnet50" and printed.data.image_size == 224


def test_the_smoke_recipe_visibly_learns(tmp_path):
    """The README's first command: every figure it shows is what the code gives."""
    metrics = fit(compose_config("experiment=smoke"), tmp_path)
    assert metrics["epochs_done"] == 4
    assert metrics["valid"]["acc"] >= 80 and metrics["test"]["acc"] >= 80
    assert metrics["valid"]["loss"] < 0.5 and metrics["test"]["loss"] < 0.5
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"] / 4
    losses = [value for _, value in scalars(tmp_path)["train/loss"]]  # TensorBoard's, per epoch
    assert len(losses) == 4 and losses == sorted(losses, reverse=True)
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as curves:  # the run's picture, without TensorBoard
        assert curves.format == "PNG" and curves.size == (1500, 420)
    readme = (REPO / "README.md").read_text()
    assert f"(`outputs/{run_dir_name('experiment=smoke')}/train.log`;" in readme
    assert f"`outputs/{run_dir_name('model=resnet18', 'data=cifar10')}/`" in readme


def test_a_classifier_wider_than_the_data_trains_with_mixing_and_class_weights(tmp_path):
    """model.num_classes=20 on 10 classes (room for more): MixUp's labels and the class
    weights of data.balance=loss are the classifier's width (they crashed at the first step)."""
    cfg = compose_config(*SMOKE, "data.train_size=64", "data.test_size=32",
                         "model.num_classes=20", "data.augment.mixup_alpha=0.2",
                         "data.balance=loss")  # fmt: skip
    metrics = fit(cfg, tmp_path)
    assert metrics["epochs_done"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["model"]["fc.weight"].shape[0] == 20


def test_without_a_terminal_progress_comes_as_log_lines(tmp_path, caplog, monkeypatch):
    """Every trainer.log_every_steps optimizer steps, or every 60 s, whichever comes first."""
    import logging
    import re

    from resnet_train.engine import trainer

    small = [*SMOKE, "data.train_size=100", "data.test_size=32", "trainer.epochs=2"]
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(compose_config(*small, "trainer.log_every_steps=2"), tmp_path / "a")
    lines = [r.message for r in caplog.records if "train  batch " in r.message]
    # 90 images in batches of 32: 3 steps an epoch, 6 in all; lines at steps 2, 4, 6
    assert [re.match(r"epoch (\d)/2 train  batch (\d)/3", m).groups() for m in lines] == [
        ("1", "2"), ("2", "1"), ("2", "3")
    ]  # fmt: skip
    assert re.fullmatch(r"epoch 1/2 train  batch 2/3  loss \d+\.\d{4} acc \d+\.\d\d%  \d+ img/s  "
                        r"lr 0\.1  epoch left \d+s  run left \d+s", lines[0])  # fmt: skip
    epochs = [r.message for r in caplog.records if r.message.startswith("epoch 1/2  train")]
    assert re.search(r"  ETA \d+s$", epochs[0])
    # 10 validation images: the run says its model selection is coarse
    assert ("the validation split holds 10 images: its accuracy moves in steps of 10 points, too "
            "coarse to choose the best epoch by; raise data.valid_ratio (now 0.1) or give more "
            "images") in caplog.text  # fmt: skip
    assert "the training split has no image of" not in caplog.text  # all 10 classes are in it
    caplog.clear()
    monkeypatch.setattr(trainer, "PROGRESS_LINE_SECONDS", 0.0)  # as if each step took a minute
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(compose_config(*small, "trainer.log_every_steps=100"), tmp_path / "b")
    assert sum("train  batch " in r.message for r in caplog.records) == 6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(compose_config(*small, "trainer.progress=false", "trainer.log_every_steps=1"),
            tmp_path / "c")  # fmt: skip
    assert not any("train  batch " in r.message for r in caplog.records)


def test_a_training_split_without_some_classes_says_so(tmp_path, caplog):
    """30 images of 40 classes: a user asked for more classes than the images can hold; the run
    says how many have no training image (it used to train on silently)."""
    import logging

    cfg = compose_config(*SMOKE, "data.num_classes=40", "data.train_size=30", "data.test_size=8",
                         "trainer.epochs=1")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(cfg, tmp_path / "run")
    warning = next(r.message for r in caplog.records if "has no image of" in r.message)
    missing = int(warning.split("has no image of ")[1].split()[0])
    assert 40 - 27 <= missing < 40  # 27 training images (3 held out) cover at most 27 classes
    assert warning.startswith(f"the training split has no image of {missing} of the 40 classes (")
    assert warning.endswith("the model cannot learn them; raise data.train_size (now 30)")


def _colours(path: Path) -> set[tuple[int, int, int]]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1500, 420)
        return {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}


def test_curves_draw_each_series_the_run_has_and_mark_the_test_accuracy(tmp_path):
    from resnet_train.curves import BLUE, GREEN, ORANGE, RED, write_curves

    history = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.2 / e, "train_acc": 20.0 * e,
                "valid_acc": 18.0 * e, "lr": 0.1 / e} for e in (1, 2, 3)]  # fmt: skip
    metrics = {"history": history, "test": {"acc": 51.5}, "selected_epoch": 3,
               "selected_checkpoint": "best.pt", "model": "resnet20", "data": "synthetic",
               "epochs_done": 3, "epochs_total": 3}  # fmt: skip
    write_curves(tmp_path / "curves.png", metrics)
    assert {BLUE, ORANGE, GREEN, RED} <= _colours(tmp_path / "curves.png")
    assert not list(tmp_path.glob(".*tmp*"))  # written whole
    # No validation set and no test figure: nothing orange, no red star.
    for h in history:
        h["valid_loss"] = h["valid_acc"] = None
    write_curves(tmp_path / "bare.png", {**metrics, "test": {}})
    colours = _colours(tmp_path / "bare.png")
    assert BLUE in colours and GREEN in colours and ORANGE not in colours and RED not in colours
    # One epoch, a rate of 1e-5 and a loss spanning 1000x (a logarithmic axis) draw too.
    one = [{"epoch": 1, "train_loss": 1000.0, "valid_loss": 1.0, "train_acc": 0.0,
            "valid_acc": 0.0, "lr": 1e-5}]  # fmt: skip
    write_curves(tmp_path / "one.png", {**metrics, "history": one})
    assert ORANGE in _colours(tmp_path / "one.png")
    # nan and inf (a diverged epoch, an overflowed evaluation) are left out, on a linear and
    # on a logarithmic loss axis (they ended the run in a traceback).
    for name, spread in (("linear", 2.0), ("log", 1000.0)):
        odd = [{"epoch": 1, "train_loss": spread, "valid_loss": math.nan, "train_acc": 10.0,
                "valid_acc": math.nan, "lr": 0.1},
               {"epoch": 2, "train_loss": math.inf, "valid_loss": 1.0, "train_acc": math.nan,
                "valid_acc": 20.0, "lr": 0.05}]  # fmt: skip
        write_curves(tmp_path / f"{name}.png", {**metrics, "history": odd,
                                                "test": {"acc": math.nan}})  # fmt: skip
        assert {BLUE, ORANGE} <= _colours(tmp_path / f"{name}.png")
