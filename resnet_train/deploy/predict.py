"""task=predict: the classes of new images by a trained model.

`predict.inputs` is an image, a folder (searched recursively for image files) or a text file of
image paths, one per line (blank lines and lines starting with # are skipped; relative paths are
taken from the text file's folder). Each image goes through the checkpoint's own evaluation
transform (resize, centre crop, its mean and std; a model trained on fixed-size images without a
resize gets its images resized to that size), in batches; the top predict.top_k classes with
their softmax probabilities go to predictions.csv, the first rows to the console.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from resnet_train.data.folders import (
    IMAGE_EXTENSIONS,
    FolderImages,
    image_files,
    is_image_name,
    readable_images,
)
from resnet_train.data.loaders import TransformedSubset, worker_count
from resnet_train.data.transforms import build_transform
from resnet_train.deploy.source import Trained, load_trained
from resnet_train.deploy.staging import Staging
from resnet_train.errors import DataError
from resnet_train.logging import progress_bar, write_json
from resnet_train.precision import autocast

log = logging.getLogger("resnet_train")


def list_inputs(spec: str, broken: list[Path] | None = None) -> list[Path]:
    """The image files predict.inputs names; DataError naming what is wrong. In a folder, links
    to files that are gone are left out, and added to `broken` where given."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"predict.inputs={spec} does not exist")
    if path.is_dir():
        # as a class folder is read: links followed, hidden folders (.ipynb_checkpoints) not
        files = image_files(path, broken)
        if not files:
            raise DataError(f"predict.inputs={spec} is a folder without image files")
        return files
    if is_image_name(path):
        return [path]
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # (a BOM is no path)
    except (UnicodeDecodeError, OSError):
        raise DataError(
            f"predict.inputs={spec} is neither an image file ("
            + ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            + "), a folder, nor a text file of image paths"
        ) from None
    files = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        listed = Path(entry).expanduser()
        listed = listed if listed.is_absolute() else Path(os.path.normpath(path.parent / listed))
        if not listed.is_file():
            what = "is a folder, not an image file" if listed.is_dir() else "does not exist"
            raise DataError(f"{spec}:{number}: {entry} {what} (relative paths are taken from "
                            f"{path.parent})")  # fmt: skip
        files.append(listed)
    if not files:
        raise DataError(f"predict.inputs={spec} lists no image paths")
    return files


def usable_inputs(files: list[Path], skip_bad: bool) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files whose header reads as an image; the others are an error naming the first, or
    with data.skip_bad=true left out and returned with the reason."""
    skipped: list[tuple[str, str]] = []
    good = readable_images(files, skip_bad, skipped, remove="remove it from predict.inputs")
    if not good:
        path, why = skipped[0]
        raise DataError(
            f"predict.inputs: none of the {len(skipped)} file(s) is a readable image ({path}: "
            f"{why})"
        )
    return good, skipped


def predict_transform(trained: Trained) -> Any:
    """The checkpoint's evaluation transform; where it has no resize (its images all had the
    model's size), a resize and centre crop to that size first."""
    d = trained.cfg.data
    if not d.eval_resize:
        d = copy.deepcopy(d)
        d.eval_resize = d.image_size
    return build_transform(d, train=False)


# The console table's most ranks per image (all predict.top_k are in predictions.csv).
TABLE_RANKS = 5


def _table(rows: list[list[Any]], k: int, show: int) -> list[str]:
    """The console's table: the first `show` rows, each image's top-k classes (at most
    TABLE_RANKS) with their probabilities, in aligned columns (long names cut, with ... in
    front of a path)."""
    shown = rows[:show]
    if not shown:
        return []

    def cut(text: str, limit: int) -> str:
        return text if len(text) <= limit else "..." + text[-(limit - 3) :]

    k = min(k, TABLE_RANKS)
    names = [cut(r[0], 60) for r in shown]
    cells = [[f"{cut(str(r[1 + 2 * i]), 24)} {float(r[2 + 2 * i]):.3f}" for i in range(k)]
             for r in shown]  # fmt: skip
    widths = [max(len(n) for n in names), *(max(len(c[i]) for c in cells) for i in range(k))]
    header = ["image", *(f"top-{i + 1}" for i in range(k))]
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]

    def line(parts: list[str]) -> str:
        return "  ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()

    return [line(header)] + [line([n, *c]) for n, c in zip(names, cells, strict=True)]


@torch.no_grad()
def run_predict(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Predict predict.inputs with model.weights; write predictions.csv and predict.json into
    run_dir; return predict.json's content."""
    p = cfg.predict
    trained = load_trained(cfg, overrides)
    cfg = trained.cfg
    broken: list[Path] = []
    files, skipped = usable_inputs(list_inputs(p.inputs, broken), bool(cfg.data.skip_bad))
    for path in broken:
        log.warning("predict.inputs: left out %s, a link to a file that is gone", path)
    for path, why in skipped:
        log.warning("data.skip_bad=true: left out %s (%s)", path, why)
    names = trained.class_names()
    model, device = trained.model, trained.device
    batch = int(cfg.data.batch_size)
    workers = min(worker_count(cfg.data), math.ceil(len(files) / batch))
    positions = np.arange(len(files))  # each image's label is its place in the list
    images_set = FolderImages([str(f) for f in files], positions, names, cfg.data.decoder)
    loader = DataLoader(TransformedSubset(images_set, positions, predict_transform(trained)),
                        batch_size=batch, num_workers=workers)  # fmt: skip
    memory = torch.channels_last if trained.channels_last else torch.contiguous_format
    start = time.perf_counter()
    bar = progress_bar(len(files), "predict", cfg.trainer.progress)
    probabilities = []
    for images, _ in loader:
        images = images.to(device, memory_format=memory)
        with autocast(device, cfg.trainer.precision):
            logits = model(images).float()
        probabilities.append(logits.softmax(1).cpu())
        bar.update(len(images))
    bar.close()
    seconds = time.perf_counter() - start
    probs = torch.cat(probabilities)
    outputs = probs.shape[1]
    # (model.num_classes above the data's: logits that belong to no class, named as such)
    labels = names + [f"(no class: output {i})" for i in range(len(names), outputs)]
    k = min(int(p.top_k), outputs)
    top = probs.topk(k, dim=1)
    rows = []
    for path, values, indices in zip(files, top.values.tolist(), top.indices.tolist(),
                                     strict=True):  # fmt: skip
        row: list[Any] = [str(path)]
        for value, index in zip(values, indices, strict=True):
            row += [labels[index], f"{value:.6f}"]
        rows.append(row)

    csv_path = run_dir / "predictions.csv"
    d = cfg.data
    result = {
        **trained.record("predict"),
        "inputs": str(p.inputs),
        "images": len(files),
        "skipped": [{"path": path, "why": why} for path, why in skipped],
        "top_k": k,
        "classes": labels,
        "preprocessing": {
            "resize": int(d.eval_resize or d.image_size),
            "centre_crop": int(d.image_size),
            "mean": [float(v) for v in d.mean],
            "std": [float(v) for v in d.std],
        },
        "predictions": str(csv_path),
        "seconds": seconds,
        "images_per_s": len(files) / seconds if seconds > 0 else None,
    }
    with Staging(run_dir) as stage:  # put in place together, predict.json last
        with open(stage.file(csv_path.name), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", *[f"{what}_{i + 1}" for i in range(k)
                                       for what in ("class", "prob")]])  # fmt: skip
            writer.writerows(rows)
        write_json(stage.file("predict.json"), result)
        stage.commit()
    for line in _table(rows, k, int(p.show)):
        log.info("%s", line)
    more = f" (the first {p.show} above)" if 0 < p.show < len(rows) else ""
    log.info("predicted %d images with %s in %.1f s: %s%s", len(files), trained.weights.path,
             seconds, csv_path, more)  # fmt: skip
    return result
