"""The training run: fit() calls train_one_epoch() and evaluate(), keeps checkpoints and logs."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from resnet_train.config import CUDA_GRAPH_MODES, TrainerConfig, complete, to_dict
from resnet_train.data import build_loaders
from resnet_train.data.folders import check_same_files
from resnet_train.data.loaders import class_names, close_loaders, data_fingerprint
from resnet_train.data.settle import settle_data
from resnet_train.data.transforms import build_batch_mixer
from resnet_train.engine import distributed, faults, runlock
from resnet_train.engine.checkpoint import (
    FORMAT_VERSION,
    copy_checkpoint,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from resnet_train.engine.distill import DistillLoss, Teacher, check_same_teacher, load_teacher
from resnet_train.engine.distributed import Dist
from resnet_train.engine.early_stopping import Monitor
from resnet_train.engine.plan import StepPlan, plan_steps
from resnet_train.engine.preemption import Preempted, StopSignals, requeue_slurm_job
from resnet_train.engine.resume import (
    ResumePoint,
    capture_rng,
    check_config,
    check_end_not_passed,
    check_not_finished,
    check_world_size,
    find_resume,
    finished,
    finished_metrics,
    finished_note,
    keep_run_length,
    own_run_length,
    record_run_length,
    restore_rng,
    set_aside_unread,
)
from resnet_train.errors import CheckpointError
from resnet_train.logging import (
    log,
    loss_text,
    progress_bar,
    tensorboard_writer,
    write_json,
)
from resnet_train.models.build import build_model, build_resumed_model
from resnet_train.models.channels import channels_of
from resnet_train.models.freeze import freeze, hold_norms
from resnet_train.models.qat import prepare_qat
from resnet_train.models.weights import PREACT_KEY, PREACT_REVISION, check_preact_revision
from resnet_train.optim import (
    build_optimizer,
    build_scheduler,
    configured_momentum,
    cycled_momentum_floor,
    depends_on_length,
    group_lrs,
    main_lr,
    onecycle_rates,
    rebuild_scheduler,
)
from resnet_train.precision import autocast, channels_last_for

# Per-class recall goes to TensorBoard (valid_recall/<class>) for data sets of up to this many
# classes.
MAX_CLASS_SCALARS = 20
# Tqdm's loss/accuracy figures are read from the device every this many steps, not every step.
BAR_REFRESH_STEPS = 10
# Under fp16 the gradient scaler skips steps whose gradients overflow and lowers its scale; this
# many skipped in a row means the gradients are not finite at any scale: the run stops.
MAX_SKIPPED_STEPS = 20


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the step was not applied."""


@dataclass
class EpochStats:
    loss: float
    acc: float  # top-1 accuracy, percent
    images: int
    seconds: float  # without the compile warm-up
    untimed_images: int = 0  # images of the compile warm-up steps
    # Evaluation: images and correct predictions per class (by label).
    class_total: list[int] | None = None
    class_correct: list[int] | None = None

    @property
    def images_per_s(self) -> float | None:
        """None where no step was timed (each was a compile warm-up step)."""
        timed = self.images - self.untimed_images
        return timed / self.seconds if self.seconds > 0 and timed > 0 else None

    @property
    def recall(self) -> list[float | None] | None:
        """Per-class recall (accuracy on the class's images) in %, None for a class with none."""
        if self.class_total is None or self.class_correct is None:
            return None
        return [100 * c / n if n else None
                for c, n in zip(self.class_correct, self.class_total, strict=True)]  # fmt: skip

    @property
    def balanced_acc(self) -> float | None:
        """The mean per-class recall over the classes present (Brodersen et al. 2010): the
        accuracy a set with every class equally large would give."""
        present = [r for r in self.recall or [] if r is not None]
        return sum(present) / len(present) if present else None

    @property
    def imbalanced(self) -> bool:
        """Whether the classes present have different numbers of images."""
        counts = {n for n in self.class_total or [] if n}
        return len(counts) > 1

    def per_class(self, names: list[str]) -> dict[str, float | None] | None:
        """Per-class recall by class name (classes beyond `names`, a model's extra outputs,
        left out)."""
        recall = self.recall
        return None if recall is None else dict(zip(names, recall[: len(names)], strict=False))

    def summary(self, names: list[str]) -> dict[str, Any]:
        """What metrics.json keeps of an evaluation."""
        return {"loss": self.loss, "acc": self.acc, "balanced_acc": self.balanced_acc,
                "per_class_recall": self.per_class(names)}  # fmt: skip


@dataclass
class EpochSums:
    """Running sums over an epoch's training batches; a mid-epoch checkpoint keeps them, so the
    epoch's figures come out the same after a resume."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    batches: int = 0
    seconds: float = 0.0
    untimed_images: int = 0
    lr: float | None = None  # the rate at the epoch's start (what its summary line shows)

    @classmethod
    def zeros(cls, device: torch.device) -> EpochSums:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.detach().cpu(),
            "correct": self.correct.detach().cpu(),
            "seen": self.seen,
            "batches": self.batches,
            "seconds": self.seconds,
            "untimed_images": self.untimed_images,
            "lr": self.lr,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochSums:
        return cls(
            state["loss"].to(device),
            state["correct"].to(device),
            state["seen"],
            state["batches"],
            state["seconds"],
            state.get("untimed_images", 0),
            state.get("lr"),
        )

    def stats(self) -> EpochStats:
        """The epoch's figures; under DDP summed over all processes (images/s of them all)."""
        loss, correct = self.loss.detach().float(), self.correct
        seen, untimed = self.seen, self.untimed_images
        if distributed.world_size() > 1:
            loss, correct = distributed.all_reduce_sum(loss), distributed.all_reduce_sum(correct)
            counts = torch.tensor([seen, untimed], device=loss.device)
            seen, untimed = distributed.all_reduce_sum(counts).tolist()
        n = max(seen, 1)
        return EpochStats(loss.item() / n, 100 * correct.item() / n, seen, self.seconds, untimed)


@dataclass
class Training:
    """What an optimizer step reads and changes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    cfg: TrainerConfig
    step_schedule_per_batch: bool = False
    ema: AveragedModel | None = None
    mixer: Any = None
    writer: Any = None
    global_step: int = 0
    # The current epoch's running sums; train_one_epoch continues from them.
    sums: EpochSums | None = None
    # Called after every optimizer step (checkpoints, stop signals).
    on_step: Callable[[], None] | None = None
    guard: FiniteGuard | None = None
    # torch.compile'd model for the training forward pass, the batch shapes it has compiled,
    # and the seconds spent compiling (left out of the epoch's time and images/s).
    forward: nn.Module | None = None
    compiled: bool = False
    compiled_shapes: set = field(default_factory=set)
    # compiled with CUDA graphs: each step starts a new graph replay (the last step's outputs,
    # which the replay overwrites, are no longer read)
    cuda_graphs: bool = False
    warmup_seconds: float = 0.0
    memory_format: torch.memory_format = torch.contiguous_format
    # Per-step scalars not yet written: (step, time, lr, {group: lr}); see flush_step_scalars.
    step_scalars: list[tuple[int, float, float, dict[str, float]]] = field(default_factory=list)
    # The learning rate the last optimizer step took (what the progress lines show).
    step_lr: float | None = None
    # Under torchrun: the DistributedDataParallel wrapper of `model` and this process's place.
    ddp: nn.Module | None = None
    dist: Dist = field(default_factory=Dist)
    # The training loss from (images, outputs, labels); by default the criterion's on the labels.
    objective: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # BatchNorm layers kept in eval mode while training (model.freeze, model.freeze_bn).
    held_norms: list[nn.Module] = field(default_factory=list)
    # For the time left in progress lines: epochs after the current one, and the seconds the
    # last epoch's evaluations took.
    epochs_after: int = 0
    eval_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = LabelLoss(self.criterion)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls on CUDA (torch's reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        # torch.use_deterministic_algorithms imports torch._inductor (about 2 s of start-up on a
        # CPU): called only to turn off what an earlier run in this process turned on.
        if torch.are_deterministic_algorithms_enabled():
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def cpu_half_is_fast(precision: str) -> bool:
    """Whether this CPU computes the half precision natively (the flags of /proc/cpuinfo:
    AVX-512 FP16 / BF16 or AMX); False where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    wanted = {"fp16": {"avx512_fp16", "amx_fp16"}, "bf16": {"avx512_bf16", "amx_bf16"}}
    return bool(flags & wanted[precision])


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_criterion(label_smoothing: float, weight: torch.Tensor | None = None) -> nn.Module:
    """Training loss: cross-entropy on int labels, or on the soft labels of MixUp / CutMix, with
    label smoothing (Szegedy et al. 2016) mixing each target with the uniform distribution;
    `weight`, one per class, weights each image's loss by its class (data.balance=loss)."""
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """data.balance=loss: n / (classes x count) per class (each class weighs as much in the
    loss as it would with equal counts); 0 for a class without training images."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.from_numpy(weights).float()


class LabelLoss:
    """The training objective of a plain run: the criterion on the outputs and the labels (MixUp's
    and CutMix's soft labels included). The step makes its loss in one call,
    objective(images, outputs, labels), so that an objective that needs the images (a teacher's
    view of them, for distillation) is another objective, not another branch of the step."""

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion

    def __call__(
        self, images: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.criterion(outputs, labels)


# Without a terminal, a progress line every trainer.log_every_steps optimizer steps or every this
# many seconds, whichever comes first.
PROGRESS_LINE_SECONDS = 60.0


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """The progress bar's figures as log lines (no terminal): epoch, batch, running loss and
    accuracy, images/s, learning rate, time left for the epoch and the run. The figures are read
    from the device only when a line is due (log steps sync anyway; the 60 s rule at most once a
    minute)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last = start

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or time.perf_counter() - self.last >= PROGRESS_LINE_SECONDS

    def write(self, t: Training, desc: str, done: int, n_batches: int, first: int) -> None:
        now = time.perf_counter()
        self.last = now
        sums = t.sums
        per_batch = (now - self.start) / max(done, 1)
        epoch_left = per_batch * (n_batches - first - done)
        run_left = epoch_left + t.epochs_after * (per_batch * n_batches + t.eval_seconds)
        images = sums.seen - sums.untimed_images
        rate = images / sums.seconds if sums.seconds > 0 else 0.0
        log.info(
            "%s  batch %d/%d  loss %s acc %.2f%%  %.0f img/s  lr %.4g  epoch left %s  run "
            "left %s",
            desc, first + done, n_batches, loss_text(sums.loss.item() / max(sums.seen, 1)),
            100 * sums.correct.item() / max(sums.seen, 1), rate,
            main_lr(t.optimizer) if t.step_lr is None else t.step_lr,
            duration(epoch_left), duration(run_left),
        )  # fmt: skip


def _layer_grad_norms(t: Training) -> list[tuple[str, torch.Tensor]]:
    """Each weight's gradient norm, on the device: taken before clipping, as train/grad_norm is
    (after it, a clipped run's curves hid the branch that exploded)."""
    return [(name, p.grad.norm()) for name, p in t.model.named_parameters()
            if p.grad is not None and p.ndim > 1]  # fmt: skip


def _log_grad_norms(t: Training, norms: list[tuple[str, torch.Tensor]]) -> None:
    for name, norm in norms:
        t.writer.add_scalar(f"grad_norm/{name}", norm.item(), t.global_step)


class FiniteGuard:
    """Watches every optimizer step for a loss or gradient that is not finite, on the device, in
    two small kernels a step and no wait: the gradients and the epoch's running loss sum are
    checked in one fused pass per dtype (the kernel GradScaler uses, at scale 1: the values stay
    as they are) into a flag that stays set, and a counter adds the flag up. With a fused
    optimizer the flag cancels the step on the device (`found_inf`), so from the first bad step
    on no step is applied; the counter says which step that was. Both are read only at sync
    points (log steps, epoch ends, checkpoints). fp16 steps are the scaler's: it skips them, and
    the longest run of skipped steps is kept here."""

    def __init__(self, device: torch.device) -> None:
        self.found = torch.zeros((), device=device)  # set (1.0) from the first bad step on
        self.bad_steps = torch.zeros(1, device=device)  # steps since then, that one included
        self.one = torch.ones((), device=device)
        self.loss_sum: torch.Tensor | None = None  # the running loss sum last watched
        self.skips = torch.zeros((), dtype=torch.long, device=device)  # fp16: skipped in a row
        self.most_skips = torch.zeros((), dtype=torch.long, device=device)
        self.most_skips_step = torch.zeros((), dtype=torch.long, device=device)

    def watch(self, loss_sum: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """Check this step's gradients and the running loss sum (not finite as soon as one of
        its losses is not); return the flag (1.0 on the device where this or an earlier step
        was not finite). A fused pass, not one norm per parameter: a step's host time is what a
        fast GPU run waits for (ResNet-18 on CIFAR, H100: a per-parameter norm cost ~60 more
        operators a step, ~8% of the step)."""
        self.loss_sum = loss_sum
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {loss_sum.dtype: [loss_sum.view(1)]}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.found, self.one)
        self.bad_steps.add_(self.found)
        return self.found

    def record_skip(self, step: int, skipped: torch.Tensor) -> None:
        self.skips = torch.where(skipped, self.skips + 1, 0)
        longer = self.skips > self.most_skips
        self.most_skips_step = torch.where(longer, step, self.most_skips_step)
        self.most_skips = torch.maximum(self.most_skips, self.skips)

    def check(self, now: int, desc: str) -> None:
        """Raise NonFiniteLossError if a step went wrong (one read from the device)."""
        bad, skips = (int(v) for v in torch.cat((self.bad_steps, self.most_skips.view(1))).tolist())
        if bad:
            step = now - bad + 1
            where = f"step {step} ({desc}, found at step {now})" if step != now else f"step {step}"
            loss = self.loss_sum.item() if self.loss_sum is not None else 0.0
            what = (
                f"the training loss is {loss}"
                if not math.isfinite(loss)
                else "a gradient is not finite (inf or nan)"
            )
            raise NonFiniteLossError(
                f"{what} at {where}; the step was not applied and the last checkpoint is untouched"
            )
        if skips >= MAX_SKIPPED_STEPS:
            raise NonFiniteLossError(
                f"the fp16 gradient scaler skipped {skips} steps in a row up to step "
                f"{int(self.most_skips_step)} ({desc}): the gradients are not finite at any "
                "scale; the last checkpoint is untouched"
            )


def _optimizer_step(t: Training, log_now: bool, desc: str) -> None:
    """Unscale (fp16), clip, check, step the optimizer, the scaler, the EMA and a per-step
    schedule. In fp32 and bf16 a step whose loss or gradient is not finite is not applied, nor
    any after it (cancelled on the device for fused optimizers, else checked at once), and the
    run stops at the next check; in fp16 the scaler skips such steps, and MAX_SKIPPED_STEPS in
    a row stop the run."""
    cfg = t.cfg
    # The optimizer's parameters: walking the module tree each step cost ~0.1 ms (ResNet-20).
    params = [p for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [p.grad for p in params]  # clipping changes them in place
    step = t.global_step + 1
    layer_norms_now = cfg.grad_norm_every_steps and step % cfg.grad_norm_every_steps == 0
    fp16 = t.scaler.is_enabled()
    if t.guard is None:
        t.guard = FiniteGuard(t.device)
    if fp16 and (cfg.clip_grad_norm or cfg.clip_grad_value or log_now or layer_norms_now):
        t.scaler.unscale_(t.optimizer)  # clipping and norms see the true gradients
    layer_norms = _layer_grad_norms(t) if layer_norms_now and t.writer is not None else None
    grad_norm = None
    if cfg.clip_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    elif log_now:  # (before a value clip: train/grad_norm is the norm before clipping)
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if cfg.clip_grad_value:
        torch.nn.utils.clip_grad_value_(params, cfg.clip_grad_value)
    if not fp16:
        bad = t.guard.watch(t.sums.loss, grads)
        if t.optimizer.defaults.get("fused"):
            t.optimizer.found_inf = bad  # the fused step is skipped on the device
        else:
            t.guard.check(step, desc)  # waits for the device: stop before the step
    else:
        # The scaler skips the steps whose gradients are not finite; a loss that is not finite
        # (the forward pass overflowed, or the weights did) stops the run as in fp32 and bf16.
        t.guard.watch(t.sums.loss, [])
    t.global_step = step
    t.step_lr = main_lr(t.optimizer)  # (before a per-step schedule moves it)
    if t.writer is not None:
        if layer_norms is not None:
            _log_grad_norms(t, layer_norms)
        # This step's rates, written at the next flush.
        t.step_scalars.append((step, time.time(), t.step_lr, group_lrs(t.optimizer)))
    scale = t.scaler._scale.clone() if fp16 and t.scaler._scale is not None else None
    t.scaler.step(t.optimizer)
    t.scaler.update()
    if scale is not None:
        t.guard.record_skip(step, t.scaler._scale < scale)
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update_parameters(t.model)
    if t.step_schedule_per_batch:
        t.scheduler.step()
    if log_now and grad_norm is not None and t.writer is not None:  # after the step is queued
        t.writer.add_scalar("train/grad_norm", grad_norm.item(), step)


def flush_step_scalars(t: Training) -> None:
    """Write the per-step scalars kept since the last flush (the learning rates, each with its
    step and time): at log steps, epoch ends, checkpoints and when training stops. Keeping them
    costs a step under a microsecond; add_scalar, ~0.1 ms here."""
    if t.writer is not None:
        for step, wall_time, lr, groups in t.step_scalars:
            t.writer.add_scalar("lr", lr, step, walltime=wall_time)
            for name, rate in groups.items():
                t.writer.add_scalar(f"lr/{name}", rate, step, walltime=wall_time)
    t.step_scalars.clear()


def train_one_epoch(t: Training, loader: DataLoader, desc: str) -> EpochStats:
    """A pass over loader, continuing the epoch's running sums t.sums (a resumed epoch's loader
    starts at batch t.sums.batches). With accumulate_steps=k, the gradients of k micro-batches are
    summed (each loss divided by the group's size) before one optimizer step; an epoch whose
    batch count is not a multiple of k steps on its last, smaller group too."""
    model, cfg = t.model, t.cfg
    model.train()
    hold_norms(t.held_norms)
    if t.sums is None:
        t.sums = EpochSums.zeros(t.device)
    sums = t.sums
    k, first = cfg.accumulate_steps, sums.batches
    n_batches = first + len(loader)
    start, seconds_before = time.perf_counter(), sums.seconds
    shard = math.ceil(len(loader.dataset) / t.dist.world)
    bar = progress_bar(shard, desc, cfg.progress if t.dist.main else False)
    bar.update(sums.seen)
    # Without a terminal (a batch job's log, nohup, CI) the bar is off: lines instead, unless
    # trainer.progress=false asks for quiet.
    lines = (
        ProgressLines(start) if bar.disable and t.dist.main and cfg.progress is not False else None
    )
    excluded = 0.0  # seconds of compilation in this call
    loss_mark = None  # on a log step's group: the loss sum and images before it
    try:
        for i, (images, targets) in enumerate(loader, start=first):
            images = images.to(t.device, non_blocking=True, memory_format=t.memory_format)
            targets = targets.to(t.device, non_blocking=True)
            # torch.compile compiles on the first batch of each shape (the first, and a smaller last
            # one): those batches are left out of the epoch's time and images/s.
            compiling = t.compiled and tuple(images.shape) not in t.compiled_shapes
            if compiling:
                t.compiled_shapes.add(tuple(images.shape))
                sync_device(t.device)
                compile_start = time.perf_counter()
            group_start = i - i % k
            group_size = min(k, n_batches - group_start)
            last_in_group = i == group_start + group_size - 1
            log_now = (t.global_step + 1) % cfg.log_every_steps == 0
            if log_now and t.writer is not None and i == group_start:
                loss_mark = (sums.loss.clone(), sums.seen)
            labels = targets
            if t.mixer is not None:
                images, labels = t.mixer(images, targets)
            # Under DDP, only the last micro-batch of a group all-reduces its gradients.
            sync = contextlib.nullcontext()
            if not last_in_group and t.ddp is not None:
                sync = t.ddp.no_sync()
            if t.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with sync:
                with autocast(t.device, cfg.precision):
                    outputs = (t.forward if t.forward is not None else model)(images)
                    loss = t.objective(images, outputs, labels)
                t.scaler.scale(loss if group_size == 1 else loss / group_size).backward()
            # The running sums: one kernel for the loss, four for the accuracy; read at syncs.
            batch = targets.shape[0]
            sums.loss.add_(loss.detach(), alpha=batch)
            sums.correct.add_((outputs.detach().argmax(1) == targets).sum())
            sums.seen += batch
            sums.batches = i + 1
            bar.update(batch)
            if last_in_group:
                _optimizer_step(t, log_now, desc)
                if log_now:
                    flush_step_scalars(t)  # while the device still works on the queued steps
                    t.guard.check(t.global_step, desc)
                    if loss_mark is not None:
                        mark, seen = loss_mark
                        group_mean = (sums.loss - mark).item() / (sums.seen - seen)
                        t.writer.add_scalar("train/loss_step", group_mean, t.global_step)
                        loss_mark = None
            if compiling:  # this batch's shape was compiled: its time is not the model's
                sync_device(t.device)
                spent = time.perf_counter() - compile_start
                excluded += spent
                t.warmup_seconds += spent
                sums.untimed_images += batch
            if last_in_group:
                sums.seconds = seconds_before + time.perf_counter() - start - excluded
                if lines is not None and lines.due(t.global_step, cfg.log_every_steps):
                    lines.write(t, desc, i + 1 - first, n_batches, first)
                if t.on_step is not None:
                    t.on_step()
            refresh = (i + 1) % BAR_REFRESH_STEPS == 0 or i in (first, n_batches - 1)
            if not bar.disable and refresh:
                bar.set_postfix(
                    loss=f"{sums.loss.item() / sums.seen:.3f}",
                    acc=f"{100 * sums.correct.item() / sums.seen:.1f}%",
                )
    finally:
        flush_step_scalars(t)  # also when the run stops (an error, a signal)
    bar.close()
    if t.guard is not None:
        t.guard.check(t.global_step, desc)
    sums.seconds = seconds_before + time.perf_counter() - start - excluded
    return sums.stats()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "eval",
    progress: bool | None = None,
) -> EpochStats:
    """Plain cross-entropy (no label smoothing) and top-1 accuracy over loader; under DDP each
    process evaluates its share and the figures are summed over all of them."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    per_class: torch.Tensor | None = None  # (images, correct) per class, on the device
    seen = 0
    start = time.perf_counter()
    world = distributed.world_size()
    bar = progress_bar(math.ceil(len(loader.dataset) / world), desc, progress)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            outputs = model(images)
        loss_sum += nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")
        hit = outputs.argmax(1) == targets
        correct += hit.sum()
        if per_class is None:
            per_class = torch.zeros(2, outputs.shape[1], dtype=torch.long, device=device)
        # index_add_, not bincount: no wait for the device
        per_class[0].index_add_(0, targets, torch.ones_like(targets))
        per_class[1].index_add_(0, targets, hit.long())
        seen += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    if world > 1:
        # A split smaller than the number of processes leaves some with no image: they add
        # zeros of the others' width (skipping the sum hung or broke the process group).
        width = 0 if per_class is None else per_class.shape[1]
        width = int(distributed.all_reduce_max(torch.tensor(width, device=device)))
        if per_class is None and width:
            per_class = torch.zeros(2, width, dtype=torch.long, device=device)
        loss_sum = distributed.all_reduce_sum(loss_sum)
        correct = distributed.all_reduce_sum(correct)
        seen = int(distributed.all_reduce_sum(torch.tensor(seen, device=device)))
        if per_class is not None:
            per_class = distributed.all_reduce_sum(per_class)
    n = max(seen, 1)
    total, hits = per_class.tolist() if per_class is not None else (None, None)
    return EpochStats(loss_sum.item() / n, 100 * correct.item() / n, seen, seconds,
                      class_total=total, class_correct=hits)  # fmt: skip


def _metric(stats: EpochStats, name: str) -> float:
    """The monitored figure of an evaluation; nan where its loss is not finite (outputs that
    overflow: their accuracy is an argmax over nan, and such an epoch is never the best)."""
    if not math.isfinite(stats.loss):
        return math.nan
    if name.endswith("balanced_acc"):
        return stats.balanced_acc if stats.balanced_acc is not None else stats.acc
    return stats.acc if name.endswith("acc") else stats.loss


class _Run:
    """One fit(): the training state, the monitor, and the checkpoints they make."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, t: Training, monitor: Monitor, plan: StepPlan
    ) -> None:
        self.cfg, self.run_dir, self.t, self.monitor, self.plan = cfg, run_dir, t, monitor, plan
        self.epoch = 0  # epochs completed
        self.best_valid: dict[str, Any] | None = None
        self.signals: StopSignals | None = None
        self.history: list[dict[str, Any]] = []  # one record per finished epoch
        self.loaders: Any = None  # the run's Loaders
        self.point: ResumePoint | None = None  # where it resumed from
        self.start_batch = 0  # the batch of its first epoch it resumed at
        self.teacher: Teacher | None = None  # trainer.distill's teacher
        self.classes: list[str] = []  # the data's class names, in label order
        self.data_files: dict[str, Any] | None = None  # data=imagefolder's files (fingerprint)
        # The last finished epoch's training figures (metrics.json's "train", also where a
        # resumed process only tests)
        self.last_train: dict[str, Any] | None = None

    def state(self, mid_epoch: bool) -> dict[str, Any]:
        """The checkpoint. Under DDP every process must call this (the random states and the
        running sums of all processes are gathered into it), and rank 0 writes it."""
        t = self.t
        # One random state and one set of running sums per process (a list of one without DDP).
        rng = distributed.gather_objects(capture_rng())
        sums = distributed.gather_objects(t.sums.state_dict()) if mid_epoch else None
        return {
            "format_version": FORMAT_VERSION,
            PREACT_KEY: PREACT_REVISION,
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "ema": t.ema.state_dict() if t.ema is not None else None,
            "monitor": self.monitor.state_dict(),
            "epoch": self.epoch,
            # Mid-epoch: the batches of epoch `epoch + 1` already trained on, and their sums.
            "batch_in_epoch": t.sums.batches if mid_epoch else 0,
            "epoch_sums": sums if mid_epoch else None,
            "global_step": t.global_step,
            "skipped_in_a_row": int(t.guard.skips) if t.guard is not None else 0,
            "rng": rng,
            "world_size": t.dist.world,
            "teacher": self.teacher.record() if self.teacher is not None else None,
            "channels": channels_of(t.model),  # a pruned model's widths (task=prune)
            "classes": self.classes,
            "data_files": self.data_files,
            "best_valid": self.best_valid,
            "history": self.history,
            "last_train": self.last_train,
            "weights": "raw",
            "config": to_dict(self.cfg),
            "torch_version": str(torch.__version__),
        }

    def save_last(self, mid_epoch: bool) -> None:
        state = self.state(mid_epoch)
        if self.t.dist.main:
            save_checkpoint(state, self.run_dir / "last.pt", self.run_dir / "previous.pt")

    def save_epoch_end(self, improved: bool, selected_weights: str) -> None:
        """last.pt, and best.pt when the epoch improved. best.pt goes in place first: a last.pt
        always names a best epoch whose best.pt is there. (A stop between the two leaves a
        best.pt one epoch ahead of last.pt; the resumed run redoes that epoch and rewrites it.)"""
        state, t, run_dir = self.state(mid_epoch=False), self.t, self.run_dir
        if not t.dist.main:
            return
        best_copy = None
        if improved and selected_weights == "ema":
            best = {**state, "model": t.ema.module.state_dict(), "weights": "ema"}
            save_checkpoint(best, run_dir / "best.pt")
        elif improved:
            best_copy = run_dir / "best.pt"  # the same bytes as last.pt
        save_checkpoint(state, run_dir / "last.pt", run_dir / "previous.pt", also_as=best_copy)

    def received(self) -> int | None:
        """The stop signal received (by any process, under DDP: all stop at the same step)."""
        signum = self.signals.received if self.signals is not None else None
        return distributed.any_flag(signum) if self.t.dist.enabled else signum

    def after_step(self) -> None:
        faults.point("step")
        if self.signals is not None and self.signals.interrupted:
            raise KeyboardInterrupt  # a Ctrl-C whose first KeyboardInterrupt was dropped
        every = self.cfg.trainer.checkpoint_every_steps
        signum = self.received()
        if signum is not None or (every and self.t.global_step % every == 0):
            self.t.guard.check(self.t.global_step, "before saving a checkpoint")
            flush_step_scalars(self.t)
            self.save_last(mid_epoch=True)
        if signum is not None:
            raise Preempted(signum, self.t.global_step, str(self.run_dir / "last.pt"))

    def restore(self, point: ResumePoint) -> int:
        """Load a checkpoint's state; return the batch of its epoch to continue from."""
        state, t = point.state, self.t
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{point.path} has checkpoint format {state.get('format_version')}, this "
                f"version reads format {FORMAT_VERSION}"
            )
        check_same_files(state.get("data_files"), self.data_files, point.path)
        check_config(point, self.cfg)
        check_same_teacher(state.get("teacher"), self.teacher, point.path)
        check_world_size(point, t.dist.world)
        check_preact_revision(t.model, state, point.path)
        try:
            t.model.load_state_dict(state["model"])
            t.optimizer.load_state_dict(state["optimizer"])
            t.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                t.scaler.load_state_dict(state["scaler"])
            if t.ema is not None and state.get("ema"):
                t.ema.load_state_dict(state["ema"])
            self.monitor.load_state_dict(state["monitor"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"{point.path} does not fit this run's model or optimizer: {first}"
            ) from None
        self._fit_schedule_to_length(state)
        self.epoch = state["epoch"]
        self.best_valid = state.get("best_valid")
        self.history = list(state.get("history", []))
        self.last_train = state.get("last_train")
        t.global_step = state["global_step"]
        t.guard = FiniteGuard(t.device)
        t.guard.skips.fill_(state.get("skipped_in_a_row", 0))
        rng, sums = state["rng"], state.get("epoch_sums")
        if isinstance(rng, list):  # this process's own (older single-process files: a dict)
            rng, sums = rng[t.dist.rank], sums[t.dist.rank] if sums else None
        if sums:
            t.sums = EpochSums.from_state(sums, t.device)
        restore_rng(rng)
        return state.get("batch_in_epoch", 0)

    def _fit_schedule_to_length(self, state: dict[str, Any]) -> None:
        """trainer.epochs changed on resume: a schedule that anneals over the run (cosine,
        one-cycle, step with a warm-up) is rebuilt for the new length and advanced to where
        the run is, so the rest of the run follows the schedule of the new length; the others
        do not depend on the length and go on as saved."""
        cfg, t = self.cfg, self.t
        before = state["config"]["trainer"]["epochs"]
        if before == cfg.trainer.epochs or not depends_on_length(cfg.schedule):
            return
        if state["epoch"] >= cfg.trainer.epochs:  # nothing left to train: only the test runs
            return
        position = t.scheduler.last_epoch
        t.scheduler = rebuild_scheduler(
            cfg.schedule, t.optimizer, self.plan.lr, cfg.trainer.epochs,
            self.plan.steps_per_epoch, position,
        )  # fmt: skip
        unit = "step" if cfg.schedule.interval == "step" else "epoch"
        log.info(
            "trainer.epochs %d -> %d: schedule=%s rebuilt for %d epochs and continued at %s %d: "
            "learning rate %.4g",
            before, cfg.trainer.epochs, cfg.schedule.name, cfg.trainer.epochs, unit, position,
            main_lr(t.optimizer),
        )  # fmt: skip


def fit(cfg: DictConfig, run_dir: str | Path, given: set[str] | None = None) -> dict[str, Any]:
    """Train cfg's model on cfg's data; write checkpoints, TensorBoard logs and metrics.json in
    run_dir; return the metrics. A SIGTERM or SIGUSR1 saves a checkpoint and raises Preempted.
    Under torchrun, every process trains with DistributedDataParallel on its share of the data
    and rank 0 alone logs and writes. `given`: the keys the command line set (a resume keeps
    the run's own length where they do not include it: resume.keep_run_length)."""
    complete(cfg)
    settle_data(cfg)
    d = distributed.from_env()
    device = distributed.device_for(cfg.trainer.device, d)
    distributed.setup(device, d)
    level = log.level
    if not d.main:  # warnings and errors only, on the console only
        log.setLevel(logging.WARNING)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
    locked = False
    try:
        if d.main:  # one process at a time in a run folder (engine.runlock)
            locked = runlock.hold(Path(run_dir))
        return _fit(cfg, Path(run_dir), d, device, given)
    finally:
        if locked:
            runlock.release(Path(run_dir))
        log.setLevel(level)
        if d.enabled:
            distributed.teardown()


def _fit(
    cfg: DictConfig, run_dir: Path, d: Dist, device: torch.device, given: set[str] | None
) -> dict[str, Any]:
    """The story of a run: build it (or find it finished), say what it will do, train its
    epochs, test the selected weights, write metrics.json."""
    wall_start = time.perf_counter()
    # When this process reached each phase (Unix time; scripts/benchmark_process.py reads it).
    timeline = {"fit": time.time()}
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_temporaries(run_dir) if d.main else ():
        log.info("removed %s, left by a save that was killed midway", stale)
    point = find_resume(cfg, run_dir)
    if point is not None and d.main:
        set_aside_unread(run_dir, point)
    if point is not None:
        # (the command line takes the run's own length before the config is checked: cli;
        # a config built in code gives its own)
        keep_run_length(cfg, point.state["config"], given)
        if own := own_run_length(point.state["config"], given):
            log.info("resuming with the run's own %s (not given on the command line)",
                     ", ".join(own))  # fmt: skip
    if point is not None and finished(point, cfg):
        check_not_finished(cfg, point)
        if (done := finished_metrics(run_dir, point)) is not None:
            log.info("resume=auto: %s already finished; nothing to do %s", run_dir,
                     finished_note(point, cfg))  # fmt: skip
            if d.main:
                from resnet_train.curves import draw_if_missing

                if draw_if_missing(run_dir, done):
                    log.info("drew the missing %s", run_dir / "curves.png")
            return done
        # trained all its epochs but not tested (stopped before, or metrics.json is of the
        # run before it was extended, or shortened now): test it now
        check_end_not_passed(cfg, point)
        if d.main and (recorded := record_run_length(cfg, run_dir, point)):
            log.info("its checkpoints record %s, the run's length from now on",
                     ", ".join(recorded))  # fmt: skip

    run = _build_run(cfg, run_dir, d, device, point)
    _describe(run)
    t = run.t
    # A resumed run appends to the same event files; steps after its checkpoint are dropped.
    if d.main:
        # (A run started afresh purges from step 1: what a run killed before its first
        # checkpoint logged.)
        t.writer = tensorboard_writer(run_dir, purge_step=t.global_step + 1)
    else:
        t.writer = NullWriter()
    t.on_step = run.after_step
    try:
        with StopSignals() as signals:
            run.signals = signals
            if (signum := run.received()) is not None:  # (held while the run started)
                raise Preempted(signum, t.global_step, None)
            timeline["train"] = time.time()
            epochs = _train_epochs(run)
            timeline["test"] = time.time()
            tested = _final_test(run, epochs.run)
            timeline["tested"] = time.time()
            # (a stop signal now waits until they are written: a run stopped here was finished
            # without them)
            metrics = _write_metrics(run, epochs, tested, wall_start, timeline)
            if (signum := run.received()) is not None:
                log.info(
                    "%s came after the last epoch, during the final test: the run is finished "
                    "and tested, its metrics.json written",
                    signal.Signals(signum).name,
                )
    except Preempted as stop:
        log.info("%s", stop)
        if cfg.trainer.requeue and stop.signum != signal.SIGINT:  # Ctrl-C: a person stopped it
            requeue_slurm_job()
        raise
    finally:
        t.writer.close()
        close_loaders(run.loaders)
    return metrics


def _build_run(
    cfg: DictConfig, run_dir: Path, d: Dist, device: torch.device, point: ResumePoint | None
) -> _Run:
    """Data, model, optimizer, schedule and their state (restored from `point` when resuming),
    wrapped for DDP and torch.compile as asked."""
    tc = cfg.trainer
    seed_everything(cfg.seed, tc.deterministic)
    channels_last = channels_last_for(tc.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loaders = build_loaders(cfg.data, cfg.seed, device, channels_last, d.rank, d.world)
    classes = class_names(cfg.data, cfg.seed)
    if point is None:
        model = build_model(cfg, classes)
    else:  # (the checkpoint holds the weights: model.weights is not read again)
        model = build_resumed_model(cfg, point.state.get("channels"), point.path)
    if tc.qat:
        layers = prepare_qat(model)
        log.info("QAT: fake int8 quantization in %d conv and linear layers", layers)
    model = model.to(device, memory_format=memory_format)
    if tc.sync_batchnorm and not d.enabled:
        log.warning("trainer.sync_batchnorm=true does nothing in a single process: it shares "
                    "BatchNorm statistics across the processes of torchrun")  # fmt: skip
    if d.enabled:
        if tc.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # The same initial weights everywhere (the seed), other random draws (dropout, MixUp)
        # per process.
        torch.manual_seed(cfg.seed + d.rank)
        np.random.seed(cfg.seed + d.rank)
        random.seed(cfg.seed + d.rank)
    frozen, held_norms = freeze(model, cfg.model.freeze, cfg.model.freeze_bn)
    _describe_freezing(cfg, model, frozen, held_norms)
    plan = plan_steps(cfg, len(loaders.train.dataset), d.world)
    lr, steps_per_epoch = plan.lr, plan.steps_per_epoch
    optimizer = build_optimizer(cfg.optim, model, lr)
    weight = None
    # the classifier's width: model.num_classes may exceed the data's classes (outputs that no
    # label names get no weight and no share of a mixed label)
    outputs = cfg.model.num_classes or loaders.num_classes
    if cfg.data.balance == "loss":
        counts = np.zeros(outputs)
        counts[: len(loaders.train_counts)] = loaders.train_counts
        weight = class_weights(counts).to(device)
        log.info("data.balance=loss: class weights %s (n / (classes x count))",
                 [round(v, 3) for v in weight.tolist()])  # fmt: skip
    t = Training(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.schedule, optimizer, tc.epochs, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16"),
        criterion=build_criterion(tc.label_smoothing, weight),
        device=device,
        cfg=tc,
        step_schedule_per_batch=cfg.schedule.interval == "step",
        mixer=build_batch_mixer(cfg.data.augment, outputs),
        memory_format=memory_format,
        dist=d,
        held_norms=held_norms,
    )
    if tc.ema.decay is not None:
        t.ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema.decay), use_buffers=True
        )
    es = tc.early_stopping
    run = _Run(cfg, run_dir, t, Monitor(es.monitor, es.mode, es.patience, es.min_delta), plan)
    run.classes, run.loaders = classes, loaders
    run.data_files = data_fingerprint(cfg.data, cfg.seed)
    monitor = run.monitor
    if tc.distill.teacher is not None:
        run.teacher = load_teacher(cfg, classes)
        run.teacher.model.to(device, memory_format=memory_format)
        kd = tc.distill
        t.objective = DistillLoss(t.objective, run.teacher.model, kd.temperature, kd.alpha)

    start_batch = 0
    if point is not None:
        start_batch = run.restore(point)
        if point.path.parent != run_dir:  # resume=PATH from another directory
            previous_best = point.path.parent / "best.pt"
            if (monitor.best_epoch or _ema_without_validation(run)) and previous_best.is_file():
                copy_checkpoint(previous_best, run_dir / "best.pt")
        where = f", batch {start_batch} of epoch {run.epoch + 1}" if start_batch else ""
        log.info(
            "resumed from %s: %d epochs done, step %d%s",
            point.path, run.epoch, t.global_step, where,
        )  # fmt: skip
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        t.ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        t.forward = t.ddp
    if tc.compile:
        t.forward, t.compiled = torch.compile(t.ddp or model, mode=tc.compile_mode), True
        t.cuda_graphs = device.type == "cuda" and tc.compile_mode in CUDA_GRAPH_MODES
        if device.type != "cuda":
            # inductor's C++ build says "No CUDA runtime is found" on a machine without one
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            if tc.compile_mode == "reduce-overhead":
                log.warning("trainer.compile_mode=reduce-overhead captures CUDA graphs, which "
                            "the %s has not: it compiles as the default mode here",
                            device.type.upper())  # fmt: skip

    run.point, run.start_batch = point, start_batch
    return run


def _describe_freezing(
    cfg: DictConfig, model: nn.Module, frozen: list[str], held_norms: list[nn.Module]
) -> None:
    from resnet_train.models.build import model_notes

    for note in model_notes(cfg, model):
        log.warning("%s", note)
    if cfg.optim.backbone_lr_mult != 1 and cfg.model.weights is None:
        log.warning(
            "optim.backbone_lr_mult=%s without model.weights trains a randomly initialised "
            "backbone at %s times the rate: give the pretrained weights, model.weights=PATH",
            cfg.optim.backbone_lr_mult, cfg.optim.backbone_lr_mult,
        )  # fmt: skip
    if not frozen and not held_norms:
        return
    kept = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "frozen: %s (%.2fM of %.2fM parameters kept as loaded); BatchNorm statistics kept in "
        "%d layers%s",
        ", ".join(frozen) or "nothing", kept / 1e6, total / 1e6, len(held_norms),
        " (model.freeze_bn=true: all)" if cfg.model.freeze_bn else "",
    )  # fmt: skip
    if cfg.model.weights is None:
        log.warning(
            "model.freeze / model.freeze_bn without model.weights keep the random "
            "initialisation: give the pretrained weights, model.weights=PATH"
        )


# Below this many validation images, the run warns that model selection is mostly chance.
FEW_VALIDATION_IMAGES = 50


def _own_validation_folder(data: DictConfig) -> Path | None:
    """data=imagefolder's validation folder (DIR/val beside DIR/train), where it has one."""
    from resnet_train.data.folders import TRAIN_FOLDER, VALID_FOLDERS

    root = Path(str(data.root)).expanduser()
    if data.name != "imagefolder" or not (root / TRAIN_FOLDER).is_dir():
        return None
    return next((root / v for v in VALID_FOLDERS if (root / v).is_dir()), None)


def _describe(run: _Run) -> None:
    """The log lines that say what the run is about to do."""
    cfg, tc, t, plan, loaders = run.cfg, run.cfg.trainer, run.t, run.plan, run.loaders
    d, device, model, optimizer, run_dir = t.dist, t.device, t.model, t.optimizer, run.run_dir
    global_batch, lr, steps_per_epoch = plan.global_batch, plan.lr, plan.steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s (%.2fM parameters) on %s, %d training / %d validation / %d test images, device %s, "
        "%s, %s",
        cfg.model.name, n_params / 1e6, cfg.data.name, len(loaders.train.dataset),
        len(loaders.valid.dataset) if loaders.valid else 0, len(loaders.test.dataset), device,
        tc.precision,
        "channels_last" if t.memory_format == torch.channels_last else "contiguous",
    )  # fmt: skip
    for note in plan.notes:
        log.warning("%s", note)
    n_valid = len(loaders.valid.dataset) if loaders.valid else 0
    if 0 < n_valid < FEW_VALIDATION_IMAGES and d.main:
        own = _own_validation_folder(cfg.data)
        log.warning(
            "the validation split holds %d images: its accuracy moves in steps of %.3g points, "
            "too coarse to choose the best epoch%s by; %s",
            n_valid, 100 / n_valid,
            " or stop early" if tc.early_stopping.patience is not None else "",
            f"add images to {own}" if own else
            f"raise data.valid_ratio (now {cfg.data.valid_ratio}) or give more images",
        )  # fmt: skip
    counts = loaders.train_counts
    if counts is not None and (counts == 0).any() and d.main:
        missing = np.flatnonzero(counts == 0)
        size = cfg.data.get("train_size")
        log.warning(
            "the training split has no image of %d of the %d classes (%s%s): the model cannot "
            "learn them; %s",
            len(missing), len(counts), ", ".join(str(c) for c in missing[:5]),
            ", ..." if len(missing) > 5 else "",
            f"raise data.train_size (now {size})" if size is not None else "give them images",
        )  # fmt: skip
    if (
        device.type == "cpu"
        and tc.precision in ("fp16", "bf16")
        and not cpu_half_is_fast(tc.precision)
    ):
        log.warning(
            "trainer.precision=%s on this CPU is emulated and slow (ResNet-20: 19 img/s in fp16, "
            "31 in bf16, 431 in fp32 on an AVX2 CPU): use trainer.precision=fp32 on a CPU without "
            "%s", tc.precision, "AVX-512 FP16 or AMX" if tc.precision == "fp16" else
            "AVX-512 BF16 or AMX",
        )  # fmt: skip
    log.info(
        "global batch %d (%d x %d accumulation steps%s%s), learning rate %.4g%s, %d optimizer "
        "steps per epoch",
        global_batch, cfg.data.batch_size, tc.accumulate_steps,
        f" x {d.world} processes" if d.enabled else "",
        ", capped at the training set"
        if global_batch < cfg.data.batch_size * tc.accumulate_steps * (d.world if d.enabled else 1)
        else "", lr,
        f" (optim.lr {cfg.optim.lr} x {global_batch}/{cfg.optim.reference_batch})"
        if cfg.optim.lr_scaling == "linear" else "",
        steps_per_epoch,
    )  # fmt: skip
    if cfg.schedule.name == "onecycle":
        top = configured_momentum(optimizer)
        log.info(
            "one-cycle: learning rate %.4g -> %.4g -> %.4g; momentum %s",
            *onecycle_rates(cfg.schedule, lr, tc.epochs, steps_per_epoch),
            f"cycles {top:g} -> {cycled_momentum_floor(top):g} -> {top:g}"
            if cfg.schedule.cycle_momentum
            else f"stays {top:g} (schedule.cycle_momentum=false)",
        )  # fmt: skip
    if loaders.valid is None:
        log.info(
            "no validation set (data.valid_ratio=%s): no model selection; %s",
            cfg.data.valid_ratio,
            "the last epoch's EMA weights are kept (best.pt) and evaluated on the test set"
            if _ema_without_validation(run)
            else "the last checkpoint is kept and evaluated on the test set",
        )
    if run.teacher is not None:
        kd = tc.distill
        log.info(
            "distilling from a %s (%s, sha256 %s...): temperature %g, alpha %g",
            run.teacher.name, run.teacher.path, run.teacher.sha256[:12], kd.temperature, kd.alpha,
        )  # fmt: skip
    if d.enabled:
        log.info("DDP: %d process(es), %s backend", d.world, torch.distributed.get_backend())
    log.info("run directory: %s", run_dir)


@dataclass
class _Epochs:
    """What the epoch loop leaves for the metrics: each epoch's images/s, how many epochs this
    process ran, and why it stopped early (if it did). (The last epoch's training figures are
    the run's: _Run.last_train.)"""

    run: int = 0
    throughputs: list[float] = field(default_factory=list)
    stop_reason: str | None = None


def _train_epochs(run: _Run) -> _Epochs:
    """Train from where the run stands to trainer.epochs (or an early stop): each epoch trains,
    validates, checkpoints and answers a stop signal; raises Preempted on one."""
    cfg, tc, t, plan, loaders = run.cfg, run.cfg.trainer, run.t, run.plan, run.loaders
    d, device, model, optimizer, monitor = t.dist, t.device, t.model, t.optimizer, run.monitor
    run_dir, start_batch = run.run_dir, run.start_batch
    epochs = tc.epochs
    out = _Epochs()
    throughputs = out.throughputs
    stop_reason = monitor.reason() if run.point is not None and monitor.should_stop else None
    if stop_reason:  # decided before this process (a lower patience, or its line was not logged)
        log.info("%s", stop_reason)
    epochs_run = 0
    walls: list[float] = []  # each epoch's wall time, evaluations included (for the ETA)
    for epoch in range(run.epoch, epochs):
        if stop_reason:
            break
        tag = f"epoch {epoch + 1}/{epochs}"
        epoch_wall_start = time.perf_counter()
        t.epochs_after = epochs - epoch - 1
        # A stop after an epoch's last step resumes at its end: the last batch may be
        # short, so the position is capped at the epoch's size.
        start = min(start_batch * cfg.data.batch_size, plan.shard_images)
        loaders.train.sampler.set_epoch(epoch, start=start)
        if not start_batch:
            t.sums = EpochSums.zeros(device)
            t.sums.lr = main_lr(optimizer)
        start_batch = 0
        lr_now = t.sums.lr if t.sums.lr is not None else main_lr(optimizer)
        train_stats = train_one_epoch(t, loaders.train, f"{tag} train")
        if d.enabled:
            distributed.broadcast_buffers(model)
            if t.ema is not None:
                distributed.broadcast_buffers(t.ema)
        compile_seconds = t.warmup_seconds
        if t.warmup_seconds:
            log.info(
                "torch.compile: %.1f s compiling (%d images) left out of the epoch time "
                "and images/s", t.warmup_seconds, train_stats.untimed_images,
            )  # fmt: skip
            t.warmup_seconds = 0.0
        if not t.step_schedule_per_batch:
            with warnings.catch_warnings():
                # A run resumed after an epoch's last step steps the schedule before
                # this process has stepped the optimizer: in order, as torch wants.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                t.scheduler.step()
        epochs_run += 1
        rate = train_stats.images_per_s
        if rate is not None:
            throughputs.append(rate)
        shown_rate = f"{rate:.0f} img/s" if rate is not None else "img/s n/a (all compiling)"
        line = (
            f"{tag}  train loss {loss_text(train_stats.loss)} acc {train_stats.acc:.2f}%  "
            f"{shown_rate} {train_stats.seconds:.1f} s"
        )
        w, e, step = t.writer, epoch + 1, t.global_step
        w.add_scalar("epoch", e, step)
        w.add_scalar("train/loss", train_stats.loss, step)
        w.add_scalar("train/acc", train_stats.acc, step)
        if rate is not None:
            w.add_scalar("train/images_per_s", rate, step)
        w.add_scalar("train/epoch_time_s", train_stats.seconds, step)
        record = {
            "epoch": e,
            "lr": lr_now,
            "train_loss": train_stats.loss,
            "train_acc": train_stats.acc,
            "train_seconds": train_stats.seconds,
            "compile_seconds": compile_seconds,
            "images_per_s": rate,
        }

        improved, selected_weights, shown = _validate_epoch(run, tag, step, record)
        line += shown
        if tc.test_every_epoch:  # reported only: never chooses or stops anything
            line += _test_epoch(run, tag, step, record)
        run.history.append(record)
        run.last_train = asdict(train_stats)
        wall = time.perf_counter() - epoch_wall_start
        walls.append(wall)
        t.eval_seconds = max(wall - train_stats.seconds - compile_seconds, 0.0)
        left = epochs - (epoch + 1)
        eta = f"  ETA {duration(float(np.median(walls[-3:])) * left)}" if left else ""
        best = "  (best)" if improved and loaders.valid is not None else ""
        log.info("%s  lr %.4g%s%s", line, lr_now, best, eta)

        run.epoch = e
        faults.point("validated")
        run.save_epoch_end(improved, selected_weights)
        w.flush()
        faults.point("flushed")
        if monitor.should_stop:
            stop_reason = monitor.reason()
            log.info("%s", stop_reason)
        signum = run.received()
        if signum is not None:
            raise Preempted(signum, t.global_step, str(run_dir / "last.pt"))

    out.run, out.stop_reason = epochs_run, stop_reason
    return out


def _validate_epoch(
    run: _Run, tag: str, step: int, record: dict[str, Any]
) -> tuple[bool, str, str]:
    """The epoch's validation: each set of weights (raw, EMA) on the validation split, logged;
    the monitor updated with the selected one, whose figures go into record. Returns whether
    it improved, which weights were selected, and the text for the epoch's log line."""
    tc, t, loaders, monitor = run.cfg.trainer, run.t, run.loaders, run.monitor
    device, model, w = t.device, t.model, t.writer
    progress = tc.progress if t.dist.main else False
    line = ""
    if loaders.valid is None:
        # Nothing to choose with: the EMA weights asked for are the run's result, kept in
        # best.pt each epoch (last.pt keeps the raw ones, to resume from).
        return (True, "ema", line) if _ema_without_validation(run) else (False, "raw", line)
    results = {"raw": evaluate(model, loaders.valid, device, tc.precision, f"{tag} valid",
                               progress)}  # fmt: skip
    if t.ema is not None:
        results["ema"] = evaluate(t.ema.module, loaders.valid, device, tc.precision,
                                  f"{tag} valid (EMA)", progress)  # fmt: skip
    for name, stats in results.items():
        prefix = "valid" if name == "raw" else "valid_ema"
        w.add_scalar(f"{prefix}/loss", stats.loss, step)
        w.add_scalar(f"{prefix}/acc", stats.acc, step)
        line += f"  | {prefix} loss {loss_text(stats.loss)} acc {stats.acc:.2f}%"
        if stats.balanced_acc is not None:
            w.add_scalar(f"{prefix}/balanced_acc", stats.balanced_acc, step)
            if stats.imbalanced or monitor.metric.endswith("balanced_acc"):
                line += f" balanced {stats.balanced_acc:.2f}%"
        if len(run.classes) <= MAX_CLASS_SCALARS:
            for cls, recall in (stats.per_class(run.classes) or {}).items():
                if recall is not None:
                    w.add_scalar(f"{prefix}_recall/{cls}", recall, step)
    selected_weights = _select(results, tc.ema.select, monitor)
    chosen = results[selected_weights]
    epoch = record["epoch"]
    improved = monitor.update(_metric(chosen, monitor.metric), epoch)
    if not math.isfinite(chosen.loss):
        log.warning("epoch %d: the validation loss is %s (the model's outputs are not "
                    "finite): this epoch is never the best", epoch, chosen.loss)  # fmt: skip
    if improved:  # the best epoch's figures, in last.pt too (and best.pt)
        run.best_valid = {**chosen.summary(run.classes), "weights": selected_weights}
    record.update(valid_loss=chosen.loss, valid_acc=chosen.acc,
                  valid_balanced_acc=chosen.balanced_acc)  # fmt: skip
    return improved, selected_weights, line


def _test_epoch(run: _Run, tag: str, step: int, record: dict[str, Any]) -> str:
    """trainer.test_every_epoch: the test split after the epoch, reported only (it never chooses
    or stops anything); its figures go into record; returns the text for the log line."""
    tc, t = run.cfg.trainer, run.t
    progress = tc.progress if t.dist.main else False
    tested = evaluate(t.model, run.loaders.test, t.device, tc.precision, f"{tag} test", progress)
    t.writer.add_scalar("test_by_epoch/loss", tested.loss, step)
    t.writer.add_scalar("test_by_epoch/acc", tested.acc, step)
    record.update(test_loss=tested.loss, test_acc=tested.acc, test_seconds=tested.seconds)
    return f"  | test loss {loss_text(tested.loss)} acc {tested.acc:.2f}%"


def _final_test(run: _Run, epochs_run: int) -> tuple[str, dict[str, Any], EpochStats]:
    """The selected checkpoint (best.pt, or last.pt without validation) on the test set, read
    once; returns its name, its content and the figures."""
    cfg, tc, t, loaders, run_dir = run.cfg, run.cfg.trainer, run.t, run.loaders, run.run_dir
    d, device, model = t.dist, t.device, t.model
    progress = tc.progress if d.main else False
    if d.enabled and epochs_run:
        digests = distributed.gather_objects(distributed.weights_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP: the processes ended with different weights: {digests}")
        log.info("DDP: weights identical on all %d processes (sha256 %s)", d.world,
                 digests[0][:16])  # fmt: skip
    distributed.barrier()  # rank 0's checkpoints are complete
    # The test set is read once, at the end, with the selected weights.
    selected = "best.pt" if loaders.valid is not None or _ema_without_validation(run) else "last.pt"
    if selected == "best.pt" and not (run_dir / selected).is_file():
        log.warning("no epoch had a finite validation %s: testing last.pt",
                    run.monitor.metric)  # fmt: skip
        selected = "last.pt"
    final = load_checkpoint(run_dir / selected)
    model.load_state_dict(final["model"])
    test_stats = evaluate(model, loaders.test, device, tc.precision, "test", progress)
    faults.point("tested")
    log.info(
        "test loss %s acc %.2f%% with %s (epoch %d, %s weights)",
        loss_text(test_stats.loss), test_stats.acc, selected, final["epoch"],
        final.get("weights", "raw"),
    )  # fmt: skip
    if not math.isfinite(test_stats.loss):
        log.warning("the test loss is %s: the model's outputs are not finite (it diverged: a "
                    "lower optim.lr, a warm-up or trainer.clip_grad_norm may help); its accuracy "
                    "means nothing", test_stats.loss)  # fmt: skip
    t.writer.add_scalar("test/loss", test_stats.loss, t.global_step)
    t.writer.add_scalar("test/acc", test_stats.acc, t.global_step)
    if test_stats.balanced_acc is not None:
        t.writer.add_scalar("test/balanced_acc", test_stats.balanced_acc, t.global_step)
        if test_stats.imbalanced:
            log.info(
                "test balanced accuracy %.2f%% (mean per-class recall over %d classes)",
                test_stats.balanced_acc,
                sum(1 for n in test_stats.class_total or [] if n),
            )

    best = final.get("best_valid") if loaders.valid is not None else None
    if t.dist.main:  # (the others' writer writes nothing, and has no folder)
        log_hparams(t.writer, cfg, best, test_stats)
    return selected, final, test_stats


def _write_metrics(
    run: _Run,
    done: _Epochs,
    tested: tuple[str, dict[str, Any], EpochStats],
    wall_start: float,
    timeline: dict[str, float],
) -> dict[str, Any]:
    """metrics.json (rank 0 writes it); every process returns it."""
    cfg, t, loaders, run_dir = run.cfg, run.t, run.loaders, run.run_dir
    d, epochs = t.dist, cfg.trainer.epochs
    selected, final, test_stats = tested
    throughputs = done.throughputs
    epochs_run, stop_reason = done.run, done.stop_reason
    metrics = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs_run": epochs_run,
        "epochs_total": epochs,
        "epochs_done": run.epoch,
        "global_step": t.global_step,
        "stopped_early": stop_reason,
        "selected_checkpoint": selected,
        "selected_epoch": final["epoch"],
        "selected_weights": final.get("weights", "raw"),
        # the last epoch's (trained by an earlier process where this one only tested; older
        # checkpoints have only its history record)
        "train": run.last_train or _last_train(run.history),
        "valid": final.get("best_valid") if loaders.valid is not None else None,
        "test": test_stats.summary(run.classes),
        "classes": run.classes,
        "teacher": run.teacher.record() if run.teacher is not None else None,
        "images_per_s": float(np.median(throughputs)) if throughputs else _median_rate(run.history),
        "wall_time_s": time.perf_counter() - wall_start,
        # This process: fit() called, training started (data read, model built), testing
        # started, tested (Unix times).
        "timeline": timeline,
        # Per epoch, this run's and those of the processes it resumed: rate, train figures,
        # training seconds (compilation apart), validation and, if asked, test figures.
        "history": run.history,
    }
    if d.main:
        from resnet_train.curves import write_curves

        write_curves(run_dir / "curves.png", metrics)
        write_json(run_dir / "metrics.json", metrics)  # last: it says the run is finished
    return metrics


def _last_train(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not history:
        return None
    last = history[-1]
    return {"loss": last.get("train_loss"), "acc": last.get("train_acc"), "images": None,
            "seconds": last.get("train_seconds"), "untimed_images": None}  # fmt: skip


def _median_rate(history: list[dict[str, Any]]) -> float | None:
    rates = [h["images_per_s"] for h in history if h.get("images_per_s")]
    return float(np.median(rates)) if rates else None


class NullWriter:
    """The TensorBoard writer of the processes that do not write (DDP ranks other than 0)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as TensorBoard HParams: every config key with a scalar value (lists
    as text), paths and logging settings left out."""
    from resnet_train.config import MAY_CHANGE, SWEEPABLE_MAY_CHANGE, flatten

    flat = flatten(to_dict(cfg))
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in MAY_CHANGE and key not in SWEEPABLE_MAY_CHANGE:
            continue
        if value is None:
            value = "null"
        elif isinstance(value, (list, tuple)):
            value = str(list(value))
        out[key] = value
    return out


def log_hparams(writer: Any, cfg: DictConfig, valid: dict | None, test: EpochStats) -> None:
    """The run's settings and final figures in TensorBoard's HParams view: a file of their own,
    which replaces the one a finished run wrote before it was continued (a longer run, a
    patience raised): the view showed two sessions, and hparam/* two values at one step."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    metrics = {"hparam/test_acc": test.acc, "hparam/test_loss": test.loss}
    if valid:
        metrics.update({"hparam/valid_acc": valid["acc"], "hparam/valid_loss": valid["loss"]})
    folder = Path(writer.get_logdir())
    earlier = list(folder.glob(f"events.out.tfevents.*{HPARAMS_SUFFIX}"))
    with SummaryWriter(log_dir=str(folder), filename_suffix=HPARAMS_SUFFIX) as own:
        for summary in hparams_summaries(hparams(cfg), metrics):
            own.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            own.add_scalar(tag, value)
    for path in earlier:
        path.unlink(missing_ok=True)


# The HParams view's file in the run's tensorboard/ folder (events.out.tfevents.*.hparams)
HPARAMS_SUFFIX = ".hparams"


def _ema_without_validation(run: _Run) -> bool:
    """trainer.ema.select=ema and no validation set: best.pt holds the last epoch's EMA weights
    (with a validation set, best.pt is the best epoch's selected weights)."""
    t, tc = run.t, run.cfg.trainer
    return run.loaders.valid is None and t.ema is not None and tc.ema.select == "ema"


def _select(results: dict[str, EpochStats], select: str, monitor: Monitor) -> str:
    """Which weights the epoch's validation counts: raw, EMA, or the better of the two."""
    if "ema" not in results or select == "raw":
        return "raw"
    if select == "ema":
        return "ema"
    raw, ema = (_metric(results[k], monitor.metric) for k in ("raw", "ema"))
    if not math.isfinite(raw):  # any finite figure beats none
        return "ema" if math.isfinite(ema) else "raw"
    return "ema" if monitor.better(ema, raw) else "raw"
