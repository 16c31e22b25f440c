"""task=eval: a trained model's figures on one part of the data.

Top-1 and top-5 accuracy, loss, per-class accuracy (recall), the confusion matrix (CSV and PNG,
class names on the axes), the expected calibration error (Guo et al. 2017: |accuracy - mean
confidence| per equal-width confidence bin, weighted by the bin's share of the images) and, with
eval.tta=true, the same with the logits of each image and its mirror image averaged. The images
are read in the order and batches of the training run's own evaluation, so the test accuracy of
a run's best.pt is reproduced exactly.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from resnet_train.config import flatten
from resnet_train.data.loaders import build_eval_loader
from resnet_train.deploy.source import LOCAL_KEYS, Trained, load_trained
from resnet_train.deploy.staging import Staging
from resnet_train.logging import loss_text, progress_bar, write_json
from resnet_train.precision import autocast

log = logging.getLogger("resnet_train")
# Class names on the confusion matrix's axes up to this many classes (beyond, a grid of colour).
MAX_LABELLED_CLASSES = 100


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str = "fp32",
    tta: bool = False,
    desc: str = "eval",
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32, labels) of every image the loader yields, on the CPU."""
    model.eval()
    outputs, labels = [], []
    bar = progress_bar(len(loader.dataset), desc, progress)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images).float()
            if tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        outputs.append(logits.cpu())
        labels.append(targets.cpu())
        bar.update(targets.shape[0])
    bar.close()
    return torch.cat(outputs), torch.cat(labels)


def calibration(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error (in %) over `bins` equal-width bins of (0, 1], and the bins."""
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1])  # bin i holds (e_i, e_i+1]
    n = len(confidence)
    ece, table = 0.0, []
    for i in range(bins):
        mask = which == i
        count = int(mask.sum())
        acc = float(correct[mask].float().mean()) if count else 0.0
        conf = float(confidence[mask].mean()) if count else 0.0
        ece += count / n * abs(acc - conf)
        table.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": count,
                      "accuracy": 100 * acc, "confidence": 100 * conf})  # fmt: skip
    return 100 * ece, table


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, names: list[str], bins: int = 15
) -> dict[str, Any]:
    """The figures of eval.json (accuracies and ECE in %). A model with more outputs than the
    data has classes (model.num_classes > data.num_classes) may predict a class the data lacks:
    such predictions are wrong, counted in the confusion matrix's last column, "other"."""
    n, outputs = logits.shape
    classes = len(names)
    k = min(5, outputs)
    top = logits.topk(k, dim=1).indices
    predicted = top[:, 0]
    correct = predicted == labels
    columns = classes + (1 if outputs > classes else 0)
    confusion = torch.zeros(classes, columns, dtype=torch.long)
    confusion.index_put_((labels, predicted.clamp(max=columns - 1)), torch.ones(n).long(),
                         accumulate=True)  # fmt: skip
    per_class_total = confusion.sum(1)
    per_class = {
        name: (100 * int(confusion[i, i]) / int(per_class_total[i]) if per_class_total[i] else None)
        for i, name in enumerate(names)
    }
    confidence = logits.softmax(1).max(1).values
    ece, bin_table = calibration(confidence, correct, bins)
    return {
        "images": n,
        "loss": float(nn.functional.cross_entropy(logits, labels)),
        "top1": 100 * int(correct.sum()) / n,
        # top-5, or top-k of all k outputs where a model has fewer than 5
        "top5": 100 * int((top == labels[:, None]).any(1).sum()) / n,
        "ece": ece,
        # the mean per-class accuracy over the classes with images here
        "balanced_acc": _mean([v for v in per_class.values() if v is not None]),
        "per_class_accuracy": per_class,
        "calibration_bins": bin_table,
        "confusion": confusion,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def predicted_names(names: list[str], confusion: torch.Tensor) -> list[str]:
    """The confusion matrix's column names: the classes, and "other" where it has that column."""
    return names + ["other"] * (confusion.shape[1] - len(names))


def confusion_figure(confusion: torch.Tensor, names: list[str], title: str) -> Any:
    """The confusion matrix as a figure: rows are the true classes, columns the predicted ones,
    each row in % of its class (the counts written in the cells up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, columns = len(names), predicted_names(names, confusion)
    rows = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1) * 100
    side = min(max(6.0, 0.32 * c + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if c <= MAX_LABELLED_CLASSES:
        size = 10 if c <= 20 else max(4, 9 - c // 20)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=size)
        ax.set_yticks(range(c), names, fontsize=size)
    if c <= 20:
        for i in range(c):
            for j in range(len(columns)):
                value = int(confusion[i, j])
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if rows[i, j] > 50 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def reliability_figure(bins: list[dict[str, float]], ece: float, title: str) -> Any:
    """Accuracy against confidence per bin (a calibrated model lies on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    width = bins[0]["high"] - bins[0]["low"]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] / 100 for b in bins], width=width * 0.95, edgecolor="black",
           label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {ece:.2f}%")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def write_confusion_csv(path: Path, confusion: torch.Tensor, names: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *predicted_names(names, confusion)])
        for name, row in zip(names, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    os.replace(tmp, path)


def split_changes(trained: Trained) -> list[str]:
    """The data settings (and seed) in which this evaluation differs from the run that made the
    checkpoint ("data.test_size: 2000 -> None"), and an image folder's changed files; empty when
    the same images are evaluated."""
    saved = trained.weights.config or {}
    current = {"data": OmegaConf.to_container(trained.cfg.data), "seed": trained.cfg.seed}
    old = flatten({"data": saved.get("data", {}), "seed": saved.get("seed")})
    new = flatten(current)
    changes = [
        f"{key}: {old.get(key)} -> {new.get(key)}"
        for key in sorted(old.keys() | new.keys())
        if key not in LOCAL_KEYS and old.get(key) != new.get(key)
    ]
    if trained.files_changed is not None:
        changes.append(f"data.root's files: {trained.files_changed}")
    return changes


def training_report(trained: Trained, split: str) -> float | None:
    """The test accuracy the training run reported for this very file, where it said one."""
    path = trained.weights.path
    metrics = path.parent / "metrics.json"
    if split != "test" or trained.weights.config is None or not metrics.is_file():
        return None
    try:
        data = json.loads(metrics.read_text())
        if data.get("selected_checkpoint") == path.name:
            return float(data["test"]["acc"])
    except (ValueError, KeyError, TypeError):
        return None
    return None


def run_eval(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Evaluate model.weights on eval.split; write eval.json, the confusion matrix (CSV, PNG), the
    reliability diagram and TensorBoard records into run_dir; return eval.json's content."""
    trained = load_trained(cfg, overrides)
    trained.check_data_classes()
    cfg, split = trained.cfg, cfg.eval.split
    names = trained.class_names()
    loader = build_eval_loader(cfg.data, cfg.seed, trained.device, split, trained.channels_last)
    start = time.perf_counter()
    logits, labels = collect_logits(
        trained.model, loader, trained.device, cfg.trainer.precision, cfg.eval.tta,
        f"eval {split}", cfg.trainer.progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    figures = classification_metrics(logits, labels, names, cfg.eval.calibration_bins)
    confusion = figures.pop("confusion")
    title = f"{cfg.model.name} on {cfg.data.name} {split} ({figures['images']} images)"
    import matplotlib.pyplot as plt

    # (flip TTA is not what the run tested)
    reported = None if cfg.eval.tta else training_report(trained, split)
    result = {
        **trained.record(split),
        "tta": bool(cfg.eval.tta),
        "precision": cfg.trainer.precision,
        **figures,
        "training_reported_test_acc": reported,
        # where the evaluated images are not the run's test images: the settings that differ
        "data_differs_from_the_run": split_changes(trained) if reported is not None else [],
        "seconds": seconds,
        "images_per_s": figures["images"] / seconds if seconds > 0 else None,
        "from_checkpoint_run": trained.adopted,
        "class_names": names,
    }
    # The files are put in place together at the end, eval.json last (deploy.staging).
    with Staging(run_dir) as stage:
        write_confusion_csv(stage.file("confusion_matrix.csv"), confusion, names)
        pictures = {
            "confusion_matrix.png": confusion_figure(confusion, names, title),
            "reliability.png": reliability_figure(
                figures["calibration_bins"], figures["ece"], title
            ),
        }
        writer = SummaryWriter(log_dir=str(stage.folder("tensorboard")))
        for file, figure in pictures.items():
            figure.savefig(stage.file(file))
            writer.add_figure(f"eval/{split}/{file.removesuffix('.png')}", figure, close=False)
            plt.close(figure)
        for key in ("loss", "top1", "top5", "balanced_acc", "ece"):
            if key in figures:
                writer.add_scalar(f"eval/{split}/{key}", figures[key], 0)
        writer.close()
        write_json(stage.file("eval.json"), result)
        stage.commit()
    log.info(
        "%s on %s %s (%d images%s): loss %s  top-1 %.2f%%  top-5 %.2f%%  balanced %.2f%%  "
        "ECE %.2f%%",
        cfg.model.name, cfg.data.name, split, figures["images"],
        ", flip TTA" if cfg.eval.tta else "", loss_text(figures["loss"]), figures["top1"],
        figures["top5"], figures["balanced_acc"], figures["ece"],
    )  # fmt: skip
    if reported is not None:
        changes = split_changes(trained)
        if changes:
            log.info("training reported test acc %.2f%% for %s on other images (%s)", reported,
                     trained.weights.path.name, "; ".join(changes))  # fmt: skip
        else:
            same = "the same" if math.isclose(reported, figures["top1"]) else "it differs"
            log.info("training reported test acc %.2f%% for %s: %s", reported,
                     trained.weights.path.name, same)  # fmt: skip
    worst = sorted((v, k) for k, v in figures["per_class_accuracy"].items() if v is not None)[:3]
    log.info("lowest per-class accuracy: %s", ", ".join(f"{k} {v:.1f}%" for v, k in worst))
    log.info("wrote %s: eval.json, confusion_matrix.csv, confusion_matrix.png, reliability.png",
             run_dir)  # fmt: skip
    return result
