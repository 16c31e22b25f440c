"""The training run: fit() calls train_one_epoch() and evaluate(), keeps checkpoints and logs."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from resnet_train.config import to_dict
from resnet_train.data import build_loaders
from resnet_train.engine.checkpoint import (
    FORMAT_VERSION,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from resnet_train.errors import CheckpointError, RunDirError
from resnet_train.logging import log, progress_bar, tensorboard_writer
from resnet_train.models.build import build_model
from resnet_train.optim import build_optimizer, build_scheduler

# Tqdm's loss/accuracy figures are read from the device every this many steps, not every step.
BAR_REFRESH_STEPS = 10


@dataclass
class EpochStats:
    loss: float
    acc: float  # top-1 accuracy, percent
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str,
    progress: bool | None,
    writer=None,
    global_step: int = 0,
    log_every_steps: int = 50,
) -> tuple[EpochStats, int]:
    model.train()
    # Sums stay on the device; they are read back only every BAR_REFRESH_STEPS and at the end.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(len(loader.dataset), desc, progress)
    for step, (images, targets) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        outputs = model(images)
        loss = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        global_step += 1

        batch = targets.shape[0]
        seen += batch
        loss_sum += loss.detach() * batch
        correct += (outputs.detach().argmax(1) == targets).sum()
        if writer is not None and global_step % log_every_steps == 0:
            writer.add_scalar("train/loss_step", loss.item(), global_step)
        bar.update(batch)
        if not bar.disable and (step % BAR_REFRESH_STEPS == 0 or step in (1, len(loader))):
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}%"
            )
    bar.close()
    seconds = time.perf_counter() - start
    loss_value = loss_sum.item() / max(seen, 1)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"the training loss is {loss_value} in {desc}")
    stats = EpochStats(loss_value, 100 * correct.item() / max(seen, 1), seen, seconds)
    return stats, global_step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    device: torch.device,
    desc: str,
    progress: bool | None,
) -> EpochStats:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(len(loader.dataset), desc, progress)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        outputs = model(images)
        loss_sum += criterion(outputs, targets) * targets.shape[0]
        correct += (outputs.argmax(1) == targets).sum()
        seen += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    return EpochStats(
        loss_sum.item() / max(seen, 1), 100 * correct.item() / max(seen, 1), seen, seconds
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_run_dir(run_dir: Path, resume: str | None) -> None:
    """Refuse to train into a directory that already holds another run's checkpoints."""
    existing = [p.name for p in (run_dir / "last.pt", run_dir / "best.pt") if p.exists()]
    if existing and resume is None:
        raise RunDirError(
            f"run directory {run_dir} already holds {', '.join(existing)}; choose another "
            f"hydra.run.dir, or continue it with resume={run_dir / 'last.pt'}"
        )


def fit(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train cfg's model on cfg's data; write checkpoints, TensorBoard logs and metrics.json in
    run_dir; return the metrics."""
    wall_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, cfg.resume)
    resume_state = load_checkpoint(cfg.resume) if cfg.resume else None

    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    loaders = build_loaders(cfg.data, cfg.seed, device)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.schedule, optimizer, cfg.trainer.epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)

    start_epoch, global_step = 0, 0
    best_acc, best_epoch = None, None
    if resume_state is not None:
        _restore(resume_state, cfg, model, optimizer, scheduler)
        start_epoch = resume_state["epoch"]
        global_step = resume_state.get("global_step", 0)
        best_acc, best_epoch = resume_state.get("best_acc"), resume_state.get("best_epoch")
        previous_best = Path(cfg.resume).expanduser().parent / "best.pt"
        if (
            best_epoch is not None
            and previous_best.is_file()
            and not (run_dir / "best.pt").exists()
        ):
            copy_checkpoint(previous_best, run_dir / "best.pt")
        log.info("resumed from %s after epoch %d", cfg.resume, start_epoch)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s (%.2fM parameters) on %s, %d training / %d validation / %d test images, device %s",
        cfg.model.name,
        n_params / 1e6,
        cfg.data.name,
        len(loaders.train.dataset),
        len(loaders.valid.dataset) if loaders.valid else 0,
        len(loaders.test.dataset),
        device,
    )
    if loaders.valid is None:
        log.info(
            "no validation set (data.valid_ratio=%s): no model selection; the last checkpoint "
            "is kept and evaluated on the test set",
            cfg.data.valid_ratio,
        )
    log.info("run directory: %s", run_dir)

    writer = tensorboard_writer(run_dir)
    epochs = cfg.trainer.epochs
    progress = cfg.trainer.progress
    throughputs = []
    train_stats = valid_stats = None
    best_valid: dict[str, float] | None = None
    try:
        for epoch in range(start_epoch, epochs):
            tag = f"epoch {epoch + 1}/{epochs}"
            lr = optimizer.param_groups[0]["lr"]
            train_stats, global_step = train_one_epoch(
                model,
                loaders.train,
                criterion,
                optimizer,
                device,
                f"{tag} train",
                progress,
                writer,
                global_step,
                cfg.trainer.log_every_steps,
            )
            scheduler.step()
            throughputs.append(train_stats.images_per_s)
            line = (
                f"{tag}  train loss {train_stats.loss:.4f} acc {train_stats.acc:.2f}%  "
                f"{train_stats.images_per_s:.0f} img/s {train_stats.seconds:.1f} s"
            )
            writer.add_scalar("train/loss", train_stats.loss, epoch + 1)
            writer.add_scalar("train/acc", train_stats.acc, epoch + 1)
            writer.add_scalar("train/images_per_s", train_stats.images_per_s, epoch + 1)
            writer.add_scalar("train/epoch_time_s", train_stats.seconds, epoch + 1)
            writer.add_scalar("lr", lr, epoch + 1)

            improved = False
            if loaders.valid is not None:
                valid_stats = evaluate(
                    model, loaders.valid, criterion, device, f"{tag} valid", progress
                )
                writer.add_scalar("valid/loss", valid_stats.loss, epoch + 1)
                writer.add_scalar("valid/acc", valid_stats.acc, epoch + 1)
                line += f"  | valid loss {valid_stats.loss:.4f} acc {valid_stats.acc:.2f}%"
                improved = best_acc is None or valid_stats.acc > best_acc
                if improved:
                    best_acc, best_epoch = valid_stats.acc, epoch + 1
                    best_valid = {"loss": valid_stats.loss, "acc": valid_stats.acc}
            log.info("%s  lr %.4g%s", line, lr, "  (best)" if improved else "")

            state = {
                "format_version": FORMAT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "global_step": global_step,
                "best_acc": best_acc,
                "best_epoch": best_epoch,
                "best_valid": best_valid,
                "config": to_dict(cfg),
                "torch_version": str(torch.__version__),
            }
            save_checkpoint(state, run_dir / "last.pt")
            if improved:
                copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt")
            writer.flush()

        # The test set is read once, at the end, with the selected weights.
        selected = "best.pt" if loaders.valid is not None else "last.pt"
        final = load_checkpoint(run_dir / selected)
        model.load_state_dict(final["model"])
        test_stats = evaluate(model, loaders.test, criterion, device, "test", progress)
        log.info(
            "test loss %.4f acc %.2f%% with %s (epoch %d)",
            test_stats.loss,
            test_stats.acc,
            selected,
            final["epoch"],
        )
        writer.add_scalar("test/loss", test_stats.loss, final["epoch"])
        writer.add_scalar("test/acc", test_stats.acc, final["epoch"])
    finally:
        writer.close()

    metrics = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs_run": epochs - start_epoch,
        "epochs_total": epochs,
        "selected_checkpoint": selected,
        "selected_epoch": final["epoch"],
        "train": asdict(train_stats) if train_stats else None,
        "valid": final.get("best_valid") if loaders.valid is not None else None,
        "test": {"loss": test_stats.loss, "acc": test_stats.acc},
        "images_per_s": float(np.median(throughputs)) if throughputs else None,
        "wall_time_s": time.perf_counter() - wall_start,
    }
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def _restore(state: dict[str, Any], cfg: DictConfig, model, optimizer, scheduler) -> None:
    saved_model = state["config"].get("model", {}).get("name")
    if saved_model != cfg.model.name:
        raise CheckpointError(
            f"resume={cfg.resume} holds a {saved_model} model, not model.name={cfg.model.name}"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"resume={cfg.resume} does not fit this run's model or optimizer: {first}"
        ) from None
    if state["epoch"] >= cfg.trainer.epochs:
        raise CheckpointError(
            f"resume={cfg.resume} already finished epoch {state['epoch']} of trainer.epochs="
            f"{cfg.trainer.epochs}; raise trainer.epochs to train further"
        )
