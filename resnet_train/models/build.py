"""From the config to a model: the one place where model and data settings meet."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from resnet_train.models.registry import create_model


def build_model(cfg: DictConfig) -> nn.Module:
    """The model of cfg.model for the data of cfg.data: unless set, the stem follows the image
    size (64 px or less: the CIFAR stem) and the classes follow the data set."""
    m = cfg.model
    return create_model(
        m.name,
        num_classes=m.num_classes or cfg.data.num_classes,
        stem=m.stem or ("cifar" if cfg.data.image_size <= 64 else "imagenet"),
        shortcut=m.shortcut,
        zero_init_residual=m.zero_init_residual,
        stride_in_1x1=m.stride_in_1x1,
        dropout=m.dropout,
        weights=m.weights,
    )
