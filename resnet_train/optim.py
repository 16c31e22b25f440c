"""Optimizers and learning-rate schedules from the config (torch's own schedulers, composed)."""

from __future__ import annotations

import warnings

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from resnet_train.config import OptimConfig, ScheduleConfig
from resnet_train.errors import ConfigError


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """optim.lr, scaled by global_batch / reference_batch when lr_scaling=linear."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / cfg.reference_batch
    return cfg.lr


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool, backbone_lr_mult: float = 1.0
) -> list:
    """The trainable parameters in groups: weights that decay, and norm weights and biases (1-D
    tensors) that do not; with a backbone_lr_mult other than 1, each of those split into the
    backbone's (rate x the multiplier: "lr_mult") and the classifier's, the classifier's last.
    Empty groups are left out."""
    from resnet_train.models.freeze import backbone_parameters

    split_decay = not (decay_norm_and_bias or weight_decay == 0)
    backbone = backbone_parameters(model) if backbone_lr_mult != 1 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (id(p) not in backbone, split_decay and p.ndim <= 1)  # (head, no decay)
            groups.setdefault(key, []).append(p)
    out = []
    for head, no_decay in sorted(groups):
        group: dict = {"params": groups[(head, no_decay)]}
        if no_decay:
            group["weight_decay"] = 0.0
        if backbone_lr_mult != 1:
            group["name"] = "head" if head else "backbone"
            group["lr_mult"] = 1.0 if head else backbone_lr_mult
        out.append(group)
    return out


def main_lr(optimizer: Optimizer) -> float:
    """The rate of optim.lr (the classifier's, where the backbone has a multiplier)."""
    for group in optimizer.param_groups:
        if group.get("lr_mult", 1.0) == 1.0:
            return group["lr"]
    return optimizer.param_groups[0]["lr"]  # the classifier is frozen: the backbone's


def group_lrs(optimizer: Optimizer) -> dict[str, float]:
    """Each named group's rate ({"backbone": ..., "head": ...}); empty without a multiplier."""
    return {g["name"]: g["lr"] for g in optimizer.param_groups if "name" in g}


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> Optimizer:
    """SGD or AdamW over the parameter groups. On the CPU and CUDA they are torch's fused
    implementations: one kernel for all parameters, and a step that a non-finite gradient can
    cancel on the device (the trainer sets `found_inf`), without waiting for the device."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias,
                              cfg.backbone_lr_mult)  # fmt: skip
    for group in groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if cfg.name == "sgd":
        return SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                   weight_decay=cfg.weight_decay, fused=fused)  # fmt: skip
    if cfg.name == "adamw":
        return AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                     weight_decay=cfg.weight_decay, fused=fused)  # fmt: skip
    raise ConfigError(f"optim.name={cfg.name!r} is invalid: allowed: sgd, adamw")


def configured_momentum(optimizer: Optimizer) -> float:
    """The optimizer's momentum: SGD's momentum, or Adam's first beta."""
    if "betas" in optimizer.defaults:
        return float(optimizer.defaults["betas"][0])
    return float(optimizer.defaults.get("momentum", 0.0))


def cycled_momentum_floor(top: float) -> float:
    """With schedule.cycle_momentum, the momentum falls from its configured value `top` by 0.1
    while the rate rises, and climbs back as it falls (Smith & Topin 2019 use 0.95 -> 0.85)."""
    return max(top - 0.1, 0.0)


def depends_on_length(cfg: ScheduleConfig) -> bool:
    """Whether the schedule's rates depend on the length of the run (trainer.epochs): cosine
    and one-cycle anneal over it, and step with a warm-up lists its milestones up to it."""
    return cfg.name in ("cosine", "onecycle") or (cfg.name == "step" and cfg.warmup > 0)


def rebuild_scheduler(
    cfg: ScheduleConfig,
    optimizer: Optimizer,
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
    position: int,
) -> LRScheduler:
    """The schedule of a run of `epochs`, advanced by `position` steps of its unit: the rates a
    run configured with that length from the start would use from here on. (Every scheduler
    is stepped as in that run, so the rates are the same numbers, not just close.)"""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)
        for key in ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"):
            group.pop(key, None)
    scheduler = build_scheduler(cfg, optimizer, epochs, steps_per_epoch)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(position):
            scheduler.step()
    return scheduler


def build_scheduler(
    cfg: ScheduleConfig, optimizer: Optimizer, epochs: int, steps_per_epoch: int
) -> LRScheduler:
    """The schedule, stepped once per schedule.interval (epoch or optimizer step); its lengths
    count the same units. A linear warm-up of schedule.warmup units goes in front."""
    total = epochs * (steps_per_epoch if cfg.interval == "step" else 1)
    main_length = max(total - cfg.warmup, 1)
    if cfg.name == "constant":
        main: LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif cfg.name == "step" and cfg.warmup == 0:
        main = StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name in ("step", "multistep"):
        # Milestones count from the start of the run, warm-up included (Goyal et al. 2017 warm
        # up for 5 epochs and still divide at epochs 30, 60 and 80).
        given = (
            cfg.milestones
            if cfg.name == "multistep"
            else range(cfg.step_size, total, cfg.step_size)
        )
        # (one at the warm-up's end applies as the main schedule takes over: milestone 0)
        milestones = [m - cfg.warmup for m in given if m >= cfg.warmup]
        main = MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=main_length, eta_min=cfg.min_lr)
    elif cfg.name == "cosine_restarts":
        main = CosineAnnealingWarmRestarts(
            optimizer, T_0=cfg.restart_period, T_mult=cfg.restart_mult, eta_min=cfg.min_lr
        )
    elif cfg.name == "onecycle":
        # OneCycleLR ends its rising phase at step pct_start x total - 1 and divides by that
        # length: at exactly one step (4 steps, pct_start 0.25) it divides by zero, and under one
        # (2 or 3 steps) it skips the peak and starts at the floor-bound end of the fall. That
        # phase is the peak alone; a shade less than one step says so and divides safely.
        pct_start = cfg.pct_start if cfg.pct_start * total > 1 else 0.999 / total
        # torch cycles the momentum between 0.85 and 0.95 unless told not to, whatever the
        # optimizer was given; here it stays as configured, or cycles below it when asked.
        top = configured_momentum(optimizer)
        main = OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total,
            pct_start=pct_start,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            cycle_momentum=cfg.cycle_momentum,
            base_momentum=cycled_momentum_floor(top),
            max_momentum=top,
        )
    else:
        raise ConfigError(f"schedule.name={cfg.name!r} is invalid")
    if cfg.warmup == 0:
        return main
    warmup = LinearLR(
        optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=cfg.warmup
    )
    return SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup])


# One-cycle runs up to this many steps have their rates read off the schedule itself (a few
# milliseconds at start); in longer ones the nominal rates are those used to the 4 digits shown
# (the rise's last step misses the peak by less than 1e-4 of it).
ONECYCLE_SIMULATED_STEPS = 1_000


def onecycle_rates(
    cfg: ScheduleConfig, lr: float, epochs: int, steps_per_epoch: int
) -> tuple[float, float, float]:
    """The first, highest and last rates a one-cycle run's steps train at: in a short run the
    peak falls between steps (4 steps: 0.081 of 0.1), or the run starts at it (3 steps)."""
    import torch

    total = epochs * (steps_per_epoch if cfg.interval == "step" else 1)
    nominal = (lr / cfg.div_factor, lr, lr / cfg.div_factor / cfg.final_div_factor)
    if total > ONECYCLE_SIMULATED_STEPS:
        return nominal
    optimizer = SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    scheduler = build_scheduler(cfg, optimizer, epochs, steps_per_epoch)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (stepped without an optimizer step)
        for _ in range(total):
            rates.append(main_lr(optimizer))
            scheduler.step()
    return rates[0], max(rates), rates[-1]
