"""Per-image augmentation and normalisation, and the batch-level MixUp / CutMix.

The pipeline takes uint8 CHW tensors (CIFAR, synthetic: no PIL round trip) and PIL images
(ImageFolder). Crops, flips and the policy augmentations run on uint8, before the conversion to
float; random erasing and Cutout run last, on the normalised image, so erased pixels are zeros,
that is the data set's mean.

The CIFAR-style pipeline (padded crop, flip, Cutout) is written here in plain torch, step for step
what torchvision's transforms v2 compute, with the same random draws, so its images are
bit-identical to v2's (a test holds this): importing torchvision costs about 2 s of start-up
(it imports torch._dynamo), which a CIFAR or synthetic run never needs. Everything else (resizes,
random-resized crops, the policies, random erasing, MixUp / CutMix) is torchvision's, imported
when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from resnet_train.config import FILE_DATASETS, AugmentConfig, DataConfig


class Compose:
    """Steps applied in order (torchvision's Compose, without importing torchvision)."""

    def __init__(self, transforms: list[Callable[[Any], Any]]) -> None:
        self.transforms = transforms

    def __call__(self, image: Any) -> Any:
        for step in self.transforms:
            image = step(image)
        return image


class PadCrop:
    """v2.RandomCrop(size, padding) on a CHW tensor: zero padding on every side, then a
    size x size window at an offset drawn with torch.randint (top first, then left)."""

    def __init__(self, size: int, padding: int) -> None:
        self.size, self.padding = size, padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pad, size = self.padding, self.size
        height, width = image.shape[-2] + 2 * pad, image.shape[-1] + 2 * pad
        if height < size or width < size:
            raise ValueError(
                f"Required crop size {(size, size)} is larger than input image size "
                f"{(height, width)}."
            )
        top = int(torch.randint(0, height - size + 1, size=())) if height > size else 0
        left = int(torch.randint(0, width - size + 1, size=())) if width > size else 0
        if pad:
            image = torch.nn.functional.pad(image, [pad, pad, pad, pad], value=0.0)
        return image[..., top : top + size, left : left + size]


class HorizontalFlip:
    """v2.RandomHorizontalFlip(p): one torch.rand(1) per image."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if torch.rand(1) >= self.p else image.flip(-1)


class ToFloat:
    """v2.ToImage + v2.ToDtype(torch.float32, scale=True) for a uint8 tensor."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.is_floating_point():
            return image.to(torch.float32)
        return image.to(torch.float32).mul_(1.0 / 255)


class Normalize:
    """v2.Normalize(mean, std) on a float CHW tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return image.sub(mean).div_(std)


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
    from torchvision.transforms import v2

    if cfg.autoaugment:
        return [v2.AutoAugment(v2.AutoAugmentPolicy(cfg.autoaugment))]
    if cfg.randaugment:
        return [
            v2.RandAugment(num_ops=cfg.randaugment_num_ops, magnitude=cfg.randaugment_magnitude)
        ]
    if cfg.trivialaugment:
        return [v2.TrivialAugmentWide()]
    return []


def _plain_torch(cfg: DataConfig, train: bool) -> bool:
    """Whether the pipeline needs nothing from torchvision: tensor images, padded crops, flips,
    Cutout."""
    augment = cfg.augment
    if cfg.name in FILE_DATASETS or cfg.eval_resize:
        return False
    if not train:
        return True
    policy = augment.autoaugment or augment.randaugment or augment.trivialaugment
    return augment.crop in ("pad", "none") and not policy and augment.random_erasing == 0


def build_transform(cfg: DataConfig, train: bool, normalize: bool = True) -> Compose:
    """The per-image pipeline of training (augmented) or evaluation; normalize=False stops at
    float images in [0, 1] (what data.mean=auto averages)."""
    if _plain_torch(cfg, train):
        return _torch_transform(cfg, train, normalize)
    from torchvision.transforms import v2

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
    elif (not train or augment.crop == "none") and cfg.name in FILE_DATASETS:
        steps.append(v2.CenterCrop(size))  # images of any size: the model's size, unresized
    if train:
        steps += _policy(augment)
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    if train and augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    if train and augment.cutout > 0:
        steps.append(Cutout(augment.cutout))
    return Compose(steps)


def _torch_transform(cfg: DataConfig, train: bool, normalize: bool) -> Compose:
    """build_transform's pipeline for tensor images in plain torch (see the module's note)."""
    steps: list = []
    augment = cfg.augment
    if train and augment.crop == "pad":
        steps.append(PadCrop(cfg.image_size, augment.padding))
    if train and augment.hflip:
        steps.append(HorizontalFlip())
    steps.append(ToFloat())
    if normalize:
        steps.append(Normalize(cfg.mean, cfg.std))
    if train and augment.cutout > 0:
        steps.append(Cutout(augment.cutout))
    return Compose(steps)


def build_batch_mixer(cfg: AugmentConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix on a batch: (images, int labels) -> (mixed images, soft labels)."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2

    mixers = []
    if cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
