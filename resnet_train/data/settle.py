"""The data keys whose null or "auto" means "find out from the data or the weights".

`settle_data` replaces them with what they stand for before anything is built, so that the run's
checkpoints and records hold the numbers that were used (and task=predict can preprocess as the
run did without the data):

- data=imagefolder's `num_classes: null`: the number of class folders;
- `eval_resize: null`: image_size / 0.875 (256 for 224, the ImageNet protocol) when training
  crops with random_resized, else image_size (small images);
- `mean` / `std`: null takes those of the model.weights' training (ImageNet's for a torchvision
  .pth, a resnet-train checkpoint's own), or computes them like "auto" when there are no
  weights; "auto" computes them once on the training split's images (evaluation transform).
"""

from __future__ import annotations

import json
import logging

import torch
from omegaconf import DictConfig, OmegaConf

from resnet_train.config import IMAGENET_MEAN, IMAGENET_STD, settled_eval_resize
from resnet_train.models.weights import WeightsFile

log = logging.getLogger("resnet_train")
_stats_cache: dict[str, dict[str, list[float]]] = {}


def settle_data(cfg: DictConfig) -> DictConfig:
    """Fill cfg.data's null / auto keys (see the module's docstring); returns cfg."""
    d = cfg.data
    weights = None  # model.weights, peeked at (config and shapes) once, where needed
    if cfg.model.weights is not None and (
        (d.num_classes is None and cfg.task == "predict") or d.mean is None or d.std is None
    ):
        from resnet_train.models.weights import read_weights

        weights = read_weights(cfg.model.weights, peek=True)
    if d.num_classes is None and cfg.task == "predict" and weights is not None:
        d.num_classes = weights_classes(weights)  # new images: no folder to count
    if d.num_classes is None:
        from resnet_train.config import check_classifier
        from resnet_train.data.folders import scan

        d.num_classes = len(scan(d, cfg.seed).classes)
        check_classifier(cfg)
    if d.eval_resize is None:
        d.eval_resize = settled_eval_resize(d.image_size, d.augment.crop)
    asked = {k: d[k] for k in ("mean", "std") if d[k] is None or d[k] == "auto"}
    if not asked:
        return cfg
    from_weights = None
    if weights is not None and any(v is None for v in asked.values()):
        from_weights = weights_normalisation(weights)
    computed = None
    for key, value in asked.items():
        if value is None and from_weights is not None:
            d[key], where = from_weights[0][key], from_weights[1]
        else:
            if computed is None:
                computed = channel_stats(d, cfg.seed)
            d[key], where = computed[key], "computed on the training split"
        log.info("data.%s=%s: %s (%s)", key, "auto" if value == "auto" else "null",
                 [round(v, 4) for v in d[key]], where)  # fmt: skip
    return cfg


def weights_classes(weights: WeightsFile) -> int:
    """The number of classes of a weights file's classifier."""
    return int(weights.state["fc.weight"].shape[0]) if "fc.weight" in weights.state else 1000


def weights_normalisation(weights: WeightsFile) -> tuple[dict[str, list[float]], str]:
    """The mean and std a weights file's model was trained with, and where that comes from."""
    data = (weights.config or {}).get("data", {})
    mean, std = data.get("mean"), data.get("std")
    if isinstance(mean, list) and isinstance(std, list):
        return {"mean": mean, "std": std}, f"those of the run that made {weights.path.name}"
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, "ImageNet's, for a torchvision .pth"


def channel_stats(d: DictConfig, seed: int) -> dict[str, list[float]]:
    """Per-channel mean and std of the training split's pixels in [0, 1], after the evaluation
    transform (resize and centre crop), summed in float64; computed once per process."""
    from torch.utils.data import DataLoader

    from resnet_train.data.loaders import TransformedSubset, read_splits, worker_count
    from resnet_train.data.transforms import build_transform

    plain = OmegaConf.to_container(d, resolve=True)
    assert isinstance(plain, dict)
    key = json.dumps(
        {k: v for k, v in plain.items() if k not in ("mean", "std", "num_workers", "balance")}
        | {"seed": seed},
        sort_keys=True,
    )
    if key in _stats_cache:
        return _stats_cache[key]
    splits = read_splits(d, seed)  # type: ignore[arg-type]
    transform = build_transform(d, train=False, normalize=False)  # type: ignore[arg-type]
    subset = TransformedSubset(splits.train_base, splits.fit, transform)
    loader = DataLoader(subset, batch_size=64, num_workers=worker_count(d))  # type: ignore
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for images, _ in loader:
        x = images.double()
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
        pixels += x.numel() // 3
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp(min=0).sqrt()
    if float(std.min()) == 0:
        from resnet_train.errors import DataError

        raise DataError(
            f"data.std=auto: a channel of the {len(splits.fit)} training images is constant "
            f"(std {std.tolist()}); give data.mean and data.std"
        )
    out = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    _stats_cache[key] = out
    return out
