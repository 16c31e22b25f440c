"""Per-image augmentation and normalisation with torchvision's transforms v2.

The same pipeline takes uint8 CHW tensors (CIFAR, synthetic: no PIL round trip) and PIL images
(ImageFolder). Crops and flips run on uint8, before the conversion to float.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from resnet_train.config import DataConfig


def build_transform(cfg: DataConfig, train: bool) -> v2.Compose:
    steps: list = []
    size = cfg.image_size
    if train:
        if cfg.augment.crop == "pad":
            steps.append(v2.RandomCrop(size, padding=cfg.augment.padding or None))
        elif cfg.augment.crop == "random_resized":
            steps.append(v2.RandomResizedCrop(size, antialias=True))
        if cfg.augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
    if not train or cfg.augment.crop == "none":
        if cfg.eval_resize:
            steps += [v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(size)]
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]
    return v2.Compose(steps)
