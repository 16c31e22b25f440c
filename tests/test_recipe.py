"""The training recipe's knobs, each checked for what it promises: label smoothing, mixed
precision, clipping, accumulation, early stopping, augmentation, EMA, determinism, diagnostics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from resnet_train.benchmarks import CountOps
from resnet_train.config import AugmentConfig, DataConfig, TrainerConfig
from resnet_train.data.transforms import Cutout, build_batch_mixer, build_transform
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.trainer import (
    NonFiniteLossError,
    Training,
    build_criterion,
    fit,
    train_one_epoch,
)
from resnet_train.precision import DTYPES
from tests.conftest import REPO, SMOKE, compose_config, run_cli
from tests.test_train import scalars

# --- the building blocks, on a network without batch statistics ---------------------------------


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def toy_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


class Writer:
    """Collects what the trainer sends to TensorBoard."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        self.scalars.setdefault(tag, []).append((step, float(value)))


def make_training(
    model: nn.Module,
    lr: float = 0.1,
    writer=None,
    fused: bool = False,
    optim: str = "sgd",
    **trainer,
) -> Training:
    cfg = TrainerConfig(device="cpu", progress=False, **trainer)
    if optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, fused=fused)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
    return Training(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
        scaler=torch.amp.GradScaler("cpu", enabled=cfg.precision == "fp16"),
        criterion=build_criterion(cfg.label_smoothing),
        device=torch.device("cpu"),
        cfg=cfg,
        step_schedule_per_batch=True,
        writer=writer,
    )


def grads_at_each_step(t: Training) -> list[list[torch.Tensor]]:
    """The gradients as the optimizer's step() sees them, one list per step."""
    seen: list[list[torch.Tensor]] = []
    t.optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.detach().clone() for p in t.model.parameters()])
    )
    return seen


def total_norm(grads: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


def test_label_smoothing_mixes_each_target_with_the_uniform_distribution():
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    log_p = logits.log_softmax(1)
    nll, uniform = -log_p.gather(1, targets[:, None]).squeeze(1), -log_p.mean(1)
    expected = (0.9 * nll + 0.1 * uniform).mean().item()
    assert build_criterion(0.1)(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert build_criterion(0.0)(logits, targets).item() == pytest.approx(nll.mean().item())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_computes_in_half_and_keeps_fp32_weights_on_the_cpu(precision):
    model = tiny_net()
    dtypes = []
    model[-1].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    t = make_training(model, lr=0.05, precision=precision)
    stats = train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), precision)
    assert set(dtypes) == {DTYPES[precision]}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(stats.loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert t.scaler.is_enabled() == (precision == "fp16")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_by_norm_bounds_the_true_gradient_and_logs_its_norm(precision):
    limit = 1e-3  # far below any gradient norm of this net at initialisation
    writer = Writer()
    t = make_training(
        tiny_net(), precision=precision, clip_grad_norm=limit, log_every_steps=1, writer=writer
    )
    grads = grads_at_each_step(t)
    train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), "clip")
    # Under fp16 the optimizer sees unscaled gradients of norm `limit`, not limit / scale.
    assert [total_norm(g) for g in grads] == pytest.approx([limit] * 4, rel=1e-3)
    logged = writer.scalars["train/grad_norm"]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert all(limit * 10 < norm < 1e3 for _, norm in logged)  # the norm before clipping


def test_clipping_by_value_caps_every_gradient_element():
    t = make_training(tiny_net(), clip_grad_value=1e-4)
    grads = grads_at_each_step(t)
    train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), "clip")
    assert len(grads) == 4
    for step in grads:
        assert max(g.abs().max().item() for g in step) == pytest.approx(1e-4)


def run_batches(sizes: list[int], k: int, precision: str = "fp32") -> Training:
    """Train tiny_net for one epoch on batches of these sizes, in order, with k-step
    accumulation."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [list(range(s, s + n)) for s, n in zip(starts, sizes, strict=True)]
    t = make_training(tiny_net(), lr=0.1, accumulate_steps=k, precision=precision)
    train_one_epoch(t, DataLoader(toy_data(sum(sizes)), batch_sampler=batches), "acc")
    return t


# bf16: about one bf16 rounding step (2**-8) at the weights' scale (~0.2).
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-6), ("bf16", 1e-3)])
def test_k_micro_batches_give_the_weights_of_one_batch(precision, tolerance):
    # 10 micro-batches of 8 with k=4: groups of 4, 4 and a last, partial group of 2, which
    # must step as one batch of 16.
    whole = run_batches([32, 32, 16], k=1, precision=precision)
    micro = run_batches([8] * 10, k=4, precision=precision)
    assert whole.global_step == micro.global_step == 3
    # The per-step schedule stepped once per optimizer step, not per micro-batch.
    assert micro.scheduler.last_epoch == 3
    assert micro.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(whole.model.parameters(), micro.model.parameters(), strict=True)
    )
    assert diff <= tolerance
    if precision == "fp32":
        fewer = run_batches([8] * 10, k=5)  # groups of 40: other weights
        assert any(
            not torch.allclose(a, b, atol=1e-4)
            for a, b in zip(whole.model.parameters(), fewer.model.parameters(), strict=True)
        )


class FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: records whether each forward-backward ran inside
    no_sync() (no gradient all-reduce)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.syncing = True
        self.synced: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.synced.append(self.syncing)
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


def test_only_the_last_micro_batch_of_a_group_all_reduces():
    model = FakeDDP(tiny_net())
    t = make_training(model.module, accumulate_steps=3)
    t.ddp = t.forward = model
    train_one_epoch(t, DataLoader(toy_data(56), batch_size=8), "ddp")  # 7 micro-batches
    assert model.synced == [False, False, True, False, False, True, True]
    assert t.global_step == 3


def test_ema_averages_the_weights_once_per_optimizer_step():
    model, decay = tiny_net(), 0.9
    t = make_training(model, accumulate_steps=2)
    t.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    manual: list[torch.Tensor] = []

    def average(*_):
        now = [p.detach().clone() for p in model.parameters()]
        manual[:] = (
            now
            if not manual
            else [decay * m + (1 - decay) * p for m, p in zip(manual, now, strict=True)]
        )

    t.optimizer.register_step_post_hook(average)
    train_one_epoch(t, DataLoader(toy_data(96), batch_size=16), "ema")  # 6 micro-batches
    assert int(t.ema.n_averaged) == 3
    for expected, ema in zip(manual, t.ema.module.parameters(), strict=True):
        torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(e, p) for e, p in zip(manual, model.parameters(), strict=True))


# --- augmentation ---------------------------------------------------------------------------------


def uint8_image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)


def plain_transform(**augment) -> v2.Compose:
    """The training transform with crop and flip off, so only the knob under test acts."""
    cfg = DataConfig(augment=AugmentConfig(crop="none", hflip=False, **augment))
    return build_transform(cfg, train=True)


@pytest.mark.parametrize(
    ("augment", "kind"),
    [
        ({"autoaugment": "cifar10"}, v2.AutoAugment),
        ({"autoaugment": "imagenet"}, v2.AutoAugment),
        ({"randaugment": True}, v2.RandAugment),
        ({"trivialaugment": True}, v2.TrivialAugmentWide),
    ],
)
def test_augmentation_policies_change_images(augment, kind):
    image, baseline = uint8_image(), plain_transform()(uint8_image())
    transform = plain_transform(**augment)
    assert any(isinstance(step, kind) for step in transform.transforms)
    outputs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert all(out.shape == baseline.shape and out.dtype == torch.float32 for out in outputs)
    assert sum(not torch.equal(out, baseline) for out in outputs) >= 4
    if "autoaugment" in augment:
        assert transform.transforms[0].policy.value == augment["autoaugment"]


def zero_box(image: torch.Tensor) -> tuple[int, int, int]:
    """(height, width, zero count) of the bounding box of the all-channel zero pixels."""
    mask = (image == 0).all(0)
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    height = int(rows.max() - rows.min() + 1) if len(rows) else 0
    width = int(cols.max() - cols.min() + 1) if len(cols) else 0
    return height, width, int(mask.sum())


def test_cutout_zeroes_one_square_after_normalisation():
    transform = plain_transform(cutout=8)
    assert isinstance(transform.transforms[-1], Cutout)
    assert zero_box(plain_transform()(uint8_image()))[2] == 0
    boxes = []
    for seed in range(30):
        torch.manual_seed(seed)
        height, width, zeros = zero_box(transform(uint8_image()))
        assert zeros == height * width and 0 < height <= 8 and 0 < width <= 8
        boxes.append((height, width))
    assert (8, 8) in boxes  # whole squares away from the border
    assert any(box != (8, 8) for box in boxes)  # clipped at the border, as in the paper


def test_random_erasing_erases_a_rectangle_with_the_given_probability():
    transform = plain_transform(random_erasing=1.0)
    torch.manual_seed(0)
    height, width, zeros = zero_box(transform(uint8_image()))
    assert zeros == height * width > 0
    torch.manual_seed(0)
    assert zero_box(plain_transform(random_erasing=0.0)(uint8_image()))[2] == 0


def test_mixup_mixes_images_and_labels_by_the_same_weight():
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8)  # distinct, so each row's weight can be read off its label
    mixer = build_batch_mixer(AugmentConfig(mixup_alpha=0.4), num_classes=10)
    torch.manual_seed(0)
    mixed, soft = mixer(images, labels)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = soft[0, 0].item()
    assert 0 < lam < 1
    partner = labels.roll(1)
    torch.testing.assert_close(soft[torch.arange(8), partner], torch.full((8,), 1 - lam))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))


def test_cutmix_label_weights_equal_the_pasted_area():
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8)
    mixer = build_batch_mixer(AugmentConfig(cutmix_alpha=1.0), num_classes=10)
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, soft = mixer(images, labels)
        kept = (mixed == images).all(1).float().mean((1, 2))  # share of own pixels per image
        pasted = (mixed == images.roll(1, 0)).all(1)
        assert torch.equal((mixed == images).all(1) | pasted, torch.ones_like(pasted))
        torch.testing.assert_close(soft[torch.arange(8), labels], kept)
    assert build_batch_mixer(AugmentConfig(), 10) is None


# --- whole runs ---------------------------------------------------------------------------------


def test_the_knobs_together_train_in_bf16_and_log_gradient_norms(tmp_path):
    cfg = compose_config(
        *SMOKE,
        "data.train_size=128",
        "data.test_size=32",
        "data.image_size=16",  # bf16 is emulated on this project's CPU: small images
        "trainer.precision=bf16",
        "trainer.label_smoothing=0.1",
        "trainer.clip_grad_norm=5.0",
        "trainer.accumulate_steps=2",
        "data.augment.mixup_alpha=0.2",
        "data.augment.cutmix_alpha=1.0",
        "data.augment.trivialaugment=true",
        "data.augment.cutout=4",
        "trainer.log_every_steps=1",
        "trainer.grad_norm_every_steps=1",
    )
    metrics = fit(cfg, tmp_path)
    assert math.isfinite(metrics["train"]["loss"]) and math.isfinite(metrics["test"]["loss"])
    tags = scalars(tmp_path)
    steps = math.ceil(math.ceil(115 / 32) / 2)  # 115 training images after the 10% split
    assert [step for step, _ in tags["train/grad_norm"]] == list(range(1, steps + 1))
    assert [step for step, _ in tags["grad_norm/conv1.weight"]] == list(range(1, steps + 1))
    assert "grad_norm/fc.weight" in tags and "grad_norm/bn1.weight" not in tags


def test_the_layer_gradient_norms_are_those_before_clipping(tmp_path):
    """grad_norm/* were read after clipping, train/grad_norm before it: with clipping on, an
    exploding branch was hidden (their root sum of squares was the clipping limit)."""
    fit(compose_config(*SMOKE, "data.train_size=64", "data.test_size=16", "data.image_size=16",
                       "trainer.clip_grad_norm=0.001", "trainer.log_every_steps=1",
                       "trainer.grad_norm_every_steps=1"), tmp_path)  # fmt: skip
    tags = scalars(tmp_path)
    layers = [tag for tag in tags if tag.startswith("grad_norm/")]
    for i, (step, total) in enumerate(tags["train/grad_norm"]):
        together = math.sqrt(sum(tags[tag][i][1] ** 2 for tag in layers))
        assert tags[layers[0]][i][0] == step
        assert 0.001 * 10 < together <= total * (1 + 1e-4)  # the weights' share of the total


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best(tmp_path, caplog):
    cfg = compose_config(
        *SMOKE,
        "data.train_size=128",
        "trainer.epochs=10",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=100",  # no epoch can beat the first by 100 points
    )
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        metrics = fit(cfg, tmp_path)
    assert metrics["epochs_run"] == 3 and metrics["epochs_total"] == 10
    reasons = [r.message for r in caplog.records if r.message.startswith("early stopping")]
    assert reasons == [metrics["stopped_early"]]
    assert "valid/acc has not improved by more than 100.0 for 2 epochs" in reasons[0]
    accs = [acc for _, acc in scalars(tmp_path)["valid/acc"]]
    assert len(accs) == 3
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == accs.index(max(accs)) + 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3


def test_monitoring_the_validation_loss_keeps_the_lowest_loss_epoch(tmp_path):
    """With monitor=valid/loss the mode follows the metric (min): best.pt and the test used the
    epoch of the highest loss while the mode stayed max."""
    cfg = compose_config(*SMOKE, "data.train_size=128", "trainer.epochs=4",
                         "trainer.early_stopping.monitor=valid/loss")  # fmt: skip
    metrics = fit(cfg, tmp_path)
    losses = [loss for _, loss in scalars(tmp_path)["valid/loss"]]
    assert len(losses) == 4 and len(set(losses)) == 4
    lowest = losses.index(min(losses)) + 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == metrics["selected_epoch"] == lowest
    assert metrics["valid"]["loss"] == pytest.approx(min(losses))
    assert load_checkpoint(tmp_path / "last.pt")["config"]["trainer"]["early_stopping"]["mode"] == (
        "min"
    )


def test_ema_weights_can_be_selected_for_best_pt(tmp_path):
    cfg = compose_config(*SMOKE, "trainer.ema.decay=0.9", "trainer.ema.select=ema")
    metrics = fit(cfg, tmp_path)
    assert metrics["selected_weights"] == "ema"
    tags = scalars(tmp_path)
    assert "valid_ema/acc" in tags and "valid/acc" in tags
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["weights"] == "ema" and last["weights"] == "raw"
    for key, value in best["model"].items():
        assert torch.equal(value, last["ema"][f"module.{key}"])
    assert not torch.equal(best["model"]["conv1.weight"], last["model"]["conv1.weight"])


def test_ema_weights_selected_without_a_validation_set_are_the_tested_best_pt(tmp_path, caplog):
    """data.valid_ratio=0 and trainer.ema.select=ema: nothing to choose with, so the last
    epoch's EMA weights are the result: best.pt holds them (what eval and export read) and the
    test uses them; last.pt keeps the raw weights to resume from. (They were dropped: the test
    used the raw weights.) Resumed from another directory, best.pt comes along."""
    ema_only = ["trainer.ema.decay=0.5", "trainer.ema.select=ema", "data.valid_ratio=0",
                "data.train_size=64", "data.test_size=32"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        metrics = fit(compose_config(*SMOKE, *ema_only), tmp_path / "a")
    assert metrics["selected_weights"] == "ema" and metrics["selected_checkpoint"] == "best.pt"
    # the start said so (it said the last checkpoint would be kept)
    assert (
        "no model selection; the last epoch's EMA weights are kept (best.pt) and evaluated "
        "on the test set" in caplog.text
    )
    best, last = (load_checkpoint(tmp_path / "a" / n) for n in ("best.pt", "last.pt"))
    assert best["weights"] == "ema" and last["weights"] == "raw"
    for key, value in best["model"].items():
        assert torch.equal(value, last["ema"][f"module.{key}"])
    assert not torch.equal(best["model"]["conv1.weight"], last["model"]["conv1.weight"])
    resume = f"resume={tmp_path / 'a' / 'last.pt'}"
    again = fit(compose_config(*SMOKE, *ema_only, "trainer.epochs=2", resume), tmp_path / "b")
    assert again["selected_weights"] == "ema" and again["selected_epoch"] == 2
    assert load_checkpoint(tmp_path / "b" / "best.pt")["weights"] == "ema"
    # The default select=best has nothing to compare without validation: the raw weights.
    raw_run = [*SMOKE, "trainer.ema.decay=0.5", "data.valid_ratio=0", "data.train_size=64",
               "data.test_size=32"]  # fmt: skip
    raw = fit(compose_config(*raw_run), tmp_path / "c")
    assert raw["selected_weights"] == "raw" and raw["selected_checkpoint"] == "last.pt"


@pytest.mark.parametrize("setting", [None, False])
def test_channels_last_is_the_cpu_default_and_can_be_turned_off(tmp_path, setting, caplog):
    """The default (null) trains in channels_last on the CPU (1.1-1.4x the images/s of the
    contiguous layout for the CIFAR models here: scripts/benchmark_variants.py)."""
    overrides = [*SMOKE, "data.train_size=64", "data.test_size=32", "data.image_size=16"]
    if setting is not None:
        overrides.append(f"trainer.channels_last={str(setting).lower()}")
    with caplog.at_level(logging.INFO, logger="resnet_train"):
        fit(compose_config(*overrides), tmp_path)
    layout = "channels_last" if setting is None else "contiguous"
    assert any(f"device cpu, fp32, {layout}" in r.getMessage() for r in caplog.records)
    weight = load_checkpoint(tmp_path / "last.pt")["model"]["conv1.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) == (setting is None)
    assert weight.is_contiguous() == (setting is False)


def test_deterministic_runs_with_workers_are_bit_identical(tmp_path):
    def run(name: str, seed: int) -> dict:
        cfg = compose_config(
            *SMOKE,
            "data.train_size=96",
            "data.num_workers=2",
            "trainer.deterministic=true",
            f"seed={seed}",
        )
        fit(cfg, tmp_path / name)
        # The run's data workers end with it (a program that trains again, a sweep's next
        # job, does not carry them along)
        assert multiprocessing.active_children() == []
        return load_checkpoint(tmp_path / name / "last.pt")

    first, second, other = run("a", 0), run("b", 0), run("c", 1)
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    for state_a, state_b in zip(
        first["optimizer"]["state"].values(), second["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    assert not torch.equal(first["model"]["conv1.weight"], other["model"]["conv1.weight"])


def test_a_diverging_run_stops_with_one_line_and_no_checkpoint(tmp_path):
    result = run_cli(*SMOKE, "optim.lr=1e30", "hydra.run.dir=run", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("resnet-train: error: the training loss is ")
    assert " at step " in lines[0] and "the step was not applied" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()
    # the run's log ends with the reason too (it ended at the last progress line)
    log = (tmp_path / "run" / "train.log").read_text().strip().splitlines()
    assert log[-1].endswith(
        f"[ERROR] - this run failed: {lines[0].removeprefix('resnet-train: error: ')}"
    )


def test_a_huge_loss_is_printed_in_four_significant_digits():
    from resnet_train.logging import loss_text

    assert loss_text(1130141577115666627952640.0) == "1.13e+24"  # was 25 digits and .0000
    assert [loss_text(x) for x in (2.30258, 99999.0, float("nan"), float("inf"))] == [
        "2.3026", "99999.0000", "nan", "inf"]  # fmt: skip


def test_a_non_finite_gradient_stops_before_the_step_is_applied():
    model = tiny_net()
    model[0].weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    t = make_training(model)
    with pytest.raises(
        NonFiniteLossError, match=r"a gradient is not finite \(inf or nan\) at step 1;"
    ):
        train_one_epoch(t, DataLoader(toy_data(32), batch_size=16), "inf")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert t.global_step == 0


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_fused_steps_from_a_non_finite_gradient_on_are_cancelled_on_the_device(optim):
    """Step 3's gradient is nan: steps 3 and 4 (finite, but after it) are not applied; the log
    step 4 reads the guard and names step 3. The weights are those before the bad step. (Fused
    AdamW also takes the flag off its step counts: a flag of the wrong shape failed every
    AdamW step, found on an H100.)"""
    model = tiny_net()
    calls = []

    def nan_on_third_step(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    model[0].weight.register_hook(nan_on_third_step)
    t = make_training(model, lr=0.01, fused=True, optim=optim, log_every_steps=4)
    after = []
    t.optimizer.register_step_post_hook(
        lambda *_: after.append([p.detach().clone() for p in model.parameters()])
    )
    message = (r"a gradient is not finite \(inf or nan\) at step 3 \(nan, found at step 4\); "
               r"the step was not applied")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=message):
        train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), "nan")
    assert not torch.equal(after[0][0], after[1][0])  # step 2 was applied
    for skipped in (after[2], after[3]):
        assert all(torch.equal(a, b) for a, b in zip(after[1], skipped, strict=True))
    if optim == "adamw":  # the cancelled steps are not counted in Adam's bias correction
        assert {float(state["step"]) for state in t.optimizer.state.values()} == {2.0}


def test_per_step_learning_rates_are_all_written_at_log_steps_epoch_ends_and_errors():
    writer = Writer()
    t = make_training(tiny_net(), fused=True, writer=writer, log_every_steps=3)
    flushed = []
    t.writer.add_scalar = lambda tag, value, step, walltime=None: flushed.append((tag, step))
    t.on_step = lambda: flushed.append(("step", t.global_step))
    train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), "lr")
    # Kept per step, written at the log step 3 (after its gradient norm, before its loss) and at
    # the epoch's end.
    assert flushed == [
        ("step", 1), ("step", 2), ("train/grad_norm", 3), ("lr", 1), ("lr", 2), ("lr", 3),
        ("train/loss_step", 3), ("step", 3), ("step", 4), ("lr", 4),
    ]  # fmt: skip

    model = tiny_net()
    calls = []
    model[0].weight.register_hook(
        lambda g: calls.append(1) or (g * math.nan if len(calls) == 3 else g)
    )
    t = make_training(model, writer=Writer(), log_every_steps=1000)  # not fused: checked at once
    with pytest.raises(NonFiniteLossError, match="at step 3;"):
        train_one_epoch(t, DataLoader(toy_data(64), batch_size=16), "nan")
    assert [step for step, _ in t.writer.scalars["lr"]] == [1, 2]


def count_device_reads(monkeypatch) -> list[str]:
    """Every read of a tensor's value into Python (what makes the host wait for the device)."""
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_steps_do_not_wait_for_the_device_between_log_steps(monkeypatch, precision):
    def reads_for(n_batches: int, log_every: int) -> int:
        t = make_training(tiny_net(), fused=True, precision=precision, log_every_steps=log_every)
        reads = count_device_reads(monkeypatch)
        train_one_epoch(t, DataLoader(toy_data(16 * n_batches), batch_size=16), "sync")
        monkeypatch.undo()
        return len(reads)

    # The number of reads does not grow with the steps: they happen at the epoch's end only...
    assert reads_for(4, 1000) == reads_for(12, 1000) <= 4
    # ...and at each log step, when asked for.
    assert reads_for(12, 2) > reads_for(12, 1000)


def operators_per_step(epoch) -> float:
    """The operators one more step of epoch(n_batches) dispatches (epoch ends left out)."""
    counts = []
    for n_batches in (4, 12):
        with CountOps() as counted:
            epoch(n_batches)
        counts.append(counted.ops)
    return (counts[1] - counts[0]) / 8


def test_a_training_step_adds_a_few_operators_to_the_bare_step():
    """The guard, the running loss and accuracy, and the scalars cost 7 operators a step on top
    of what a bare loop does (forward, loss, backward, fused SGD step, zero_grad): two for the
    finite guard, one for the loss sum, four for the accuracy."""

    def trainer(n_batches: int) -> None:
        t = make_training(tiny_net(), fused=True, writer=Writer(), log_every_steps=1000)
        train_one_epoch(t, DataLoader(toy_data(16 * n_batches), batch_size=16), "ops")

    def bare(n_batches: int) -> None:
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        criterion = build_criterion(0.0)
        for images, labels in DataLoader(toy_data(16 * n_batches), batch_size=16):
            criterion(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    assert operators_per_step(trainer) - operators_per_step(bare) == 7


def test_compiled_forward_keeps_compilation_out_of_the_epoch_time():
    """In a process of its own: dynamo's first trace in a process that has imported the whole
    test suite's modules took 60-90 s here, against about 1 s in a fresh one."""
    code = "import tests.test_recipe as t; t.check_compiled_forward()"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def check_compiled_forward() -> None:
    plain, compiled = tiny_net(), tiny_net()
    t = make_training(compiled)
    t.forward, t.compiled = (
        torch.compile(compiled, backend="eager"),
        True,
    )  # dynamo's tracing, no code generation
    loader = DataLoader(toy_data(72), batch_size=16)  # 4 batches of 16 and one of 8
    stats = train_one_epoch(t, loader, "compiled")
    # The first batch of each shape compiled: 16 + 8 images left out of images/s.
    assert t.compiled_shapes == {(16, 3, 8, 8), (8, 3, 8, 8)}
    assert stats.images == 72 and stats.untimed_images == 24 and t.warmup_seconds > 0
    assert stats.images_per_s == pytest.approx(48 / stats.seconds)
    reference = make_training(plain)
    train_one_epoch(reference, loader, "plain")
    for a, b in zip(compiled.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_trainer_compile_runs_with_inductor(tmp_path):
    """Through the CLI, in a process of its own: inductor's compile workers and caches stay out
    of the test process (its first compilation takes about half a minute on this CPU). 64
    images: 58 to train on in two batches of 29, one batch shape to compile."""
    result = run_cli(*SMOKE, "data.train_size=64", "data.batch_size=29", "data.test_size=32",
                     "trainer.compile=true", "trainer.epochs=2", "name=run", cwd=tmp_path,
                     timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "outputs" / "run" / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2 and math.isfinite(metrics["train"]["loss"])
    assert "s compiling (" in result.stdout
    assert metrics["history"][0]["compile_seconds"] > 0
    assert "No CUDA runtime is found" not in result.stdout + result.stderr  # inductor's note


def test_an_epoch_of_compile_steps_only_has_no_rate():
    """Every step a compile warm-up: no timed image, so no images/s (it said 0 img/s)."""
    from resnet_train.engine.trainer import EpochStats

    assert EpochStats(2.3, 10.0, images=58, seconds=0.0, untimed_images=58).images_per_s is None
    assert EpochStats(2.3, 10.0, images=58, seconds=2.0, untimed_images=29).images_per_s == 14.5


def test_the_step_makes_its_loss_from_images_outputs_and_labels_in_one_place():
    """Training.objective sees exactly the (mixed) images the model saw, its outputs and the
    (soft) labels; its value is the loss the step backpropagates and reports."""
    torch.manual_seed(0)
    seen = []

    def objective(images, outputs, labels):
        seen.append((images.clone(), outputs.detach().clone(), labels.clone()))
        return 2 * nn.functional.cross_entropy(outputs, labels)

    t = make_training(tiny_net())
    t.objective = objective
    t.mixer = build_batch_mixer(AugmentConfig(mixup_alpha=0.4), 10)
    loader = DataLoader(toy_data(16), batch_size=8)
    stats = train_one_epoch(t, loader, "test")
    assert len(seen) == 2
    for images, outputs, labels in seen:
        assert images.shape == (8, 3, 8, 8) and labels.shape == (8, 10)  # mixed: soft labels
        assert outputs.shape == (8, 10)
    # the reported loss is the objective's: twice the cross-entropy, averaged over the batches
    losses = [2 * nn.functional.cross_entropy(o, y).item() for _, o, y in seen]
    assert stats.loss == pytest.approx(sum(losses) / 2, rel=1e-5)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_validation_figure_that_is_not_finite_is_never_the_best(mode):
    from resnet_train.engine.early_stopping import Monitor

    monitor = Monitor("valid/loss", mode, patience=2)
    assert not monitor.update(math.nan, 1) and monitor.best is None
    assert monitor.update(5.0, 2) and monitor.best_epoch == 2  # any finite figure beats none
    for epoch, value in ((3, math.nan), (4, math.inf), (5, -math.inf)):
        assert not monitor.update(value, epoch)
    assert monitor.best == 5.0 and monitor.best_epoch == 2 and monitor.should_stop
    # out of patience with no finite figure at all: said, not a crash
    never = Monitor("valid/acc", mode, patience=2)
    never.update(math.nan, 1), never.update(math.nan, 2)
    assert never.should_stop and never.reason().endswith("for 2 epochs (no finite value yet)")


def test_ema_weights_with_a_finite_validation_beat_raw_ones_without():
    from resnet_train.engine.early_stopping import Monitor
    from resnet_train.engine.trainer import EpochStats, _select

    finite, broken = EpochStats(1.0, 60.0, 10, 1.0), EpochStats(math.nan, 10.0, 10, 1.0)
    for metric in ("valid/acc", "valid/loss"):
        monitor = Monitor(metric, "max" if metric.endswith("acc") else "min")
        assert _select({"raw": broken, "ema": finite}, "best", monitor) == "ema"
        assert _select({"raw": finite, "ema": broken}, "best", monitor) == "raw"
        assert _select({"raw": broken, "ema": broken}, "best", monitor) == "raw"


@pytest.mark.parametrize("monitored", ["valid/loss", "valid/acc"])
def test_a_run_whose_every_validation_is_nan_tests_its_last_checkpoint(tmp_path, caplog,
                                                                       monitored):  # fmt: skip
    """fp16 evaluation can overflow where training does not: no epoch is then the best one; the
    run says so and tests last.pt (it used to call a nan epoch the best). Monitoring the
    accuracy too: an accuracy beside a nan loss is an argmax over nan outputs."""
    from resnet_train.engine import trainer

    real = trainer.evaluate

    def nan_validation(model, loader, device, precision, desc, *args, **kwargs):
        stats = real(model, loader, device, precision, desc, *args, **kwargs)
        if desc.endswith(" valid"):
            stats.loss = math.nan
        return stats

    cfg = compose_config("model=resnet20", "data=synthetic", "data.train_size=96",
                         "data.test_size=32", "trainer.device=cpu", "trainer.epochs=2",
                         f"trainer.early_stopping.monitor={monitored}")  # fmt: skip
    with caplog.at_level("WARNING"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "evaluate", nan_validation)
        metrics = trainer.fit(cfg, tmp_path)
    assert not (tmp_path / "best.pt").exists()
    assert metrics["selected_checkpoint"] == "last.pt", metrics
    assert f"no epoch had a finite validation {monitored}" in caplog.text
    assert "epoch 2: the validation loss is nan (the model's outputs are not finite)" in caplog.text
    # metrics.json stays strict JSON (NaN is not JSON): the nan losses are null
    text = (tmp_path / "metrics.json").read_text()

    def refuse(constant: str) -> None:
        raise ValueError(f"metrics.json holds {constant}")

    written = json.loads(text, parse_constant=refuse)
    assert written["valid"] is None  # no best epoch
    assert [e["valid_loss"] for e in written["history"]] == [None, None]


def test_last_pt_keeps_the_best_epochs_validation_figures_and_warnings_say_what_is_true(
    tmp_path, caplog
):
    """A validation loss that rises each epoch: epoch 1 is the best, and last.pt's best_valid is
    its figures (it used to hold the last epoch's). The log does not call a batch capped that
    is not, and warns of milestones the run never reaches."""
    from resnet_train.engine import trainer

    real = trainer.evaluate
    calls = {"n": 0}

    def rising(model, loader, device, precision, desc, *args, **kwargs):
        stats = real(model, loader, device, precision, desc, *args, **kwargs)
        if desc.endswith(" valid"):
            calls["n"] += 1
            stats.loss = float(calls["n"])
        return stats

    cfg = compose_config("model=resnet20", "data=synthetic", "data.train_size=250",
                         "data.image_size=16", "data.test_size=32", "data.batch_size=32",
                         "trainer.accumulate_steps=3", "trainer.device=cpu", "trainer.epochs=3",
                         "trainer.early_stopping.monitor=valid/loss", "schedule=multistep",
                         "schedule.milestones=[2,32000]")  # fmt: skip
    with caplog.at_level("INFO"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "evaluate", rising)
        metrics = trainer.fit(cfg, tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and metrics["selected_epoch"] == 1
    assert last["best_valid"] == best["best_valid"] == metrics["valid"]
    assert last["best_valid"]["loss"] == 1.0
    text = caplog.text
    assert "global batch 96 (32 x 3 accumulation steps)," in text  # 225 images: not capped
    assert "schedule.milestones [32000] are at or beyond the end of this run's 3 epochs" in text
