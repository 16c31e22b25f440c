"""Knowledge distillation (Hinton et al. 2015): a trained teacher's softened outputs as a second
target for the student.

The teacher is read from trainer.distill.teacher: a resnet-train checkpoint brings its own model
settings (architecture, stem, shortcut, width), a torchvision-style .pth takes
trainer.distill.teacher_model (else the student's architecture). It runs in eval mode, without
gradients, under the step's autocast, on the very images the student sees (augmented, mixed).
Its weights never enter the run's checkpoints; its path and sha256 do, and a resume with another
teacher is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from resnet_train.errors import CheckpointError, ConfigError
from resnet_train.models.build import apply_pruned_widths, options_of
from resnet_train.models.registry import create_model, list_models
from resnet_train.models.weights import file_sha256, load_state, read_weights

log = logging.getLogger("resnet_train")
KEY = "trainer.distill.teacher"


@dataclass
class Teacher:
    model: nn.Module
    name: str  # its architecture
    path: Path
    sha256: str

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the teacher (never its weights)."""
        return {"path": str(self.path), "sha256": self.sha256, "model": self.name}


def load_teacher(cfg: DictConfig, classes: list[str] | None = None) -> Teacher:
    """The teacher of cfg.trainer.distill, on the CPU, in eval mode and frozen. Raises
    CheckpointError (unreadable file, weights of another architecture) or ConfigError (another
    number of classes than the student's data, or other classes by name: `classes`, the data's)
    naming the key. A checkpoint's teacher trained with another mean and std than the student's
    data is given its images as it was trained on them."""
    kd = cfg.trainer.distill
    weights = read_weights(kd.teacher, key=KEY)
    teacher_classes = (weights.checkpoint or {}).get("classes")
    if _named(classes) and _named(teacher_classes) and list(teacher_classes) != list(classes):
        raise ConfigError(
            f"{KEY}={kd.teacher} is invalid: it was trained on other classes "
            f"({_names(teacher_classes)}) than the student's data ({_names(classes)}); a teacher "
            "teaches its own classes' names, in its own order"
        )
    saved = (weights.config or {}).get("model") or {}
    name = saved.get("name") or kd.teacher_model or cfg.model.name
    if saved and kd.teacher_model is not None and kd.teacher_model != name:
        raise ConfigError(
            f"trainer.distill.teacher_model={kd.teacher_model!r} is invalid: the checkpoint "
            f"{kd.teacher} holds a {name}; leave teacher_model unset for a resnet-train checkpoint"
        )
    if "fc.weight" not in weights.state:
        raise CheckpointError(f"{KEY}={kd.teacher} holds no classifier (fc.weight): not a ResNet")
    classes = weights.state["fc.weight"].shape[0]
    student = cfg.model.num_classes or cfg.data.num_classes
    if classes != student:
        whose = (f"the student has {student} (model.num_classes)" if cfg.model.num_classes
                 else f"the student's data ({cfg.data.name}) has {student}")  # fmt: skip
        raise ConfigError(
            f"{KEY}={kd.teacher} is invalid: its classifier has {classes} classes, {whose}"
        )
    if name not in list_models():
        raise CheckpointError(f"{KEY}={kd.teacher} holds a {name!r}, not a model of this version")
    model = create_model(name, **options_of(weights))
    apply_pruned_widths(model, weights, KEY)
    try:
        load_state(model, weights, replace_classifier=False, key=KEY)
    except CheckpointError as e:
        hint = "" if saved else " (set trainer.distill.teacher_model to its architecture)"
        raise CheckpointError(f"{e}{hint}") from None
    model.eval().requires_grad_(False)
    data = (weights.config or {}).get("data") or {}
    mean, std = data.get("mean"), data.get("std")
    if (isinstance(mean, list) and isinstance(std, list)
            and (list(mean), list(std)) != (list(cfg.data.mean), list(cfg.data.std))):  # fmt: skip
        log.info("the teacher was trained with data.mean=%s data.std=%s: its images are "
                 "normalised so", mean, std)  # fmt: skip
        model = Renormalized(model, (cfg.data.mean, cfg.data.std), (mean, std))
    return Teacher(model, name, weights.path, file_sha256(weights.path))


def _named(classes: list[str] | None) -> bool:
    """Whether the classes have names: class0, class1, ... stand for none (a data set without
    its names file, synthetic data)."""
    return bool(classes) and list(classes) != [f"class{i}" for i in range(len(classes))]


def _names(classes: list[str], shown: int = 4) -> str:
    return ", ".join(classes[:shown]) + (f", ... ({len(classes)})" if len(classes) > shown else "")


class Renormalized(nn.Module):
    """A model trained on images normalised with other mean and std than the ones it is given:
    (x x std + mean - its mean) / its std, per channel, before it."""

    def __init__(self, model: nn.Module, given: tuple, its: tuple) -> None:
        super().__init__()
        self.model = model
        given_mean, given_std, mean, std = (torch.tensor(list(v)).view(1, 3, 1, 1)
                                            for v in (*given, *its))  # fmt: skip
        self.register_buffer("scale", given_std / std)
        self.register_buffer("shift", (given_mean - mean) / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images * self.scale.to(images.dtype) + self.shift.to(images.dtype))


def check_same_teacher(saved: dict[str, Any] | None, teacher: Teacher | None, where: Path) -> None:
    """A resumed run distils from the teacher it started with: the same file contents (the path
    may change)."""
    now = teacher.record() if teacher is not None else None
    if (saved or {}).get("sha256") == (now or {}).get("sha256"):
        return

    def show(record: dict[str, Any] | None) -> str:
        if record is None:
            return "no teacher"
        return f"{record['model']} {record['path']} (sha256 {record['sha256'][:12]})"

    raise CheckpointError(
        f"{where} was distilled from another teacher: {show(saved)} -> {show(now)}; resume with "
        "the teacher it started with"
    )


class DistillLoss:
    """(1 - alpha) * the label objective + alpha * T^2 * KL(teacher || student) at temperature T
    (the T^2 keeps the soft loss's gradients on the scale of the label loss's)."""

    def __init__(
        self, label_loss: Any, teacher: nn.Module, temperature: float, alpha: float
    ) -> None:
        self.label_loss = label_loss
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha

    def __call__(
        self, images: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        hard = self.label_loss(images, outputs, labels)
        with torch.no_grad():
            teacher_outputs = self.teacher(images)
        soft = soft_loss(outputs, teacher_outputs, self.temperature)
        return (1 - self.alpha) * hard + self.alpha * soft


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch, in fp32."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
