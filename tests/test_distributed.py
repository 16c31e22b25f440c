"""DistributedDataParallel under torchrun, on the CPU with the gloo backend and 2 processes: the
run learns, the processes agree, rank 0 alone writes one run directory, and a preempted run
resumed with resume=auto ends bit for bit where the uninterrupted one does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_train.data.sampler import EpochSampler, ShardSampler
from resnet_train.data.tensor_loader import TensorLoader
from resnet_train.engine import distributed
from resnet_train.engine.checkpoint import load_checkpoint
from tests.conftest import compose_config, compose_hydra, run_cli

# Random crops, flips, Cutout and MixUp, 3 epochs of 15 steps of 2 x 16 images.
RUN = [
    "model=resnet20",
    "data=synthetic",
    "data.train_size=512",
    "data.batch_size=16",
    "data.augment.cutout=8",
    "data.augment.mixup_alpha=0.2",
    "trainer.epochs=3",
    "trainer.device=cpu",
    "trainer.log_every_steps=1",
    "name=run",
]


def torchrun(cwd: Path, *args: str, processes: int = 2, ours: bool = False,
             before: tuple[str, ...] = ()) -> subprocess.Popen:  # fmt: skip
    """torchrun ... -m resnet_train ARGS, or (ours) resnet-train --nproc-per-node=N ARGS;
    `before`: torchrun's options given before --nproc-per-node."""
    launcher = (["-m", "resnet_train"] if ours else
                ["-m", "torch.distributed.run"])  # fmt: skip
    tail = [] if ours else ["-m", "resnet_train"]
    return subprocess.Popen(
        [sys.executable, *launcher, *before, f"--nproc-per-node={processes}", "--standalone", *tail,
         *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300, ok: bool = False) -> str:
    """The output of the run; ok: it must end well (every process exits 0: one that failed
    after the run's test, as the HParams record once did on ranks other than 0, is caught)."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 or not ok, out
    return out


def test_each_process_gets_an_equal_disjoint_shard_with_the_single_process_seeds():
    single = EpochSampler(11, seed=5)
    single.set_epoch(2)
    pairs = list(single)
    shards = []
    for rank in range(2):
        sampler = EpochSampler(11, seed=5, rank=rank, world=2)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(sampler) == 6
    # Positions 0, 2, 4, ... and 1, 3, 5, ..., padded with the epoch's first pair.
    assert shards[0] == pairs[0::2] and shards[1] == pairs[1::2] + pairs[:1]
    assert {i for i, _ in shards[0] + shards[1]} == set(range(11))
    eval_shards = [list(ShardSampler(11, rank, 2)) for rank in range(2)]
    assert sorted(eval_shards[0] + eval_shards[1]) == list(range(11))  # each once, no padding


def test_tensor_loader_shards_the_batches_the_single_process_loader_draws():
    cfg = compose_config("data=cifar10", "data.augment.cutout=4").data
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    args = (images, labels, 10, 3, True, cfg.augment, list(cfg.mean), list(cfg.std))
    whole = torch.cat([b for b, _ in TensorLoader(*args)])  # one process, one batch
    parts = [torch.cat([b for b, _ in TensorLoader(*args, rank=r, world=3)]) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    padded = torch.cat((whole, whole[:2]))
    for rank in range(3):
        assert torch.equal(parts[rank], padded[rank::3])


@pytest.mark.slow
def test_two_processes_learn_agree_and_write_one_run_directory(tmp_path):
    # The tensor data path here; the resume test below reads through DataLoaders.
    out = finish(torchrun(tmp_path, *RUN[:-1], "data.augment.mixup_alpha=0", "name=ddp",
                          "data.loader=tensor"), ok=True)  # fmt: skip
    assert "global batch 32 (16 x 1 accumulation steps x 2 processes)" in out, out
    assert "DDP: weights identical on all 2 processes" in out
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["ddp"]
    run = tmp_path / "outputs" / "ddp"
    assert {p.name for p in run.iterdir()} >= {".hydra", "train.log", "last.pt", "best.pt",
                                              "metrics.json", "tensorboard"}  # fmt: skip
    assert len(list(run.glob("*.log"))) == 1
    # Rank 0 alone logs: each epoch's line once.
    lines = re.findall(r"epoch (\d)/3  train loss ([\d.]+)", out)
    assert [e for e, _ in lines] == ["1", "2", "3"]
    losses = [float(v) for _, v in lines]
    assert losses[2] < losses[0] * 0.8
    metrics = json.loads((run / "metrics.json").read_text())
    # 461 training images (512 less the 10% split of 51): 231 per process, one repeated.
    assert metrics["train"]["images"] == 462
    assert metrics["epochs_done"] == 3 and metrics["global_step"] == 3 * 15


@pytest.mark.slow
def test_two_processes_distil_from_one_teacher_and_agree(tmp_path):
    from resnet_train.models import create_model

    teacher = tmp_path / "teacher.pth"
    torch.save(create_model("resnet20").state_dict(), teacher)
    out = finish(torchrun(tmp_path, *RUN[:-1], "trainer.epochs=1", "data.train_size=128",
                          "name=kd", f"trainer.distill.teacher={teacher}"), ok=True)  # fmt: skip
    assert "distilling from a resnet20" in out and "DDP: 2 process(es)" in out, out
    assert "DDP: weights identical on all 2 processes" in out
    metrics = json.loads((tmp_path / "outputs" / "kd" / "metrics.json").read_text())
    assert metrics["teacher"]["path"] == str(teacher) and metrics["epochs_done"] == 1


@pytest.mark.slow
def test_preempted_ddp_run_resumes_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    out = finish(torchrun(reference, *RUN), ok=True)
    assert "weights identical on all 2 processes" in out, out

    cwd = tmp_path / "preempted"
    cwd.mkdir()
    # resnet-train starts the processes itself: a signal to it reaches both processes, which
    # save and stop, and the command exits 75 as a single process does (torchrun exits 1).
    proc = torchrun(cwd, *RUN, "trainer.checkpoint_every_steps=4", ours=True)
    last = cwd / "outputs" / "run" / "last.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # into epoch 2, then the preemption signal
        assert proc.poll() is None, proc.stdout.read()
        if last.exists():
            try:
                if torch.load(last, weights_only=True)["epoch"] >= 1:
                    break
            except Exception:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # passed on to both processes
    out = finish(proc)
    assert "stopped by SIGTERM after step" in out, out
    assert proc.returncode == 75 and "Traceback" not in out, out
    state = load_checkpoint(last)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["batch_in_epoch"] > 0 and len(state["epoch_sums"]) == 2  # mid-epoch

    out = finish(torchrun(cwd, *RUN, "resume=auto", ours=True), ok=True)
    assert "resumed from" in out and "weights identical on all 2 processes" in out, out
    ours = load_checkpoint(cwd / "outputs" / "run" / "last.pt")
    theirs = load_checkpoint(reference / "outputs" / "run" / "last.pt")
    assert ours["global_step"] == theirs["global_step"] == 3 * 15
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    for name in ("metrics.json",):
        a = json.loads((cwd / "outputs" / "run" / name).read_text())
        b = json.loads((reference / "outputs" / "run" / name).read_text())
        assert (
            a["valid"] == b["valid"]
            and a["test"] == b["test"]
            and a["train"]["loss"] == (b["train"]["loss"])
        )


def test_a_launch_with_a_bad_config_fails_in_one_line_before_any_process_starts(tmp_path):
    result = run_cli("--nproc-per-node", "2", "--standalone", "model=resnet20", "data=synthetic",
                     "optim.lr=-1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "resnet-train: error: optim.lr=-1.0 is invalid: must be > 0\n"
    assert not (tmp_path / "outputs").exists()
    # Under plain torchrun every process meets the error: rank 0 alone says it.
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    quiet = subprocess.run([sys.executable, "-m", "resnet_train", "optim.lr=-1"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert quiet.returncode == 2 and quiet.stderr == ""
    # torchrun's variables without the rendezvous's address: one line (a page of traceback)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}
    alone = subprocess.run([sys.executable, "-m", "resnet_train", "experiment=smoke", "name=a"],
                           cwd=tmp_path, env={**env, "RANK": "0", "WORLD_SIZE": "2"},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert alone.returncode == 2 and alone.stderr.startswith(
        "resnet-train: error: RANK and WORLD_SIZE are set but MASTER_ADDR and MASTER_PORT not"
    ), alone.stderr
    assert len(alone.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()
    bad = run_cli("--nproc-per-node=2", "-m", "seed=0,1", cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--nproc-per-node=2 with -m is invalid: a sweep runs its jobs one at" in bad.stderr


def test_launch_options_are_torchruns_up_to_the_first_override():
    from resnet_train.launch import split_launch_args

    assert split_launch_args(["model=resnet18"]) is None
    assert split_launch_args(["--cfg", "job"]) is None
    assert split_launch_args(["--nproc-per-node", "8", "--standalone", "model=resnet18"]) == (
        ["--nproc-per-node", "8", "--standalone"], ["model=resnet18"])  # fmt: skip
    assert split_launch_args(["--nproc_per_node=2", "--nnodes=2", "--rdzv-endpoint", "n1:29500",
                              "data=cifar10", "seed=1"]) == (
        ["--nproc_per_node=2", "--nnodes=2", "--rdzv-endpoint", "n1:29500"],
        ["data=cifar10", "seed=1"])  # fmt: skip
    # the README's two-machine command: --nproc-per-node among torchrun's options, not first
    assert split_launch_args(["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                              "experiment=imagenet_resnet50"]) == (
        ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d"],
        ["experiment=imagenet_resnet50"])  # fmt: skip
    assert split_launch_args(["--standalone", "seed=1", "--nproc-per-node=2"]) is None


def test_the_launcher_flag_where_it_is_not_taken_is_one_line_not_hydras_usage_page(tmp_path):
    """`-m --nproc-per-node=2 ...` and `key=value --nproc-per-node=2` were Hydra's usage page;
    an unknown option too."""
    for args, message in (
        (["-m", "--nproc-per-node=2", "seed=0,1"],
         "--nproc-per-node=2 with -m is invalid: a sweep runs its jobs one at a time"),
        (["--nproc_per_node=2", "--multirun", "seed=0,1"], "--nproc_per_node=2 with -m is invalid"),
        (["seed=1", "--nproc-per-node=2"],
         "--nproc-per-node=2 is invalid after 'seed=1': the launcher's options come first"),
        (["--bogus", "seed=1"], "unrecognized arguments: --bogus (resnet-train --help lists"),
        (["-m", "seed=0,1", "--lr=3"], "unrecognized arguments: --lr=3"),
        (["--cfg", "jobs"], "argument --cfg/-c: invalid choice: 'jobs'"),
    ):  # fmt: skip
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("resnet-train: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_resuming_with_another_process_count_is_refused(tmp_path):
    from resnet_train.engine.trainer import fit
    from resnet_train.errors import CheckpointError

    cfg = compose_config(*RUN[:3], "trainer.epochs=1", "trainer.device=cpu")
    fit(cfg, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["world_size"] = 2
    torch.save(state, tmp_path / "last.pt")
    cfg = compose_config(*RUN[:3], "trainer.epochs=2", "trainer.device=cpu", "resume=auto")
    with pytest.raises(CheckpointError, match="saved by 2 process.*this run has 1"):
        fit(cfg, tmp_path)


def test_the_slurm_launcher_config_composes_into_a_valid_submitit_launcher():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    cfg = compose_hydra("hydra/launcher=slurm")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 1)
    assert launcher.signal_delay_s == 180 and launcher.additional_parameters.requeue is True
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    built = instantiate(launcher)  # the launcher Hydra would start, with these settings
    assert type(built).__name__ == "SlurmLauncher" and built.params["timeout_min"] == 1440
    # Multi-node DDP: 4 nodes x 8 GPUs, a process per GPU.
    nodes = ["hydra.launcher.nodes=4", "hydra.launcher.gpus_per_node=8"]
    cfg = compose_hydra("hydra/launcher=slurm", *nodes, "hydra.launcher.tasks_per_node=8")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (4, 8)
    with pytest.raises(ConfigCompositionException):
        compose_hydra("hydra/launcher=slurm", "hydra.launcher.nodes=two")


def test_a_submitit_task_of_a_multi_task_slurm_job_joins_its_ddp_group(monkeypatch):
    pytest.importorskip("submitit")
    from resnet_train.engine.distributed import from_env

    # submitit exports RANK, WORLD_SIZE, MASTER_ADDR, ... into os.environ: give it a copy.
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    monkeypatch.setattr(os, "environ", environ)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu7",
             "SLURM_NNODES": "2", "SLURM_NODEID": "1"}  # fmt: skip
    environ.update(slurm)
    d = from_env()
    assert (d.rank, d.world, d.local_rank) == (3, 4, 1)
    assert os.environ["MASTER_ADDR"] == "gpu7" and int(os.environ["MASTER_PORT"]) > 0
    environ["SLURM_NTASKS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        del environ[key]
    assert not from_env().enabled  # one task: no DDP


FAKES = {
    "scontrol": """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then echo node1; echo node2; fi
if [ "$1" = requeue ]; then echo "$2" >> "$LOG/requeued"; fi
""",
    "srun": """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
exec "$@"
""",
    "torchrun": """#!/bin/bash
echo "$@" > "$LOG/args"
trap 'echo TERM >> "$LOG/term"; exit 75' TERM
touch "$LOG/started"
while true; do sleep 0.05; done
""",
}


def test_sbatch_script_runs_torchrun_per_node_and_requeues_on_the_stop_signal(tmp_path):
    from tests.conftest import REPO

    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log_dir),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "GPUS_PER_NODE": "4"}  # fmt: skip
    script = REPO / "scripts" / "slurm_ddp.sbatch"
    args = ["bash", str(script), "model=resnet50", "data=imagenet"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (log_dir / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends 180 s before the time limit
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (log_dir / "term").read_text() == "TERM\n"  # the run was told to stop
    assert (log_dir / "requeued").read_text() == "42\n"
    assert (log_dir / "args").read_text().split() == [
        "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=42", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node1:15042", "-m", "resnet_train", "resume=auto",
        "trainer.requeue=false", "model=resnet50", "data=imagenet",
    ]  # fmt: skip


def test_a_multirun_under_torchrun_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "resnet_train", "-m", "seed=0,1", "data=synthetic"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("resnet-train: error: -m/--multirun under torchrun")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_torchrun_with_one_process_trains_in_a_process_group_and_resumes_without(tmp_path):
    """One process under torchrun is DDP too (gloo here, NCCL on a GPU), and its checkpoint
    continues in a plain process."""
    small = ["model=resnet20", "data=synthetic", "data.train_size=64", "trainer.device=cpu",
             "name=one"]  # fmt: skip
    out = finish(torchrun(tmp_path, *small, "trainer.epochs=1", processes=1), ok=True)
    assert "global batch 32 (32 x 1 accumulation steps x 1 processes)" in out, out
    assert "DDP: weights identical on all 1 processes" in out
    state = load_checkpoint(tmp_path / "outputs" / "one" / "last.pt")
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    result = subprocess.run(
        [sys.executable, "-m", "resnet_train", *small, "trainer.epochs=2", "resume=auto"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "outputs" / "one" / "last.pt")["epoch"] == 2


@pytest.mark.parametrize(("name", "launched", "expected"), [
    ("cuda", False, "cuda:0"), ("cuda", True, "cuda:1"), ("cuda:1", False, "cuda:1"),
])  # fmt: skip
def test_a_cuda_device_without_an_index_gets_this_processs_gpu(
    monkeypatch, name, launched, expected
):
    """torch.cuda.set_device refuses a device with no index: "cuda" must become cuda:N first."""
    from torch._utils import _get_device_index

    chosen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(
        _get_device_index(device)))  # fmt: skip
    d = (
        distributed.Dist(rank=1, world=2, local_rank=1, launched=True)
        if launched
        else distributed.Dist()
    )
    device = distributed.device_for(name, d)
    assert str(device) == expected and chosen == [device.index]


def test_the_slurm_launcher_off_a_cluster_is_one_line(monkeypatch, capsys):
    from resnet_train import cli

    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch
    monkeypatch.setattr(sys, "argv", ["resnet-train", "-m", "hydra/launcher=slurm", "seed=1,2"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "resnet-train: error: hydra/launcher=slurm is invalid here: this machine has no SLURM (no "
        "sbatch on PATH); run it on the cluster's login node, or leave hydra/launcher out to run "
        "the jobs here\n"
    )


def test_ranks_other_than_0_run_without_a_hydra_record(monkeypatch):
    """Under torchrun, rank 0 alone writes .hydra/ into the shared run directory."""
    from resnet_train import cli

    seen = {}
    monkeypatch.setattr(cli, "precheck", lambda args, cfg: None)
    monkeypatch.setattr(cli, "run_single", lambda cfg: seen.setdefault("cfg", cfg))
    for rank, subdir in (("1", None), ("0", ".hydra")):
        seen.clear()
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(sys, "argv", ["resnet-train", "model=resnet20"])
        cli.main()
        assert seen["cfg"].hydra.output_subdir == subdir


def test_a_resume_with_another_process_count_is_refused_before_anything_is_written(tmp_path):
    """The refusal came from inside the run, after Hydra had rewritten the run's .hydra/ record
    (with the refused command's overrides) and appended to its train.log."""
    from tests.conftest import SMOKE

    assert run_cli(*SMOKE, "data.train_size=64", "name=one", cwd=tmp_path).returncode == 0
    run = tmp_path / "outputs" / "one"
    before = {p: p.read_bytes() for p in [run / "train.log", *(run / ".hydra").iterdir()]}
    result = run_cli("--nproc-per-node=2", "--standalone", *SMOKE, "data.train_size=64",
                     "trainer.epochs=2", "name=one", "resume=auto", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"resnet-train: error: {run.relative_to(tmp_path)}/last.pt was saved by 1 process(es), "
        "this run has 2: resume it with 1 (resnet-train's or torchrun's --nproc-per-node x nodes "
        "= 1)"
    )
    assert {p: p.read_bytes() for p in before} == before


def test_evaluation_splits_smaller_than_the_process_count_are_counted_once(tmp_path):
    """A process with no validation or test image skipped the sum the others made: the test
    split of 1 image broke the process group (gloo's mismatch, signal 6), the validation split
    of 1 hung. (--nnodes before --nproc-per-node, as in the README's two-machine command.)"""
    out = finish(torchrun(tmp_path, "experiment=smoke", "trainer.epochs=1",
                          "data.train_size=40", "data.valid_ratio=0.025", "data.test_size=1",
                          "data.batch_size=8", "name=tiny", ours=True, before=("--nnodes=1",)),
                 timeout=240, ok=True)  # fmt: skip
    assert "weights identical on all 2 processes" in out, out
    metrics = json.loads((tmp_path / "outputs" / "tiny" / "metrics.json").read_text())
    assert metrics["test"]["acc"] in (0.0, 100.0) and metrics["valid"]["acc"] in (0.0, 100.0)
    assert sum(v is not None for v in metrics["test"]["per_class_recall"].values()) == 1


def test_the_launcher_refuses_bad_torchrun_options_and_other_tasks_in_one_line(tmp_path):
    import socket

    for args, message in (
        (["--nnodes=0"], "--nnodes=0 is invalid: a number of machines >= 1"),
        (["--nnodes=2:1"], "--nnodes=2:1 is invalid"),
        (["--bogus"], "torchrun's options are expected (unrecognized arguments: --bogus)"),
        (["--standalone", "task=summary"], "task=summary runs in one process"),
    ):
        result = run_cli("--nproc-per-node=2", *args, "experiment=smoke", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("resnet-train: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    with socket.socket() as taken:  # a rendezvous port in use: one line, not 43
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--nproc-per-node=2", f"--master-port={port}", "experiment=smoke",
                         "name=p", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"resnet-train: error: the rendezvous port {port} is in use (EADDRINUSE): give another "
        "--master-port, or --standalone to pick a free one"
    )
    assert not (tmp_path / "outputs").exists()


def test_a_killed_process_is_one_line_and_its_unnamed_run_resumes_only_with_its_count(tmp_path):
    """A SIGKILLed process made the other print a page of gloo traceback; an unnamed run
    resumed with another process count started a new run in another folder (the count names
    it), where a named one is refused."""
    args = [a for a in RUN if a != "name=run"]
    proc = torchrun(tmp_path, *args, "trainer.checkpoint_every_steps=4", ours=True)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("outputs/*/last.pt")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "resnet_train"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
    assert len(children) == 2, children  # the two processes of the run
    os.kill(int(children[-1]), signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert "Traceback" not in out, out
    assert "another process of the run ended" in out and "was killed by signal 9" in out
    (run,) = (tmp_path / "outputs").iterdir()
    one = run_cli(*args, "resume=auto", cwd=tmp_path)
    assert one.returncode == 2, one.stderr
    assert one.stderr.strip() == (
        f"resnet-train: error: resume=auto: {run.relative_to(tmp_path)} holds this run, saved by "
        "2 process(es); this run has 1: resume it with 2 (resnet-train's or torchrun's "
        "--nproc-per-node x nodes = 2; an unnamed run's folder is named by its process count "
        "too)"
    )
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run.name]


def test_a_stop_signal_while_waiting_for_the_other_processes_ends_the_process(tmp_path):
    """Held for a run that never starts (the peer never comes), a SIGTERM was swallowed for
    the 30 minutes torch waits."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen([sys.executable, "-m", "resnet_train", "experiment=smoke",
                             "name=alone"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "outputs" / "alone" / "train.log").exists():  # Hydra's, then fit
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    time.sleep(3)  # into the rendezvous
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGTERM
    assert not list((tmp_path / "outputs" / "alone").glob("*.pt"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("after", [1.0, 3.0])
def test_a_ctrl_c_while_the_launcher_starts_is_one_line(tmp_path, after):
    """It was a traceback of the import it broke (torch's), or of torchrun's start."""
    proc = torchrun(tmp_path, "experiment=smoke", "name=c", ours=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out = finish(proc, timeout=120)
    if proc.returncode == 0:  # (finished first on a fast machine)
        return
    assert proc.returncode == 130, out
    assert "Traceback" not in out and out.count("resnet-train: interrupted") == 1, out
