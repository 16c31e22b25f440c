"""Per-image augmentation and normalisation with torchvision's transforms v2, and the batch-level
MixUp / CutMix.

The same pipeline takes uint8 CHW tensors (CIFAR, synthetic: no PIL round trip) and PIL images
(ImageFolder). Crops, flips and the policy augmentations run on uint8, before the conversion to
float; random erasing and Cutout run last, on the normalised image, so erased pixels are zeros,
that is the data set's mean.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from resnet_train.config import FILE_DATASETS, AugmentConfig, DataConfig


class Cutout(torch.nn.Module):
    """DeVries & Taylor 2017: zero a size x size square centred at a uniformly random pixel (the
    square may hang over the border, as in the paper)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        cy = int(torch.randint(height, ()))
        cx = int(torch.randint(width, ()))
        top, left = max(cy - self.size // 2, 0), max(cx - self.size // 2, 0)
        bottom, right = (
            min(cy + (self.size + 1) // 2, height),
            min(cx + (self.size + 1) // 2, width),
        )
        image = image.clone()
        image[..., top:bottom, left:right] = 0
        return image


def _policy(cfg: AugmentConfig) -> list:
    if cfg.autoaugment:
        return [v2.AutoAugment(v2.AutoAugmentPolicy(cfg.autoaugment))]
    if cfg.randaugment:
        return [
            v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude)
        ]
    if cfg.trivialaugment:
        return [v2.TrivialAugmentWide()]
    return []


def build_transform(cfg: DataConfig, train: bool, normalize: bool = True) -> v2.Compose:
    """The per-image pipeline of training (augmented) or evaluation; normalize=False stops at
    float images in [0, 1] (what data.mean=auto averages)."""
    steps: list = []
    size, augment = cfg.image_size, cfg.augment
    if train:
        if augment.crop == "pad":
            if cfg.name in FILE_DATASETS:  # images of any size: to image_size first
                steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
            steps.append(v2.RandomCrop(size, padding=augment.padding or None))
        elif augment.crop == "random_resized":
            steps.append(v2.RandomResizedCrop(size, antialias=True))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
    if (not train or augment.crop == "none") and cfg.eval_resize:
        steps += [v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(size)]
    if train:
        steps += _policy(augment)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    if train and augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    if train and augment.cutout > 0:
        steps.append(Cutout(augment.cutout))
    return v2.Compose(steps)


def build_batch_mixer(cfg: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a batch: (images, int labels) -> (mixed images, soft labels)."""
    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
