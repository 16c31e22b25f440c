"""Config schemas and checks.

The dataclasses below are registered in Hydra's ConfigStore as the base of ``configs/train.yaml``,
so composition already rejects unknown keys (``model.depht=18``) and wrong types (``optim.lr=abc``)
with the key's name. ``validate`` adds the checks a type cannot express (ranges, known names) and
runs before any data is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from resnet_train.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "resnet20"
    # "cifar" (3x3 conv, stride 1, no max-pool) or "imagenet" (7x7/2 conv + max-pool);
    # null chooses from the data: cifar for images of 64 px or less, imagenet above.
    stem: str | None = None
    # null takes the data set's number of classes.
    num_classes: int | None = None
    # "A" (zero-padding identity), "B" (1x1 projection where the shape changes), "none" (a
    # plain network); null keeps the model's own (A for the CIFAR ResNets, B for the rest).
    shortcut: str | None = None
    # Goyal et al. 2017: zero gamma in the last BN of each residual branch.
    zero_init_residual: bool = False
    # Bottlenecks: false puts the stride on the 3x3 conv (ResNet v1.5, torchvision), true on the
    # first 1x1 (v1, the 2015 paper).
    stride_in_1x1: bool = False
    # Dropout between the convs of each block (wide ResNets use 0.3); 0 = none.
    dropout: float = 0.0
    # A weights file to start from: torchvision's .pth or a resnet-train checkpoint. A classifier
    # of another number of classes is replaced (fine-tuning).
    weights: str | None = None


@dataclass
class AugmentConfig:
    # "pad": random crop of image_size after zero-padding by `padding` (CIFAR baseline);
    # "random_resized": RandomResizedCrop(image_size) (ImageNet baseline); "none".
    crop: str = "pad"
    padding: int = 4
    hflip: bool = True


@dataclass
class DataConfig:
    name: str = "cifar10"
    # The folder that holds the data set's files (for CIFAR-10, the one containing
    # cifar-10-batches-py/). Relative paths are taken from the directory the command runs in.
    root: str = "~/data"
    download: bool = True
    num_classes: int = 10
    image_size: int = 32
    # ImageNet evaluation: resize the short side to this, then center-crop image_size; 0 = off.
    eval_resize: int = 0
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    batch_size: int = 128
    num_workers: int = 2
    # Share of the training set held out (stratified per class) for validation and model selection.
    valid_ratio: float = 0.1
    # Synthetic data: how many images to make. Real data: null = all, or a seeded, stratified
    # subset of this many images (for quick runs).
    train_size: int | None = None
    test_size: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    # "step": multiply the lr by gamma every step_size epochs; "cosine": anneal to min_lr over
    # trainer.epochs; "constant".
    name: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 30
    # "auto" picks CUDA when present, else the CPU; or any torch device string ("cpu", "cuda:1").
    device: str = "auto"
    label_smoothing: float = 0.0
    # Train-loss points to TensorBoard every this many optimizer steps.
    log_every_steps: int = 50
    # tqdm bars: null shows them only on a terminal.
    progress: bool | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    # "train", or "summary": print the model's parameters, MACs and stage shapes, and stop.
    task: str = "train"
    # A checkpoint file (last.pt or best.pt of an earlier run) to continue from.
    resume: str | None = None


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


DATASETS = ("cifar10", "cifar100", "imagenet", "synthetic")
STEMS = ("cifar", "imagenet")
CROPS = ("pad", "random_resized", "none")
OPTIMIZERS = ("sgd",)
SCHEDULES = ("step", "cosine", "constant")
SHORTCUTS = ("A", "B", "none")
TASKS = ("train", "summary")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _one_of(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    _check(value in choices, key, value, "allowed: " + ", ".join(choices))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range or unknown."""
    from resnet_train.models import list_models  # models import torch; keep config light

    _reject_unknown_keys(cfg, OmegaConf.structured(TrainConfig), "")
    m, d, o, s, t = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.trainer
    _one_of("task", cfg.task, TASKS)
    _one_of("model.name", m.name, list_models())
    if m.stem is not None:
        _one_of("model.stem", m.stem, STEMS)
    if m.shortcut is not None:
        _one_of("model.shortcut", m.shortcut, SHORTCUTS)
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if m.num_classes is not None:
        _check(m.num_classes >= 1, "model.num_classes", m.num_classes, "must be >= 1")

    _one_of("data.name", d.name, DATASETS)
    _check(d.num_classes >= 1, "data.num_classes", d.num_classes, "must be >= 1")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
    _check(d.eval_resize >= 0, "data.eval_resize", d.eval_resize, "must be >= 0")
    _check(len(d.mean) == 3, "data.mean", list(d.mean), "must hold 3 values (R, G, B)")
    _check(
        len(d.std) == 3 and all(v > 0 for v in d.std),
        "data.std",
        list(d.std),
        "must hold 3 values > 0",
    )
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(0 <= d.valid_ratio < 1, "data.valid_ratio", d.valid_ratio, "must be in [0, 1)")
    for key in ("train_size", "test_size"):
        value = d[key]
        if value is not None:
            _check(value >= 1, f"data.{key}", value, "must be >= 1 or null")
    _one_of("data.augment.crop", d.augment.crop, CROPS)
    _check(d.augment.padding >= 0, "data.augment.padding", d.augment.padding, "must be >= 0")

    _one_of("optim.name", o.name, OPTIMIZERS)
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(
        not o.nesterov or o.momentum > 0,
        "optim.nesterov",
        o.nesterov,
        "Nesterov needs optim.momentum > 0",
    )

    _one_of("schedule.name", s.name, SCHEDULES)
    _check(s.step_size >= 1, "schedule.step_size", s.step_size, "must be >= 1")
    _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "must be in (0, 1]")
    _check(0 <= s.min_lr < o.lr, "schedule.min_lr", s.min_lr, f"must be in [0, optim.lr={o.lr})")

    _check(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1")
    _check(
        0 <= t.label_smoothing < 1,
        "trainer.label_smoothing",
        t.label_smoothing,
        "must be in [0, 1)",
    )
    _check(t.log_every_steps >= 1, "trainer.log_every_steps", t.log_every_steps, "must be >= 1")
    _check(
        _is_device(t.device),
        "trainer.device",
        t.device,
        "allowed: auto, cpu, or a cuda:N or mps device this machine has",
    )


def _reject_unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str) -> None:
    """Keys added with Hydra's `+key=value` get past the schema's struct flag; refuse them too."""
    for key in cfg.keys():
        if key not in schema:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"{prefix}{key} is not a config key: allowed in {where}: "
                + ", ".join(str(k) for k in schema.keys())
            )
        if isinstance(cfg[key], DictConfig) and isinstance(schema[key], DictConfig):
            _reject_unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (what checkpoints and metrics.json store)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
