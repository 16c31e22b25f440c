"""The trained model that task=eval and task=export work on: model.weights, with the settings of
the run that made it.

A resnet-train checkpoint carries its run's config: its model, its data settings (the split, the
subsets, mean and std, image size, batch size), its seed and its precision are taken from it, so
that `task=eval model.weights=outputs/RUN/best.pt` evaluates exactly the images and the model the
run did. Keys given on the command line win (data.root, data.test_size=null, ...); another data
set chosen with `data=NAME` replaces the saved data settings as a whole (the run's own, named
again, keeps them; `model=NAME` likewise). A torchvision .pth carries no config: the command
line's model and data are used as they are.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from resnet_train.config import flatten, validate
from resnet_train.data.settle import settle_data
from resnet_train.errors import MissingDependencyError
from resnet_train.models.build import apply_pruned_widths, build_model, without_weights
from resnet_train.models.qat import prepare_qat
from resnet_train.models.weights import WeightsFile, file_sha256, load_state, read_weights
from resnet_train.precision import channels_last_for

log = logging.getLogger("resnet_train")

# The settings a checkpoint's own run decides, unless given on the command line.
ADOPTED_SECTIONS = ("model", "data")
ADOPTED_KEYS = ("seed", "trainer.precision", "trainer.channels_last", "trainer.qat")
# Where this machine keeps things: never taken from the checkpoint.
LOCAL_KEYS = ("model.weights", "data.root", "data.download", "data.num_workers")
_ABSENT = object()


@dataclass
class Trained:
    """A trained model ready for inference (eval mode, on its device) and what describes it."""

    cfg: DictConfig  # the effective config: the checkpoint's settings under the command line's
    model: nn.Module
    weights: WeightsFile
    device: torch.device
    channels_last: bool
    adopted: list[str]  # the keys taken from the checkpoint

    @functools.cached_property
    def sha256(self) -> str:
        """Of the weights file; read when a record asks for it (not by the command's check)."""
        return file_sha256(self.weights.path)

    @property
    def saved_classes(self) -> list[str] | None:
        """The class names the checkpoint's run saved (None for a bare .pth, older files)."""
        saved = (self.weights.checkpoint or {}).get("classes")
        return saved if isinstance(saved, list) and saved else None

    def class_names(self) -> list[str]:
        """The class names the checkpoint's run saved; else the data's (its files, or class0,
        class1, ...)."""
        saved = self.saved_classes
        if saved is not None and len(saved) == self.cfg.data.num_classes:
            return [str(name) for name in saved]
        from resnet_train.data.loaders import class_names
        from resnet_train.errors import DataError

        try:
            return class_names(self.cfg.data, self.cfg.seed)
        except DataError as e:  # a bare .pth, and its data set is not here
            log.warning("no class names (%s): class0, class1, ... instead", e)
            return [f"class{i}" for i in range(self.cfg.data.num_classes)]

    def check_data_classes(self, warn: bool = True) -> None:
        """The data evaluated (an image folder) has the classes the model was trained on; a
        folder whose files are not the run's is warned of (files_changed), unless warn=False
        (the command's check before the task, which warns in its log)."""
        saved = self.saved_classes
        if self.cfg.data.name != "imagefolder" or saved is None:
            return
        from resnet_train.data.loaders import class_names

        here = class_names(self.cfg.data, self.cfg.seed)
        if list(saved) != here:
            from resnet_train.errors import DataError

            raise DataError(
                f"data.root={self.cfg.data.root} has the classes {', '.join(here[:6])}"
                f"{' ...' if len(here) > 6 else ''} but {self.weights.path.name} was trained on "
                f"{', '.join(saved[:6])}{' ...' if len(saved) > 6 else ''}: point data.root at "
                "images of the model's classes"
            )
        if warn and self.files_changed is not None:
            log.warning(
                "data.root=%s does not hold the files %s was trained on (%s): images added or "
                "removed move others between the splits, so a split carved from it "
                "(data.test_ratio, data.valid_ratio) may now hold images the model trained on",
                self.cfg.data.root, self.weights.path.name, self.files_changed,
            )  # fmt: skip

    @functools.cached_property
    def files_changed(self) -> str | None:
        """data=imagefolder: how its files differ from those the checkpoint's run read ("train/
        valid/test images 24/3/3 then, 25/3/4 now"); None where they are the same, or where the
        checkpoint does not say (a bare .pth, a pruned or exported model)."""
        saved = (self.weights.checkpoint or {}).get("data_files")
        if self.cfg.data.name != "imagefolder" or not isinstance(saved, dict):
            return None
        from resnet_train.data.loaders import data_fingerprint

        now = data_fingerprint(self.cfg.data, self.cfg.seed)
        if now is None or now["sha256"] == saved.get("sha256"):
            return None
        splits = ("train", "valid", "test")
        then = "/".join(str(saved.get("images", {}).get(s, "?")) for s in splits)
        return f"train/valid/test images {then} then, " + "/".join(
            str(now["images"][s]) for s in splits) + " now"  # fmt: skip

    def record(self, split: str) -> dict[str, Any]:
        """What a task's record says of its source: the weights file, the model and the data."""
        return {
            "weights": str(self.weights.path),
            "sha256": self.sha256,
            "model": self.cfg.model.name,
            "data": self.cfg.data.name,
            "split": split,
        }


def given_keys(overrides: list[str]) -> set[str]:
    """The keys and groups set on the command line ("data.root=x" -> "data.root", "data=cifar100"
    -> "data")."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def own_choices(overrides: list[str], saved: dict[str, Any]) -> set[str]:
    """The groups the command line chose as the checkpoint's run did (`data=imagefolder` for a
    model trained on data=imagefolder): naming its own data set or model keeps its settings."""
    own = set()
    for override in overrides:
        group, _, choice = override.partition("=")
        if group in ADOPTED_SECTIONS and choice == (saved.get(group) or {}).get("name"):
            own.add(group)
    return own


def _given(key: str, given: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in given for i in range(1, len(parts) + 1))


def adopt_config(
    cfg: DictConfig, saved: dict[str, Any], given: set[str]
) -> tuple[DictConfig, list[str]]:
    """cfg with the saved run's settings (ADOPTED_SECTIONS, ADOPTED_KEYS) wherever the command
    line did not set them; returns it and the keys whose value changed."""
    out = copy.deepcopy(cfg)
    saved_leaves = flatten(saved)
    adopted = []
    derived = _derived_keys(saved_leaves, given)
    for key, value in saved_leaves.items():
        section = key.split(".", 1)[0]
        if section not in ADOPTED_SECTIONS and key not in ADOPTED_KEYS:
            continue
        if key in LOCAL_KEYS or key in derived or _given(key, given):
            continue
        current = OmegaConf.select(out, key, default=_ABSENT)
        if current is _ABSENT:  # a key this version no longer has
            continue
        if OmegaConf.is_config(current):
            current = OmegaConf.to_container(current)
        if current != value:
            OmegaConf.update(out, key, value, merge=False)
            adopted.append(key)
    return out, adopted


def _derived_keys(saved: dict[str, Any], given: set[str]) -> set[str]:
    """Saved keys that the run derived from others the command line now changes, and that are
    derived again rather than adopted: data.eval_resize from data.image_size (a model
    evaluated at 64 px is resized for 64, not for the 32 it trained at)."""
    from resnet_train.config import settled_eval_resize

    size, crop = saved.get("data.image_size"), saved.get("data.augment.crop")
    if (_given("data.image_size", given) and size is not None and crop is not None
            and saved.get("data.eval_resize") == settled_eval_resize(size, crop)):  # fmt: skip
        return {"data.eval_resize"}
    return set()


def adopted_for_checks(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A task that reads a trained model (task=eval, ...): cfg with the checkpoint's settings
    adopted where the command line did not give them (as the task will run), so that the keys
    given are checked against the checkpoint's data set, not the config's default; cfg itself
    where model.weights is no readable resnet-train checkpoint (the task's checks say why)."""
    from pathlib import Path

    from resnet_train.config import WEIGHTS_TASKS
    from resnet_train.errors import UserError

    weights = cfg.model.get("weights") if cfg.get("task") in WEIGHTS_TASKS else None
    if not weights or not Path(str(weights)).expanduser().is_file():
        return cfg
    try:
        saved = read_weights(str(weights), peek=True).config
    except UserError:
        return cfg
    if saved is None:
        return cfg
    own = own_choices(overrides, saved)
    return adopt_config(cfg, saved, given_keys(overrides) - own)[0]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_trained(cfg: DictConfig, overrides: list[str], fake_quant: bool = True) -> Trained:
    """Read model.weights, settle the config it runs under, build the model and load it strictly
    (a classifier of another size is an error here, not a fine-tuning start). The model of a
    quantization-aware run (trainer.qat=true) fake-quantizes, as it did when its run tested it,
    unless fake_quant=False (the export, whose int8 model quantizes for real)."""
    weights = read_weights(cfg.model.weights)
    adopted: list[str] = []
    if weights.config is not None:
        own = own_choices(overrides, weights.config)
        if own:
            named = ", ".join(f"{g}={weights.config[g]['name']}" for g in sorted(own))
            log.info("%s: the checkpoint's own, with its settings (give a key to change one)",
                     named)  # fmt: skip
        cfg, adopted = adopt_config(cfg, weights.config, given_keys(overrides) - own)
        validate(cfg)
    settle_data(cfg)
    model = build_model(without_weights(cfg))  # (loaded strictly below)
    apply_pruned_widths(model, weights, "model.weights")
    load_state(model, weights, replace_classifier=False, model_name=cfg.model.name)
    if fake_quant and cfg.trainer.qat:
        prepare_qat(model)
        log.info("trainer.qat=true: evaluated with fake int8 quantization, as trained "
                 "(trainer.qat=false for the float model)")  # fmt: skip
    device = resolve_device(cfg.trainer.device)
    channels_last = channels_last_for(cfg.trainer.channels_last, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    if adopted:
        log.info("from the checkpoint's run: %s", ", ".join(
            f"{k}={OmegaConf.select(cfg, k)}" for k in adopted))  # fmt: skip
    return Trained(cfg, model, weights, device, channels_last, adopted)


def require(module: str, feature: str) -> Any:
    """Import an optional dependency of the deploy extra, or fail with the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{feature} needs {module}, which is not installed: pip install 'resnet-train[deploy]'"
        ) from None
