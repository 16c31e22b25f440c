"""The run's arithmetic, worked out from the config and the data before anything is written: what
one optimizer step sees, how many there are, the effective learning rate, and the checks that
need these numbers (a warm-up that ends before the run, a floor below the rate)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig

from resnet_train.config import FLOORED_SCHEDULES, DistillConfig, ScheduleConfig
from resnet_train.data.sampler import epoch_length
from resnet_train.errors import ConfigError
from resnet_train.optim import effective_lr


@dataclass(frozen=True)
class StepPlan:
    fit_images: int  # training images, all processes together
    shard_images: int  # the images this process trains on per epoch (padded under DDP)
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    global_batch: int  # images a full optimizer step sees, over all processes
    lr: float  # the effective learning rate (optim.lr, scaled with lr_scaling=linear)
    schedule_length: int  # the run's length in the schedule's unit (epochs or steps)
    notes: list[str] = field(default_factory=list)  # said at the start of the run


# The schedule keys and the schedules that read them (milestones: above, with its own note).
SCHEDULE_KEYS = {
    "step_size": ("step",),
    "gamma": ("step", "multistep"),
    "min_lr": FLOORED_SCHEDULES,
    "restart_period": ("cosine_restarts",),
    "restart_mult": ("cosine_restarts",),
    "pct_start": ("onecycle",),
    "div_factor": ("onecycle",),
    "final_div_factor": ("onecycle",),
    "cycle_momentum": ("onecycle",),
}


def unused_keys(cfg: DictConfig) -> list[str]:
    """Optimizer, schedule and distillation keys set to values that the chosen optimizer or
    schedule, or a run without a teacher, never reads."""
    o, s, notes = cfg.optim, cfg.schedule, []
    if o.name == "adamw" and (o.nesterov or o.momentum != 0.9):
        notes.append("optim.nesterov and optim.momentum do nothing with optim=adamw (its "
                     "momentum is optim.betas)")  # fmt: skip
    if s.milestones and s.name != "multistep":
        notes.append(f"schedule.milestones does nothing with schedule={s.name} (only "
                     "schedule=multistep reads it)")  # fmt: skip
    defaults = ScheduleConfig()
    for key, readers in SCHEDULE_KEYS.items():
        if s.name not in readers and s[key] != getattr(defaults, key):
            notes.append(f"schedule.{key}={s[key]} does nothing with schedule={s.name} (only "
                         f"schedule={' or '.join(readers)} reads it)")  # fmt: skip
    kd, defaults = cfg.trainer.distill, DistillConfig()
    changed = [k for k in ("temperature", "alpha") if kd[k] != getattr(defaults, k)]
    if kd.teacher is None and changed:
        notes.append(" and ".join(f"trainer.distill.{k}" for k in changed)
                     + (" does" if len(changed) == 1 else " do") + " nothing without a teacher "
                     "(trainer.distill.teacher=PATH)")  # fmt: skip
    return notes


def plan_steps(cfg: DictConfig, fit_images: int, world: int = 1) -> StepPlan:
    """The step arithmetic of a run of cfg over `fit_images` training images in `world`
    processes; raise ConfigError where two keys disagree once the numbers are known."""
    d, t, s = cfg.data, cfg.trainer, cfg.schedule
    if fit_images < 2 * world:
        raise ConfigError(
            f"the training set has {fit_images} images for {world} process(es): each process "
            "needs at least two (BatchNorm normalises a batch); use more data (data.train_size, "
            "a lower data.valid_ratio) or fewer processes"
        )
    whole = math.ceil(fit_images / world)
    shard = epoch_length(whole, d.batch_size)
    batches = math.ceil(shard / d.batch_size)
    steps = math.ceil(batches / t.accumulate_steps)
    notes = unused_keys(cfg)
    if shard < whole:
        notes.append(
            f"the last batch of each epoch would hold a single image ({whole} training images"
            + (" per process" if world > 1 else "")
            + f" in batches of {d.batch_size}), which BatchNorm cannot always normalise: each "
            f"epoch trains on {shard} of them, leaving out a different one each time"
        )
    configured = d.batch_size * t.accumulate_steps
    # A step never sees more than a process's whole share: a batch or an accumulation group
    # larger than that is the share itself, and the rate is scaled for what a step sees.
    per_process = min(configured, shard)
    if per_process < configured:
        notes.append(
            f"data.batch_size={d.batch_size} x trainer.accumulate_steps={t.accumulate_steps} "
            f"is more than the {shard} training images of "
            + ("each process" if world > 1 else "the run")
            + f": each optimizer step sees {shard}"
        )
    global_batch = per_process * world
    lr = effective_lr(cfg.optim, global_batch)
    length = t.epochs * (steps if s.interval == "step" else 1)
    unit = "optimizer steps" if s.interval == "step" else "epochs"
    if s.name == "multistep":
        late = [m for m in s.milestones if m >= length]
        early = [m for m in s.milestones if m < s.warmup]  # (one at its end applies)
        if late:
            notes.append(
                f"schedule.milestones {late} are at or beyond the end of this run's {length} "
                f"{unit} (schedule.interval={s.interval}): the rate is never divided there"
                + ("; for milestones in optimizer steps set schedule.interval=step"
                   if s.interval == "epoch" and max(late) > t.epochs * steps / 2 else "")
            )  # fmt: skip
        if early:
            notes.append(
                f"schedule.milestones {early} fall within the warm-up (schedule.warmup="
                f"{s.warmup} {unit}): they are ignored"
            )
    if s.warmup >= length:
        raise ConfigError(
            f"schedule.warmup={s.warmup} is invalid: the warm-up must end before the run does, "
            f"in less than its {length} {unit} (trainer.epochs={t.epochs}"
            + (f" x {steps} steps per epoch" if s.interval == "step" else "")
            + f", schedule.interval={s.interval})"
        )
    if s.name == "onecycle" and length < 2:
        raise ConfigError(
            f"schedule.interval={s.interval} is invalid with schedule=onecycle here: the rate "
            f"rises and falls over at least 2 {unit}, and this run has {length} "
            f"(trainer.epochs={t.epochs}"
            + (f" x {steps} steps per epoch" if s.interval == "step" else "")
            + ("); use schedule.interval=step or more epochs" if s.interval == "epoch"
               else "); use more epochs, a larger training set or a smaller batch")
        )  # fmt: skip
    # One floor for every parameter group: below the lowest starting rate (the backbone's, with
    # optim.backbone_lr_mult < 1), or that group's rate would rise to it.
    mult = min(cfg.optim.backbone_lr_mult, 1.0)
    if s.name in FLOORED_SCHEDULES and s.min_lr > 0 and s.min_lr >= lr * mult:
        scaled = (
            f" (optim.lr={cfg.optim.lr} x global batch {global_batch} / "
            f"optim.reference_batch={cfg.optim.reference_batch})"
            if cfg.optim.lr_scaling == "linear"
            else ""
        )
        which = (
            f"the backbone's learning rate {lr * mult:.4g} (optim.backbone_lr_mult={mult} x "
            f"{lr:.4g}{scaled})"
            if mult < 1
            else f"the learning rate {lr:.4g}{scaled}"
        )
        raise ConfigError(
            f"schedule.min_lr={s.min_lr} is invalid: the floor must be below {which}, or "
            f"schedule={s.name} would raise that rate to it"
        )
    return StepPlan(fit_images, shard, batches, steps, global_batch, lr, length, notes)
