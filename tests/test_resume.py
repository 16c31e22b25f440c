"""Checkpoints you can trust: runs killed anywhere continue bit for bit, in place; bad files and
changed configs are refused in one line; sweeps pick up where they stopped."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from resnet_train.engine import checkpoint as checkpoint_module
from resnet_train.engine import faults
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignals
from resnet_train.engine.trainer import NonFiniteLossError, cpu_half_is_fast, fit
from resnet_train.errors import CheckpointError
from tests.conftest import SMOKE, compose_config, run_cli, run_dir_name
from tests.test_train import scalars, sha256

# Random crops, flips, Cutout and MixUp in a 3-epoch run of 15 steps an epoch (230 images of
# 16x16 to train on, the last batch short): every source of randomness a resume must reproduce.
RUN = [
    "model=resnet20",
    "data=synthetic",
    "data.train_size=256",
    "data.image_size=16",
    "data.batch_size=16",
    "data.augment.cutout=4",
    "data.augment.mixup_alpha=0.2",
    "trainer.epochs=3",
    "trainer.device=cpu",
    "trainer.log_every_steps=1",
    "name=run",
]
RUN_STEPS = 45


def _as_in_a_terminal() -> None:
    # A run started from a terminal has Python's own Ctrl-C handling; one started in the
    # background (`cmd &` in a script, nohup) inherits an ignored SIGINT, and pytest may be
    # such a run: its children get the terminal's disposition back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_as_in_a_terminal,
    )


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, ready, timeout: float = 240) -> dict:
    """Poll `path` (always whole: it is renamed into place) until ready(state) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before the checkpoint: {proc.stdout.read()}"
        if path.exists():
            try:
                state = torch.load(path, weights_only=True)
            except Exception:  # replaced between exists() and load(): try again
                state = None
            if state is not None and ready(state):
                return state
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, uninterrupted."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_cli(*RUN, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "outputs" / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    ours, theirs = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert ours["epoch"] == theirs["epoch"] == 3
    assert ours["global_step"] == theirs["global_step"] == RUN_STEPS
    for part in ("model", "ema"):
        assert (ours[part] is None) == (theirs[part] is None)
    for key, value in theirs["model"].items():  # parameters and BN buffers
        assert torch.equal(ours["model"][key], value), key
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][index]["momentum_buffer"],
                           state["momentum_buffer"])  # fmt: skip
    assert ours["scheduler"] == theirs["scheduler"]
    assert ours["monitor"] == theirs["monitor"]
    # The same loss at every step, each step once in the (appended) TensorBoard log.
    steps, expected = scalars(run)["train/loss_step"], scalars(reference)["train/loss_step"]
    assert [s for s, _ in steps] == list(range(1, RUN_STEPS + 1))
    assert steps == expected
    assert scalars(run)["valid/acc"] == scalars(reference)["valid/acc"]
    best, best_ref = load_checkpoint(run / "best.pt"), load_checkpoint(reference / "best.pt")
    assert best["epoch"] == best_ref["epoch"]
    assert all(torch.equal(best["model"][k], v) for k, v in best_ref["model"].items())
    metrics, metrics_ref = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert metrics["test"] == metrics_ref["test"] and metrics["valid"] == metrics_ref["valid"]
    # the last epoch's training figures, even where the resumed process trained no epoch
    assert metrics["train"]["loss"] == metrics_ref["train"]["loss"]
    assert metrics["train"]["acc"] == metrics_ref["train"]["acc"]
    assert metrics["images_per_s"] > 0


def test_killed_mid_epoch_resumes_bit_identical(tmp_path, reference):
    # Killed after step 23, inside epoch 2: the last checkpoint is the one of step 20.
    proc = start(tmp_path, *RUN, "trainer.checkpoint_every_steps=5",
                 env={faults.ENV: "step:23:KILL"})  # fmt: skip
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output
    assert not (tmp_path / "outputs" / "run" / "metrics.json").exists()
    state = load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 5, 20)
    assert state["epoch_sums"][0]["batches"] == state["batch_in_epoch"]
    result = run_cli(*RUN, "trainer.checkpoint_every_steps=5", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "batch" in result.stdout
    assert_same_run(tmp_path / "outputs" / "run", reference)


def test_killed_after_an_epoch_with_data_workers_resumes_bit_identical(tmp_path, reference):
    proc = start(tmp_path, *RUN, "data.num_workers=2", env={faults.ENV: "step:18:KILL"})
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output
    assert load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")["epoch"] == 1
    result = run_cli(*RUN, "data.num_workers=2", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "1 epochs done" in result.stdout
    assert_same_run(tmp_path / "outputs" / "run", reference)


def fake_slurm_job(tmp_path: Path) -> dict[str, str]:
    """The environment of SLURM job 4242 whose scontrol writes its arguments to
    tmp_path/scontrol.args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_a_stop_signal_while_the_run_starts_stops_it_as_a_preemption(tmp_path):
    """SIGTERM before the first step (the config's check, the data's reading, the model's
    building: seconds, minutes for a large data set) used to end the process at once, silently,
    and a SLURM job was not requeued: now the run stops as its training begins, saving nothing,
    exit 75, requeued."""
    env = fake_slurm_job(tmp_path)
    proc = start(tmp_path, *RUN, env={**env, faults.ENV: "starting:1:TERM"})
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert ("stopped by SIGTERM, which came while the run was starting (at step 0); nothing new "
            "was saved: the same command with resume=auto starts it again") in output  # fmt: skip
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "outputs" / "run" / "last.pt").exists()
    # a command that does not train gets the signal as before (it ends it)
    proc = start(tmp_path, "--cfg", "job", env={faults.ENV: "starting:1:TERM"})
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_sigterm_saves_exits_75_and_requeues_under_slurm(tmp_path, reference):
    env = fake_slurm_job(tmp_path)
    proc = start(tmp_path, *RUN, "data.num_workers=2", env={**env, faults.ENV: "step:18:TERM"})
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, output
    assert "stopped by SIGTERM after step 18" in output and "resume=auto" in output
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    state = load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")
    assert (
        state["global_step"] == 18 and not (tmp_path / "outputs" / "run" / "metrics.json").exists()
    )
    result = run_cli(*RUN, "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "outputs" / "run", reference)


# --- files ---------------------------------------------------------------------------------------


def test_a_save_that_fails_halfway_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint_module.save_checkpoint({"step": 1}, path)
    before = sha256(path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_fail)
    with pytest.raises(checkpoint_module.SaveError, match=r"could not save .*last.pt: No space "
                       r"left on device \(OSError\); the last.pt in place is whole"):  # fmt: skip
        checkpoint_module.save_checkpoint({"step": 2}, path, tmp_path / "previous.pt")
    assert sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_killed_save_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    cfg = compose_config(*SMOKE, "data.train_size=64")
    fit(cfg, tmp_path)
    stale = tmp_path / ".last.pt.999999999.tmp"  # (a process that cannot exist: killed)
    stale.write_bytes(b"half")
    fit(compose_config(*SMOKE, "data.train_size=64", "trainer.epochs=2", "resume=auto"), tmp_path)
    assert not stale.exists()


def test_resume_auto_skips_a_truncated_last_pt_for_the_previous_one(tmp_path):
    common = [*SMOKE, "data.train_size=128", "trainer.epochs=2", "trainer.log_every_steps=1"]
    reference = fit(compose_config(*common), tmp_path / "reference")
    run = tmp_path / "run"
    fit(compose_config(*common), run)
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run / "metrics.json").unlink()
    assert load_checkpoint(run / "previous.pt")["epoch"] == 1
    cut = last.stat().st_size
    again = fit(compose_config(*common, "resume=auto"), run)  # epoch 2 again, from previous.pt
    assert again["epochs_run"] == 1
    assert again["test"] == reference["test"]
    ours, theirs = load_checkpoint(last), load_checkpoint(tmp_path / "reference" / "last.pt")
    assert all(torch.equal(ours["model"][k], v) for k, v in theirs["model"].items())
    # the save did not rotate the damaged file over previous.pt (the one readable fallback, were
    # the run stopped then): it was set aside, kept
    assert load_checkpoint(run / "previous.pt")["epoch"] == 1
    assert (run / "last.pt.unreadable").stat().st_size == cut


def test_unreadable_checkpoints_never_restart_a_run_from_scratch(tmp_path):
    assert run_cli(*SMOKE, "data.train_size=64", "name=run", cwd=tmp_path).returncode == 0
    run = tmp_path / "outputs" / "run"
    (run / "last.pt").write_bytes(b"")
    (run / "previous.pt").write_bytes(b"")  # (a one-epoch run has none; make it bad too)
    result = run_cli(*SMOKE, "data.train_size=64", "name=run", "resume=auto", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("resnet-train:")]
    assert result.returncode == 2 and len(lines) == 1
    assert f"resume=auto: no readable checkpoint in {Path('outputs/run')}" in lines[0]
    assert "last.pt is empty (0 bytes)" in lines[0] and "the run was not restarted" in lines[0]
    assert (run / "last.pt").stat().st_size == 0  # nothing overwritten
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    result = run_cli(*SMOKE, f"resume={foreign}", "name=other", cwd=tmp_path)
    assert result.returncode == 2
    assert f"checkpoint {foreign} is not a resnet-train checkpoint" in result.stderr
    # a run's folder given as the checkpoint (it said the folder "does not exist")
    result = run_cli(*SMOKE, "resume=outputs/run/", "name=other", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        "resnet-train: error: resume=outputs/run/ is a folder, not a checkpoint file: give "
        "resume=outputs/run/last.pt (resume=auto continues the run of this command's own folder)\n"
    )
    assert not (tmp_path / "outputs" / "other").exists()


def test_changed_config_is_refused_with_a_diff_and_allowed_changes_are_said(tmp_path):
    assert run_cli(*SMOKE, "data.train_size=64", "name=run", cwd=tmp_path).returncode == 0
    result = run_cli(*SMOKE, "data.train_size=64", "name=run", "resume=auto", "optim.lr=0.3",
                     "model.zero_init_residual=true", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert (
        "was made with another config: model.zero_init_residual: False -> True; "
        "optim.lr: 0.1 -> 0.3. Only these keys may change on resume:" in result.stderr
    )
    result = run_cli(*SMOKE, "data.train_size=64", "name=run", "resume=auto",
                     "trainer.epochs=2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "resuming with changed settings: trainer.epochs: 1 -> 2" in result.stdout
    assert load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")["epoch"] == 2


def test_best_checkpoint_and_early_stopping_state_survive_a_resume(tmp_path):
    common = [*SMOKE, "data.train_size=128", "trainer.epochs=5",
              "trainer.early_stopping.patience=2"]  # fmt: skip
    proc_dir = tmp_path / "run"
    fit(compose_config(*common[:-1], "trainer.epochs=1"), proc_dir)
    # Pretend epoch 1 scored a validation accuracy no later epoch can reach, one bad epoch ago.
    state = load_checkpoint(proc_dir / "last.pt")
    state["monitor"].update(best=101.0, best_epoch=1, reference=101.0, bad_epochs=1)
    torch.save(state, proc_dir / "last.pt")
    best_before = sha256(proc_dir / "best.pt")
    (proc_dir / "metrics.json").unlink()
    metrics = fit(compose_config(*common, "resume=auto"), proc_dir)
    # Epoch 2 was worse than the remembered best: best.pt is untouched, and the patience counter
    # went on from 1, so the run stopped after epoch 2 of 5.
    assert sha256(proc_dir / "best.pt") == best_before
    assert metrics["epochs_done"] == 2 and metrics["selected_epoch"] == 1
    assert "for 2 epochs (best 101.0000 at epoch 1)" in metrics["stopped_early"]


FP16_SMALL = ["data.train_size=64", "data.test_size=16", "data.batch_size=4", "data.image_size=8",
              "trainer.precision=fp16"]  # fmt: skip


def test_fp16_stops_when_the_scaler_skips_too_many_steps_in_a_row(tmp_path, caplog, monkeypatch):
    # fp16 on the CPU is slow: 64 images of 8x8 in batches of 4 (58 to train on, 15 steps an
    # epoch). The loss stays finite; a gradient is infinite at any scale.
    from resnet_train.engine import trainer

    def with_infinite_gradient(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.fc.weight.register_hook(lambda grad: grad * math.inf)
        return model

    build_model = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", with_infinite_gradient)
    cfg = compose_config(*SMOKE, *FP16_SMALL, "trainer.epochs=3")
    with pytest.raises(NonFiniteLossError) as error, caplog.at_level("WARNING"):
        fit(cfg, tmp_path)
    warned = [r.message for r in caplog.records if "fp16 on this CPU" in r.message]
    if not cpu_half_is_fast("fp16"):  # a CPU without AVX-512 FP16 or AMX, as this project's
        assert warned == [
            "trainer.precision=fp16 on this CPU is emulated and slow (ResNet-20: 19 img/s in "
            "fp16, 31 in bf16, 431 in fp32 on an AVX2 CPU): use trainer.precision=fp32 on a CPU "
            "without AVX-512 FP16 or AMX"
        ]
    # Skips are counted on the device and read at the next sync point (here the epoch's end).
    found = re.search(
        r"scaler skipped (\d+) steps in a row up to step \d+ \(epoch 2/3", str(error.value)
    )
    assert found and int(found.group(1)) >= 20, str(error.value)
    # Epoch 1 (15 steps) ended before the 20th skip: its checkpoint is the last one, and its
    # weights are the initial ones, all finite (no step was applied).
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(v.isfinite().all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_stops_at_a_loss_that_is_not_finite_and_saves_nothing(tmp_path):
    """A diverging fp16 run: the scaler skips the bad steps, but the loss is nan (the weights
    blew up): one error at the first check, as in fp32, and no checkpoint with nan in it."""
    cfg = compose_config(*SMOKE, *FP16_SMALL, "optim.lr=1e30", "trainer.epochs=3")
    with pytest.raises(NonFiniteLossError, match=r"^the training loss is (nan|inf) at step \d+"):
        fit(cfg, tmp_path)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


# --- sweeps -------------------------------------------------------------------------------------


def test_an_interrupted_sweep_relaunched_runs_only_what_is_left(tmp_path):
    job = [*SMOKE[:2], "data.train_size=128", "data.image_size=16"]
    sweep = ["-m", *job, "trainer.device=cpu", "trainer.epochs=2", "seed=0,1", "name=sw"]
    proc = start(tmp_path, *sweep)
    first = tmp_path / "outputs" / "multirun" / "sw" / run_dir_name(*job, "seed=0")
    second = first.with_name(run_dir_name(*job, "seed=1"))
    deadline = time.monotonic() + 240
    while not second.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    done = {name: sha256(first / name) for name in ("last.pt", "metrics.json")}
    result = run_cli(*sweep, "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {name: sha256(first / name) for name in done} == done  # not run again
    assert f"resume=auto: {first} already finished; nothing to do" in result.stdout
    assert json.loads((second / "metrics.json").read_text())["epochs_done"] == 2
    assert sorted(p.name for p in first.parent.iterdir() if p.is_dir()) == [first.name, second.name]


# --- every stop point ---------------------------------------------------------------------------

# 100 images of 16x16: 90 to train on in batches of 32, 32 and 26 (a short last batch), 3 epochs
# of 3 steps, with random crops, flips, Cutout and MixUp.
SMALL = [
    "model=resnet20",
    "data=synthetic",
    "data.train_size=100",
    "data.image_size=16",
    "data.test_size=32",
    "data.augment.cutout=6",
    "data.augment.mixup_alpha=0.2",
    "trainer.epochs=3",
    "trainer.device=cpu",
    "trainer.log_every_steps=1",
]


def assert_same_result(run: Path, reference: Path, steps: int = 9) -> None:
    """Every weight, the best checkpoint, each step's loss and the final figures are equal."""
    ours, theirs = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    best, best_ref = load_checkpoint(run / "best.pt"), load_checkpoint(reference / "best.pt")
    assert best["epoch"] == best_ref["epoch"]
    assert all(torch.equal(best["model"][k], v) for k, v in best_ref["model"].items())
    losses, expected = scalars(run)["train/loss_step"], scalars(reference)["train/loss_step"]
    assert [s for s, _ in losses] == list(range(1, steps + 1)) and losses == expected
    metrics, metrics_ref = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert metrics["test"] == metrics_ref["test"] and metrics["valid"] == metrics_ref["valid"]


@pytest.fixture(scope="module")
def small_references(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for loader in ("torch", "tensor"):
        run = tmp_path_factory.mktemp(f"small-{loader}")
        fit(compose_config(*SMALL, f"data.loader={loader}"), run)
        out[loader] = run
    return out


def stop_at(monkeypatch, fault: str, args: list[str], run_dir: Path) -> None:
    """fit() of args stopped by the fault (a SIGUSR1 after a step: saved, Preempted)."""
    faults.reset()
    monkeypatch.setenv(faults.ENV, fault)
    with pytest.raises(Preempted):
        fit(compose_config(*args), run_dir)
    monkeypatch.delenv(faults.ENV)


@pytest.mark.parametrize(
    ("loader", "step"), [("torch", s) for s in range(1, 10)] + [("tensor", s) for s in (3, 5, 9)]
)
def test_a_stop_after_any_step_resumes_bit_identical(
    loader, step, tmp_path, monkeypatch, small_references
):
    """SIGTERM after each step of the first, the middle and the last epoch. Steps 3, 6 and 9 end
    an epoch on a short batch: saved at batch 3 of 90 images, the resume used to ask for
    sample 96 ("start=96 is outside an epoch of 90 samples") and failed at every retry."""
    cfg = [*SMALL, f"data.loader={loader}"]
    stop_at(monkeypatch, f"step:{step}:USR1", cfg, tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["global_step"] == step
    assert state["batch_in_epoch"] == (step - 1) % 3 + 1  # saved at the step, inside its epoch
    fit(compose_config(*cfg, "resume=auto"), tmp_path)
    assert_same_result(tmp_path, small_references[loader])


@pytest.fixture(scope="module")
def small_cli_reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("small-cli")
    result = run_cli(*SMALL, "name=run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "outputs" / "run"


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "saved best.pt:1",  # epoch 1: best.pt in place, no last.pt yet
        "saved last.pt:1",  # epoch 1: last.pt names best epoch 1 (best.pt used to come after)
        "validated:2",  # epoch 2 validated, nothing written
        "kept previous.pt:1",  # epoch 2: last.pt renamed to previous.pt, the new one not yet
        "saved last.pt:2",
        "flushed:3",  # the last epoch's files all written, the test set not yet evaluated
        "tested:1",  # tested, metrics.json not yet written
    ],
)
def test_a_kill_between_any_two_writes_of_an_epoch_end_resumes_bit_identical(
    fault, tmp_path, small_cli_reference
):
    proc = start(tmp_path, *SMALL, "name=run", env={faults.ENV: f"{fault}:KILL"})
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output
    run = tmp_path / "outputs" / "run"
    assert not (run / "metrics.json").exists()
    result = run_cli(*SMALL, "name=run", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_result(run, small_cli_reference)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_with_data_workers(tmp_path, reference):
    """What SLURM and `kill -- -PGID` do: the data workers get the signal too, and used to die of
    it ("DataLoader worker ... is killed by signal: Terminated", exit 1, nothing saved)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_train", *RUN, "data.num_workers=2"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    last = tmp_path / "outputs" / "run" / "last.pt"
    wait_for_checkpoint(proc, last, lambda s: s["epoch"] >= 1)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert "stopped by SIGTERM after step" in output and "killed by signal" not in output
    result = run_cli(*RUN, "data.num_workers=2", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "outputs" / "run", reference)


def test_every_key_that_may_change_on_resume_changes_without_changing_the_result(
    tmp_path, monkeypatch, small_references
):
    # Stopped at the end of epoch 1 of 2, before the cosine schedule's first step: the schedule
    # rebuilt for 3 epochs is then the 3-epoch run's from its start.
    stop_at(monkeypatch, "step:3:USR1", [*SMALL, "data.loader=torch", "trainer.epochs=2"], tmp_path)
    changed = [
        "trainer.epochs=3",
        "data.num_workers=2",
        "data.download=false",
        "trainer.log_every_steps=1",
        "trainer.grad_norm_every_steps=2",
        "trainer.checkpoint_every_steps=2",
        "trainer.progress=false",
        "trainer.requeue=false",
        "trainer.early_stopping.patience=100",
    ]
    fit(compose_config(*SMALL, "data.loader=torch", *changed, "resume=auto"), tmp_path)
    assert_same_result(tmp_path, small_references["torch"])


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_the_run_resumes_bit_identical(tmp_path, small_cli_reference):
    """A first Ctrl-C finishes the step, saves last.pt, says in one line how to continue and
    exits 130 (with data workers, which ignore the group's signals and must not hold the exit);
    the run continued with resume=auto ends as the uninterrupted one."""
    proc = start(tmp_path, *SMALL, "name=run", env={faults.ENV: "step:4:INT"})
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    run = tmp_path / "outputs" / "run"
    stopped = [line for line in output.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and stopped[0].endswith(
        f"stopped by Ctrl-C (SIGINT) after step 4; the run continues from {run}/last.pt with the "
        "same command and resume=auto"
    ), output
    assert "Traceback" not in output
    assert load_checkpoint(run / "last.pt")["global_step"] == 4
    result = run_cli(*SMALL, "name=run", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_result(run, small_cli_reference)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    proc = start(tmp_path, *SMALL, "data.num_workers=2", "name=run",
                 env={faults.ENV: "step:2:INT,step:2:INT"})  # two Ctrl-C  # fmt: skip
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert output.strip().splitlines()[-1] == (
        "resnet-train: interrupted: stopped at once; checkpoints are written whole, so the last "
        "one saved is intact (resume=auto continues from it)"
    )
    assert "Traceback" not in output
    run = tmp_path / "outputs" / "run"
    assert not any(run.glob("*.pt")) and not any(run.glob(".*tmp*"))  # none saved, none half
    # the run's log says it too (it ended at "Ctrl-C: saving at the end of this step")
    assert (
        (run / "train.log")
        .read_text()
        .strip()
        .splitlines()[-1]
        .endswith(
            "[WARNING] - interrupted: stopped at once; checkpoints are written whole, so the last "
            "one saved is intact (resume=auto continues from it)"
        )
    )


CTRL_C_IN_AN_IMPORT = """
import sys
class CtrlC:  # a Ctrl-C that lands while Hydra is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "hydra":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = ["resnet-train", "experiment=smoke"]
from resnet_train.start import run
run()
"""


def test_a_ctrl_c_while_the_command_imports_its_libraries_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", CTRL_C_IN_AN_IMPORT], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 130
    assert result.stderr == "resnet-train: interrupted while starting; nothing was written\n"
    assert not (tmp_path / "outputs").exists()


def test_a_resumed_epoch_reports_the_rate_it_started_with(tmp_path, monkeypatch, caplog):
    import logging

    cfg = [*SMALL, "schedule.interval=step"]
    stop_at(monkeypatch, "step:5:USR1", cfg, tmp_path / "run")  # inside epoch 2
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(compose_config(*cfg, "resume=auto"), tmp_path / "run")
        fit(compose_config(*cfg), tmp_path / "reference")
    lines = [r.message for r in caplog.records if r.message.startswith("epoch 2/3  train")]
    assert len(lines) == 2
    assert lines[0].split("  lr ")[-1].split()[0] == lines[1].split("  lr ")[-1].split()[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_whose_keyboard_interrupt_a_finalizer_dropped_still_ends_the_run(
    tmp_path, monkeypatch
):
    """Python raises KeyboardInterrupt wherever the main thread is; inside a __del__ it is
    printed and dropped. The run remembers the Ctrl-C and raises it again at its next step."""

    class DropsIt:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the KeyboardInterrupt dies in here

    # Python's own Ctrl-C handling, as in a terminal (pytest may run in the background, where
    # SIGINT is ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)  # the first: remembered, the run saves and stops
            assert signals.received == signal.SIGINT and not signals.interrupted
            DropsIt()  # the second, collected at once: its __del__ runs, the exception dropped
            assert signals.interrupted
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)

    faults.reset()
    cfg = compose_config(*SMOKE, "data.train_size=64", "data.test_size=32")
    original = StopSignals.__enter__

    def enter_interrupted(self):
        original(self)
        self.interrupted = True  # as if a Ctrl-C had been dropped before the first step
        return self

    monkeypatch.setattr(StopSignals, "__enter__", enter_interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_program_with_its_own_sigterm_handler_gets_the_signal_after_the_run_saved():
    """pytest (conftest.py) and applications handle SIGTERM themselves: the trainer stops and
    saves, then hands the signal on, so the program stops too instead of going on."""

    class Stop(Exception):
        pass

    def handler(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Stop):
            with StopSignals() as signals:
                os.kill(os.getpid(), signal.SIGTERM)
                assert signals.received == signal.SIGTERM  # remembered, not raised, mid-run
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_unreadable_checkpoints_say_what_the_file_is_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "text.pt"
    text.write_text("hello")
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(__import__("pickle").dumps({1: object}))
    exported = tmp_path / "model.pt2"  # what task=export writes (it was "damaged or truncated")
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)), exported)
    expected = {
        exported: r"is unreadable: a torch.export program \(what task=export writes\), not a "
        r"checkpoint: give the run's best.pt or last.pt$",
        # torch's reason in whole sentences (it used to end "...your checkpoint file is)")
        cut: r"is unreadable: a damaged or truncated PyTorch file \(2000 bytes; a save that was "
        r"cut short\?\) \(RuntimeError: PytorchStreamReader failed reading zip archive: "
        r"failed finding central directory\)$",
        text: r"is unreadable: not a PyTorch file \(it starts with b'hello'\)$",
        pickled: r"is unreadable: a pickle of Python objects, not a checkpoint of tensors",
    }
    for path, message in expected.items():
        with pytest.raises(CheckpointError, match=rf"^checkpoint {path} {message}") as error:
            load_checkpoint(path)
        assert "\n" not in str(error.value)


def test_resuming_from_a_best_pt_of_ema_weights_is_refused_in_one_line(tmp_path):
    """best.pt chosen with trainer.ema.select holds EMA weights: training from them as if they
    were the raw ones (with the raw optimizer state) was silently wrong."""
    ema = [*SMOKE, "data.train_size=64", "data.test_size=32", "trainer.ema.decay=0.5",
           "trainer.ema.select=ema"]  # fmt: skip
    first = run_cli(*ema, "hydra.run.dir=a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    best = tmp_path / "a" / "best.pt"
    result = run_cli(*ema, "trainer.epochs=2", f"resume={best}", "hydra.run.dir=b", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "b").exists()
    assert result.stderr.strip() == (
        f"resnet-train: error: resume={best} holds the run's ema weights (a best.pt chosen with "
        "trainer.ema.select), not the raw weights training continues from: resume from "
        f"{tmp_path / 'a' / 'last.pt'}"
    )


# --- a finished run is left as it is -------------------------------------------------------------


def _record(run: Path) -> dict[str, str]:
    """The hash of every file of a run directory (its .hydra/ record and log included)."""
    return {str(p.relative_to(run)): sha256(p) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_commands_that_do_nothing_or_are_refused_leave_a_finished_run_as_it_is(
    tmp_path, small_cli_reference
):
    import shutil

    run = tmp_path / "outputs" / "run"
    shutil.copytree(small_cli_reference, run)
    before = _record(run)
    # resume=auto on a finished run: nothing to do, whatever else the command line says
    result = run_cli(*SMALL, "name=run", "resume=auto", "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        f"resume=auto: {Path('outputs/run')} already finished; nothing to do (epoch 3 of "
        "trainer.epochs=2)" in result.stdout
    )
    assert _record(run) == before  # not even .hydra/config.yaml or train.log
    # without trainer.epochs: the run's own 3, not the config's default 30
    short = [a for a in SMALL if not a.startswith("trainer.epochs=")]
    result = run_cli(*short, "name=run", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already finished; nothing to do" in result.stdout and _record(run) == before
    # resume=PATH from a finished run: refused before a directory is made for it
    result = run_cli(*SMALL, "name=other", f"resume={run / 'last.pt'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "already finished epoch 3 of trainer.epochs=3" in result.stderr
    assert not (tmp_path / "outputs" / "other").exists()
    # its checkpoints removed to save space (best.pt and metrics.json kept): not overwritten
    (run / "last.pt").unlink()
    (run / "previous.pt").unlink()
    before = _record(run)
    for extra, message in (
        ([], "already holds best.pt, metrics.json of a finished run: start another run with"),
        (["resume=auto"], "holds best.pt, metrics.json of a finished run but no last.pt or"),
        (
            [f"resume={small_cli_reference / 'last.pt'}", "trainer.epochs=4"],
            "already holds best.pt, metrics.json of another run: resume=",
        ),
    ):
        result = run_cli(*SMALL, "name=run", *extra, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert _record(run) == before


@pytest.mark.slow
def test_a_run_extended_and_stopped_before_its_test_is_tested_when_resumed(tmp_path):
    """trainer.epochs raised on a finished run, killed after its last epoch's checkpoint and
    before the test: resume=auto tests it (it used to say "already finished" and keep the
    metrics.json of the shorter run)."""
    short = [*SMALL, "trainer.epochs=2", "name=run"]
    assert run_cli(*short, cwd=tmp_path).returncode == 0
    proc = start(tmp_path, *SMALL, "name=run", "resume=auto",
                 env={faults.ENV: "flushed:1:KILL"})  # fmt: skip
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, output
    run = tmp_path / "outputs" / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    assert json.loads((run / "metrics.json").read_text())["epochs_done"] == 2  # the old one
    result = run_cli(*SMALL, "name=run", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" not in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    last = load_checkpoint(run / "last.pt")
    assert (metrics["epochs_done"], metrics["epochs_total"]) == (3, 3)
    assert metrics["global_step"] == last["global_step"] and len(metrics["history"]) == 3
    best = load_checkpoint(run / "best.pt")
    assert metrics["selected_epoch"] == best["epoch"]
    assert metrics["valid"] == best["best_valid"] == last["best_valid"]  # the best epoch's


def test_a_resume_that_does_not_give_the_runs_length_keeps_the_runs_own(
    tmp_path, monkeypatch, caplog
):
    """A 3-epoch run with patience 5 stopped in epoch 2 and resumed by a command line without
    trainer.epochs nor patience ends at epoch 3 with patience 5 (not at the config's default of
    30 epochs and no early stopping), and says so; given, they change the run's length."""
    from resnet_train.engine.resume import override_keys

    own = [*SMALL, "trainer.early_stopping.patience=5"]
    stop_at(monkeypatch, "step:9:USR1", own, tmp_path / "run")  # inside epoch 2
    resume = [a for a in SMALL if not a.startswith("trainer.epochs=")] + ["resume=auto"]
    with caplog.at_level("INFO"):
        metrics = fit(compose_config(*resume), tmp_path / "run", override_keys(resume))
    assert (metrics["epochs_done"], metrics["epochs_total"]) == (3, 3)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["config"]["trainer"]["epochs"] == 3
    assert last["config"]["trainer"]["early_stopping"]["patience"] == 5
    assert ("resuming with the run's own trainer.epochs=3, trainer.early_stopping.patience=5 "
            "(not given on the command line)") in caplog.text  # fmt: skip
    # given on the command line: the run is extended
    longer = [*resume, "trainer.epochs=4"]
    metrics = fit(compose_config(*longer), tmp_path / "run", override_keys(longer))
    assert (metrics["epochs_done"], metrics["epochs_total"]) == (4, 4)


@pytest.mark.slow
def test_a_resume_without_the_runs_length_is_checked_and_recorded_with_the_runs_own(tmp_path):
    """experiment=smoke has 4 epochs; a 5-epoch run of it with a 4-epoch warm-up, resumed
    without trainer.epochs, is checked against its own 5 (it was refused: "the warm-up must end
    before the run does"), by --cfg job too, and its .hydra record says 5; a sweep's relaunch
    too."""
    args = ["experiment=smoke", "data.train_size=64", "data.test_size=32", "schedule.warmup=4"]
    proc = start(tmp_path, *args, "trainer.epochs=5", "name=w", env={faults.ENV: "step:1:USR1"})
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    # --cfg job checks it as the run would, and prints the length the run would use
    printed = run_cli("--cfg", "job", *args, "name=w", "resume=auto", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["trainer"]["epochs"] == 5
    printed = run_cli(*args, "name=w", "resume=auto", "--cfg", "job", cwd=tmp_path)  # flags last
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["trainer"]["epochs"] == 5
    result = run_cli(*args, "name=w", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "outputs" / "w"
    assert json.loads((run / "metrics.json").read_text())["epochs_total"] == 5
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]["epochs"] == 5
    assert "resuming with the run's own trainer.epochs=5" in (run / "train.log").read_text()
    sweep = ["-m", "experiment=smoke", "data.train_size=64", "data.test_size=32", "seed=0,1",
             "name=sw"]  # fmt: skip
    assert run_cli(*sweep, "trainer.epochs=2", cwd=tmp_path).returncode == 0
    again = run_cli(*sweep, "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already finished; nothing to do") == 2, again.stdout
    records = list((tmp_path / "outputs" / "multirun" / "sw").glob("*/.hydra/config.yaml"))
    assert len(records) == 2
    assert all(yaml.safe_load(r.read_text())["trainer"]["epochs"] == 2 for r in records)


def test_a_run_that_stopped_early_says_so_and_how_to_train_on():
    from resnet_train.engine.early_stopping import Monitor
    from resnet_train.engine.resume import ResumePoint, finished, finished_note

    monitor = Monitor(patience=2, min_delta=0.1, best=71.5, best_epoch=2, reference=71.5,
                      bad_epochs=2)  # fmt: skip
    point = ResumePoint(Path("last.pt"), {"epoch": 4, "monitor": monitor.state_dict()})
    cfg = compose_config("trainer.epochs=10", "trainer.early_stopping.patience=2")
    assert finished(point, cfg)
    assert finished_note(point, cfg) == (
        "(stopped early at epoch 4: early stopping: valid/acc has not improved by more than 0.1 "
        "for 2 epochs (best 71.5000 at epoch 2); a larger trainer.early_stopping.patience, or "
        "null, trains on)"
    )
    cfg = compose_config("trainer.epochs=4", "trainer.early_stopping.patience=2")
    assert finished_note(point, cfg) == "(epoch 4 of trainer.epochs=4)"
    # resume=PATH from it: refused, saying what would train on (not "raise trainer.epochs")
    from resnet_train.engine.resume import check_not_finished

    cfg = compose_config("trainer.epochs=10", "trainer.early_stopping.patience=2",
                         "resume=runs/a/last.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"^resume=runs/a/last.pt stopped early at epoch 4: "
                       r"early stopping: .*; a larger trainer.early_stopping.patience, or null, "
                       r"trains on$"):  # fmt: skip
        check_not_finished(cfg, point)


def test_a_key_given_through_its_parent_is_given():
    """trainer.early_stopping={patience:5} or trainer=default on the command line give the
    patience: a resume keeps the command line's, not the checkpoint's."""
    from resnet_train.engine.resume import keep_run_length, override_keys

    saved = {"trainer": {"epochs": 7, "early_stopping": {"patience": 3}}}
    for overrides, expected in (
        (["trainer.early_stopping={patience:5}"], (7, 5)),
        (["trainer=default"], (30, 5)),
        (["resume=auto"], (7, 3)),
    ):
        cfg = compose_config("trainer.early_stopping.patience=5")
        kept = keep_run_length(cfg, saved, override_keys(overrides))
        assert (cfg.trainer.epochs, cfg.trainer.early_stopping.patience) == expected, overrides
        assert len(kept) == sum(v != d for v, d in zip(expected, (30, 5), strict=True))
    cfg = compose_config("trainer.early_stopping.patience=5")
    saved["trainer"]["early_stopping"]["patience"] = None
    assert keep_run_length(cfg, saved, set()) == [
        "trainer.epochs=7",
        "trainer.early_stopping.patience=null",
    ]


def test_a_stop_signal_during_the_final_test_ends_a_complete_run_that_says_so(
    tmp_path, monkeypatch, caplog
):
    """The first Ctrl-C waits for the end of a step; during the final test there is none left:
    the test finishes, metrics.json is written, and the log says what happened (it used to say
    nothing: a Ctrl-C that seemed ignored)."""
    faults.reset()
    monkeypatch.setenv(faults.ENV, "tested:1:USR1")
    with caplog.at_level("INFO"):
        metrics = fit(compose_config(*SMALL, "trainer.epochs=1"), tmp_path)
    assert metrics["epochs_done"] == 1 and (tmp_path / "metrics.json").is_file()
    assert (tmp_path / "curves.png").is_file()  # (written after the signal handling ended, a
    # stop then left a finished run without it, for good)
    assert ("SIGUSR1 came after the last epoch, during the final test: the run is finished and "
            "tested, its metrics.json written") in caplog.text  # fmt: skip
    # a finished run without its curves (killed between the two files) gets them on resume=auto
    (tmp_path / "curves.png").unlink()
    monkeypatch.delenv(faults.ENV)
    again = fit(compose_config(*SMALL, "trainer.epochs=1", "resume=auto"), tmp_path)
    assert again == metrics and (tmp_path / "curves.png").is_file()


def test_a_resume_that_only_tests_keeps_the_runs_figures_and_says_an_early_stop(tmp_path, caplog):
    """A run stopped after its last epoch's checkpoint, resumed: this process only tests; its
    metrics.json has the run's train figures whole (its images were null). A stop that early
    stopping decided before this process is said in the log (it went straight to the test)."""
    reference = fit(compose_config(*SMALL, "trainer.epochs=2"), tmp_path / "reference")
    run = tmp_path / "run"
    fit(compose_config(*SMALL, "trainer.epochs=2"), run)
    (run / "metrics.json").unlink()  # as if stopped before it was written
    tested = fit(compose_config(*SMALL, "trainer.epochs=2", "resume=auto"), run)
    assert tested["epochs_run"] == 0 and tested["test"] == reference["test"]
    ours, theirs = dict(tested["train"]), dict(reference["train"])
    assert ours.pop("seconds") > 0 and theirs.pop("seconds") > 0
    assert ours == theirs and ours["images"] == 90
    # patience 1 given at a resume whose last epoch was a bad one: it stops at once, and says so
    state = load_checkpoint(run / "last.pt")
    state["monitor"].update(best=101.0, best_epoch=1, reference=101.0, bad_epochs=1)
    torch.save(state, run / "last.pt")
    (run / "metrics.json").unlink()
    longer = [*SMALL, "trainer.epochs=4", "trainer.early_stopping.patience=1", "resume=auto"]
    with caplog.at_level("INFO", logger="resnet_train"):
        metrics = fit(compose_config(*longer), run)
    assert metrics["epochs_done"] == 2 and metrics["stopped_early"].startswith("early stopping:")
    assert metrics["stopped_early"] in caplog.text


def test_a_run_shortened_to_where_it_is_keeps_that_length_and_not_past_a_mid_epoch_save(
    tmp_path, monkeypatch
):
    """trainer.epochs lowered on a stopped run finishes it without a step, so without a save:
    the next resume=auto without trainer.epochs (a requeue, the same command) took last.pt's old
    length and trained on, rewriting metrics.json and best.pt. And a length that ends before a
    checkpoint saved inside an epoch tested weights past that end as "epoch N"."""
    from resnet_train.engine.resume import override_keys

    stop_at(monkeypatch, "flushed:2:USR1", SMALL, tmp_path / "run")  # 2 of 3 epochs done
    shorter = [*SMALL[:-3], "trainer.epochs=1", *SMALL[-2:], "resume=auto"]
    metrics = fit(compose_config(*shorter), tmp_path / "run", override_keys(shorter))
    assert (metrics["epochs_done"], metrics["epochs_total"]) == (2, 1)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["config"]["trainer"]["epochs"] == 1 and last["epoch"] == 2
    previous = load_checkpoint(tmp_path / "run" / "previous.pt")  # kept (not rotated over)
    assert previous["config"]["trainer"]["epochs"] == 1 and previous["epoch"] == 1
    tested = (tmp_path / "run" / "metrics.json").read_bytes()
    plain = [a for a in SMALL if not a.startswith("trainer.epochs=")] + ["resume=auto"]
    again = fit(compose_config(*plain), tmp_path / "run", override_keys(plain))
    assert again["epochs_done"] == 2 and len(again["history"]) == 2  # not trained on
    assert (tmp_path / "run" / "metrics.json").read_bytes() == tested

    stop_at(monkeypatch, "step:9:USR1", SMALL, tmp_path / "mid")  # inside epoch 3
    point = load_checkpoint(tmp_path / "mid" / "last.pt")
    assert point["epoch"] == 2 and point["batch_in_epoch"] > 0
    before = sorted(p.name for p in (tmp_path / "mid").iterdir())
    two = [*SMALL[:-3], "trainer.epochs=2", *SMALL[-2:], "resume=auto"]
    with pytest.raises(CheckpointError, match=r"trainer.epochs=2 ends before .*last.pt, saved "
                       r"\d+ batches into epoch 3: .* give trainer.epochs=3 or more"):  # fmt: skip
        fit(compose_config(*two), tmp_path / "mid", override_keys(two))
    assert sorted(p.name for p in (tmp_path / "mid").iterdir()) == before
    result = run_cli(*two, "hydra.run.dir=mid", cwd=tmp_path)  # refused before Hydra writes
    assert result.returncode == 2 and "ends before" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "mid").iterdir()) == before


# --- one process at a time in a run folder; a folder that cannot be written -------------------

HOLDER = """
import sys, time
from pathlib import Path
from resnet_train.engine import runlock
runlock.hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_in_a_live_run_folder_is_refused_and_the_lock_goes_with_it(tmp_path):
    """Two runs of one name, or a resume=auto while the run still trains (a requeue with the
    old job alive), trained into one folder and mixed their files; a save of one could remove
    the other's checkpoint being written."""
    from resnet_train.engine.checkpoint import remove_temporaries
    from resnet_train.errors import RunDirError

    run = tmp_path / "outputs" / "live"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        message = (f"{Path('outputs/live')} is in use by another resnet-train process (PID "
                   f"{holder.pid}): two processes in one run folder would mix their "
                   "checkpoints; wait for it to end (then resume=auto continues the run), or "
                   "give another name=")  # fmt: skip
        for extra in ([], ["resume=auto"]):
            result = run_cli(*SMOKE, "data.train_size=64", "name=live", *extra, cwd=tmp_path)
            assert result.returncode == 2
            assert result.stderr.splitlines() == [f"resnet-train: error: {message}"]
        assert [p.name for p in run.iterdir()] == [".resnet-train.lock"]  # nothing written
        with pytest.raises(RunDirError, match=f"PID {holder.pid}"):  # a sweep's job: in fit()
            fit(compose_config(*SMOKE, "data.train_size=64"), run)
        # the save being written by a live process is kept; a killed one's is removed
        (run / f".last.pt.{holder.pid}.tmp").write_bytes(b"being written")
        (run / ".last.pt.999999999.tmp").write_bytes(b"killed midway")
        assert [p.name for p in remove_temporaries(run)] == [".last.pt.999999999.tmp"]
    finally:
        holder.kill()  # (SIGKILL: the operating system drops its lock)
        holder.wait()
    result = run_cli(*SMOKE, "data.train_size=64", "name=live", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # its checkpoints say their pre-activation blocks activate before the split
    from resnet_train.models.weights import PREACT_KEY, PREACT_REVISION

    assert torch.load(run / "last.pt", weights_only=True)[PREACT_KEY] == PREACT_REVISION


def test_a_sweep_with_a_job_still_training_is_refused_before_hydra_writes(tmp_path):
    """A sweep relaunched (resume=auto) while a job of it trained: Hydra rewrote that job's
    record and log before the job met the lock."""
    job = tmp_path / "outputs" / "multirun" / "swl" / "a-job"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(job)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli("-m", *SMOKE, "data.train_size=64", "seed=0,1", "name=swl",
                         "resume=auto", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"resnet-train: error: {Path('outputs/multirun/swl/a-job')} is in use by another "
            f"resnet-train process (PID {holder.pid}): two processes in one run folder would mix "
            "their checkpoints; wait for it to end (then resume=auto continues the run), or "
            "give another name="
        ]
        assert sorted(p.name for p in job.parent.iterdir()) == ["a-job"]  # no multirun.yaml
    finally:
        holder.kill()
        holder.wait()


def test_a_save_the_disk_refuses_is_one_line_and_the_checkpoint_in_place_stays_whole(tmp_path):
    """A full disk, a file-size limit, a read-only folder: two chained tracebacks, exit 1."""
    import resource

    args = [*SMOKE, "data.train_size=64", "data.test_size=16", "trainer.epochs=2", "name=full"]
    first = run_cli(*args[:-2], "trainer.epochs=1", "name=full", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "outputs" / "full"
    before = sha256(run / "last.pt")
    limit = (run / "last.pt").stat().st_size - 1000  # the next last.pt does not fit

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "resnet_train", *args, "resume=auto"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"resnet-train: error: could not save {run}/last.pt: File too large (OSError); the "
        "last.pt in place is whole, and resume=auto continues from the newest checkpoint once "
        "there is room"
    ]
    assert sha256(run / "last.pt") == before and not list(run.glob(".*.tmp"))
    again = run_cli(*args, "resume=auto", cwd=tmp_path)  # room again: it continues
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs_done"] == 2


def test_a_run_folder_that_cannot_be_made_is_one_line_naming_the_key(tmp_path):
    """A name too long, a path under a file, a link to nothing: OSError tracebacks (exit 1)."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "curves.png").write_text("my own plot")
    long = "x" * 300
    for args, message in (
        ([f"name={long}"], f"name={'x' * 40}... is invalid: 300 bytes long, and a folder name "
         "has at most 255 (the file system's limit)"),
        (["-m", f"name={long}"], "300 bytes long"),
        (["hydra.run.dir=afile/run"],
         "afile is a file: afile/run cannot be made under it; give another hydra.run.dir="),
        (["hydra.run.dir=gone/run"], f"gone is a link to {tmp_path / 'nowhere'}, which does not "
         "exist: make that folder or remove the link (it holds gone/run: hydra.run.dir)"),
        (["-m", "hydra.sweep.dir=afile"],
         "afile is a file, not a folder to write the sweep into: give another hydra.sweep.dir="),
        (["-m", "hydra.sweep.dir=afile/sweep"], "afile is a file: afile/sweep cannot be made"),
        (["hydra.run.dir=mine"], "mine holds a curves.png but no run (no checkpoint, no "
         "metrics.json): the run would write over it"),
    ):  # fmt: skip
        result = run_cli(*SMOKE, *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("resnet-train: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "gone", "mine"]
    assert (tmp_path / "mine" / "curves.png").read_text() == "my own plot"
