"""The CUDA paths: mixed precision, fused optimizers, torch.compile, channels_last, the tensor
data path and the nvJPEG decoder on the device, determinism, kill and resume, NCCL. Each test is
marked `cuda` and skipped where torch.cuda.is_available() is false (CI, this project's CPU
machines); `pytest -m cuda` runs them on a GPU box, and scripts/gpu_proof.py does so first."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from resnet_train import create_model
from resnet_train.config import AugmentConfig
from resnet_train.data import build_loaders
from resnet_train.data.tensor_loader import TensorLoader
from resnet_train.engine import faults
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.trainer import NonFiniteLossError, fit
from resnet_train.precision import autocast
from tests.conftest import compose_config, make_image_folders, run_cli
from tests.test_train import scalars

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# ResNet-20 on 256 synthetic images: seconds on any GPU.
CUDA = ["model=resnet20", "data=synthetic", "data.train_size=256", "data.test_size=64",
        "trainer.device=cuda", "trainer.log_every_steps=1"]  # fmt: skip
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_learns_and_keeps_fp32_weights(precision, tmp_path):
    metrics = fit(compose_config(*CUDA, "trainer.epochs=4", f"trainer.precision={precision}"),
                  tmp_path)  # fmt: skip
    losses = [record["train_loss"] for record in metrics["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
    state = load_checkpoint(tmp_path / "last.pt")
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)  # fp32 master weights
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the gradient scaler ran


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_fused_optimizers_on_cuda_stop_a_run_whose_gradient_is_not_finite(optim, tmp_path):
    cfg = compose_config(*CUDA, f"optim={optim}", "optim.lr=1e30", "trainer.epochs=2",
                         "trainer.log_every_steps=1000")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r" at step \d+.*the step was not applied"):
        fit(cfg, tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_compile_on_cuda_trains_and_leaves_its_warm_up_out_of_the_figures(tmp_path):
    metrics = fit(compose_config(*CUDA, "trainer.epochs=2", "trainer.compile=true",
                                 "trainer.precision=bf16"), tmp_path)  # fmt: skip
    first, second = metrics["history"]
    assert first["compile_seconds"] > 0 and second["compile_seconds"] == 0
    # The compilation takes far longer than training 230 images: counted, it would dominate.
    assert first["train_seconds"] < first["compile_seconds"]
    assert math.isfinite(second["train_loss"]) and second["images_per_s"] > 0


def test_compile_with_cuda_graphs_trains_like_the_default_mode(tmp_path):
    """reduce-overhead replays each pass as a CUDA graph: the same arithmetic, so the first
    step's loss (same weights, same batch) equals the default mode's to rounding, every step is
    taken and logged, and the epochs' losses stay close. Later steps drift apart a little: the
    two runs' kernels (cudnn.benchmark's choices, TF32) round differently and training amplifies
    it (seen on an H100: epoch losses 0.16% apart after 16 steps)."""
    runs, steps = {}, {}
    for mode in ("default", "reduce-overhead"):
        cfg = compose_config(*CUDA, "trainer.epochs=2", "trainer.compile=true",
                             f"trainer.compile_mode={mode}")  # fmt: skip
        runs[mode] = fit(cfg, tmp_path / mode)
        steps[mode] = scalars(tmp_path / mode)["train/loss_step"]
    default, graphs = (runs[m]["history"] for m in ("default", "reduce-overhead"))
    assert [r["epoch"] for r in graphs] == [1, 2] and graphs[1]["compile_seconds"] == 0
    assert [s for s, _ in steps["reduce-overhead"]] == [s for s, _ in steps["default"]]
    assert len(steps["default"]) == 16  # 230 training images, batch 32: 8 steps an epoch
    first = steps["default"][0][1]
    assert steps["reduce-overhead"][0][1] == pytest.approx(first, rel=1e-3)
    for a, b in zip(default, graphs, strict=True):
        assert math.isfinite(b["train_loss"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2)


def test_channels_last_and_contiguous_give_the_same_first_step_loss_in_bf16():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=g).cuda()
    targets = torch.randint(0, 10, (64,), generator=g).cuda()
    losses = []
    for memory in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = create_model("resnet20").cuda().to(memory_format=memory)
        with autocast(torch.device("cuda"), "bf16"):
            out = model(images.contiguous(memory_format=memory))
            losses.append(torch.nn.functional.cross_entropy(out.float(), targets).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)  # bf16 keeps ~3 significant digits


def test_tensor_loader_on_cuda_yields_exactly_the_cpu_batches():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,), generator=g)
    augment = AugmentConfig(cutout=8)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = TensorLoader(images.to(device), labels.to(device), 64, 7, True, augment,
                              MEAN, STD)  # fmt: skip
        loader.set_epoch(3)
        batches[device] = [(x.cpu(), y.cpu()) for x, y in loader]
    assert len(batches["cpu"]) == len(batches["cuda"]) == 5
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert torch.equal(y_cpu, y_gpu) and torch.equal(x_cpu, x_gpu)


def test_gpu_decoder_batches_equal_the_cpu_decoders_within_rounding(tmp_path):
    """nvJPEG's inverse DCT and the GPU resize round differently from libjpeg-turbo and the CPU
    resize; the stated tolerance: on the 0-255 scale, a mean absolute difference under 2 levels
    and 99% of values within 8 (a different crop or flip would be off by tens). The JPEGs keep
    full chroma (4:4:4): the two decoders also upsample 4:2:0 chroma differently, which on these
    pure-noise images cost a mean of 3.7 levels and up to 58 (H100, 2026-11-27); on photographs,
    whose chroma is smooth, that difference is small."""
    root = make_image_folders(tmp_path, classes=2, per_class=6, size=64, jpeg_every=2,
                              jpeg_subsampling=0, exif_orientations=True)  # fmt: skip
    common = ["data=imagenet", f"data.root={root}", "data.num_classes=2", "data.image_size=48",
              "data.eval_resize=56", "data.batch_size=4", "data.valid_ratio=0",
              "data.num_workers=0"]  # fmt: skip
    batches = {}
    for decoder, device in (("torchvision", "cpu"), ("gpu", "cuda")):
        cfg = compose_config(*common, f"data.decoder={decoder}", f"trainer.device={device}")
        loaders = build_loaders(cfg.data, seed=3, device=torch.device(device))
        loaders.train.sampler.set_epoch(1)
        batches[decoder] = [next(iter(loaders.train))[0].cpu(), next(iter(loaders.test))[0].cpu()]
    std = torch.tensor(compose_config(*common).data.std).view(1, 3, 1, 1) * 255
    for cpu, gpu in zip(batches["torchvision"], batches["gpu"], strict=True):
        levels = ((cpu - gpu).abs() * std).flatten()
        assert levels.mean() < 2 and torch.quantile(levels, 0.99) <= 8, levels.max()


def test_deterministic_runs_on_cuda_are_bit_identical(tmp_path):
    args = [*CUDA, "trainer.epochs=2", "trainer.deterministic=true", "data.augment.cutout=8",
            "data.augment.mixup_alpha=0.2"]  # fmt: skip
    fit(compose_config(*args), tmp_path / "a")
    fit(compose_config(*args), tmp_path / "b")
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("a", "b"))
    assert same_weights(a["model"], b["model"])
    assert scalars(tmp_path / "a")["train/loss_step"] == scalars(tmp_path / "b")["train/loss_step"]


def test_killed_on_cuda_and_resumed_ends_bit_identical(tmp_path):
    args = [*CUDA, "trainer.epochs=3", "trainer.deterministic=true", "data.augment.cutout=8",
            "trainer.checkpoint_every_steps=3", "name=run"]  # fmt: skip
    reference = tmp_path / "reference"
    reference.mkdir()
    assert run_cli(*args, cwd=reference).returncode == 0
    killed = subprocess.run(
        [sys.executable, "-m", "resnet_train", *args],
        cwd=tmp_path, env={**os.environ, faults.ENV: "step:11:KILL"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")["global_step"] == 9
    resumed = run_cli(*args, "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    ours = load_checkpoint(tmp_path / "outputs" / "run" / "last.pt")
    theirs = load_checkpoint(reference / "outputs" / "run" / "last.pt")
    assert ours["global_step"] == theirs["global_step"] == 24
    assert same_weights(ours["model"], theirs["model"])


def test_torchrun_with_one_process_trains_over_nccl(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "resnet_train", *CUDA, "trainer.epochs=2", "name=ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "DDP: 1 process(es), nccl backend" in out
    assert "DDP: weights identical on all 1 processes" in out
    assert (tmp_path / "outputs" / "ddp" / "metrics.json").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_on_cuda_never_wait_for_the_device_between_log_steps(precision):
    """Steps 2 to 7 of 8 run under CUDA's sync debug mode "error": any wait for the device (a
    value read into Python, a blocking copy) in the step or the trainer's bookkeeping raises."""
    from resnet_train.config import TrainerConfig
    from resnet_train.engine.trainer import Training, build_criterion, train_one_epoch

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, stem="cifar").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    cfg = TrainerConfig(device="cuda", precision=precision, progress=False, log_every_steps=1000)
    t = Training(
        model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
        criterion=build_criterion(0.0), device=device, cfg=cfg,
    )  # fmt: skip
    batches = [(torch.randn(32, 3, 32, 32, device=device),
                torch.randint(0, 10, (32,), device=device)) for _ in range(8)]  # fmt: skip

    class Loader(list):
        dataset = range(32 * 8)

    modes = []

    def on_step() -> None:
        mode = "error" if t.global_step < 7 else "default"
        torch.cuda.set_sync_debug_mode(mode)
        modes.append(mode)

    t.on_step = on_step
    try:
        stats = train_one_epoch(t, Loader(batches), "sync")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert modes.count("error") == 6 and math.isfinite(stats.loss)
