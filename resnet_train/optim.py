"""Optimizers and learning-rate schedules from the config."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from resnet_train.config import OptimConfig, ScheduleConfig
from resnet_train.errors import ConfigError


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    if cfg.name == "sgd":
        return SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    raise ConfigError(f"optim.name={cfg.name!r} is invalid: allowed: sgd")


def build_scheduler(cfg: ScheduleConfig, optimizer: Optimizer, epochs: int) -> LRScheduler:
    """A schedule stepped once per epoch."""
    if cfg.name == "step":
        return StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    if cfg.name == "constant":
        return LambdaLR(optimizer, lambda epoch: 1.0)
    raise ConfigError(f"schedule.name={cfg.name!r} is invalid: allowed: step, cosine, constant")
