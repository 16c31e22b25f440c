"""The training run: fit() calls train_one_epoch() and evaluate(), keeps checkpoints and logs."""

from __future__ import annotations

import contextlib
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from resnet_train.config import TrainerConfig, to_dict
from resnet_train.data import build_loaders
from resnet_train.data.transforms import build_batch_mixer
from resnet_train.engine.checkpoint import (
    FORMAT_VERSION,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from resnet_train.engine.early_stopping import Monitor
from resnet_train.errors import CheckpointError, RunDirError
from resnet_train.logging import log, progress_bar, tensorboard_writer
from resnet_train.models.build import build_model
from resnet_train.optim import build_optimizer, build_scheduler, effective_lr

# Tqdm's loss/accuracy figures are read from the device every this many steps, not every step.
BAR_REFRESH_STEPS = 10
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the step was not applied."""


@dataclass
class EpochStats:
    loss: float
    acc: float  # top-1 accuracy, percent
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Training:
    """What an optimizer step reads and changes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    device: torch.device
    cfg: TrainerConfig
    step_schedule_per_batch: bool = False
    ema: AveragedModel | None = None
    mixer: Any = None
    writer: Any = None
    global_step: int = 0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this for deterministic matmuls on CUDA (torch's reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_criterion(label_smoothing: float) -> nn.Module:
    """Training loss: cross-entropy on int labels, or on the soft labels of MixUp / CutMix, with
    label smoothing (Szegedy et al. 2016) mixing each target with the uniform distribution."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def _log_grad_norms(t: Training) -> None:
    for name, p in t.model.named_parameters():
        if p.grad is not None and p.ndim > 1:
            t.writer.add_scalar(f"grad_norm/{name}", p.grad.norm().item(), t.global_step)


def _optimizer_step(t: Training, log_now: bool) -> None:
    """Unscale (fp16), clip, step the optimizer, the scaler, the EMA and a per-step schedule."""
    cfg = t.cfg
    params = [p for p in t.model.parameters() if p.grad is not None]
    layer_norms_now = (
        cfg.grad_norm_every_steps and (t.global_step + 1) % cfg.grad_norm_every_steps == 0
    )
    if cfg.clip_grad_norm or cfg.clip_grad_value or log_now or layer_norms_now:
        t.scaler.unscale_(t.optimizer)  # clipping and norms see the true gradients
    grad_norm = None
    if cfg.clip_grad_value:
        torch.nn.utils.clip_grad_value_(params, cfg.clip_grad_value)
    if cfg.clip_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    elif log_now:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
    t.global_step += 1
    if t.writer is not None:
        if log_now and grad_norm is not None:
            t.writer.add_scalar("train/grad_norm", grad_norm.item(), t.global_step)
        if layer_norms_now:
            _log_grad_norms(t)
        t.writer.add_scalar("lr", t.optimizer.param_groups[0]["lr"], t.global_step)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update_parameters(t.model)
    if t.step_schedule_per_batch:
        t.scheduler.step()


def train_one_epoch(t: Training, loader: DataLoader, desc: str) -> EpochStats:
    """One pass over loader. With accumulate_steps=k, gradients of k micro-batches are summed
    (each loss divided by the group's size) before one optimizer step; an epoch whose batch
    count is not a multiple of k steps on its last, smaller group too."""
    model, cfg = t.model, t.cfg
    model.train()
    k, n_batches = cfg.accumulate_steps, len(loader)
    # Sums stay on the device; they are read back only every BAR_REFRESH_STEPS and at the end.
    loss_sum = torch.zeros((), device=t.device)
    correct = torch.zeros((), device=t.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(len(loader.dataset), desc, cfg.progress)
    for i, (images, targets) in enumerate(loader):
        images = images.to(t.device, non_blocking=True)
        targets = targets.to(t.device, non_blocking=True)
        group_start = i - i % k
        group_size = min(k, n_batches - group_start)
        last_in_group = i == group_start + group_size - 1
        labels = targets
        if t.mixer is not None:
            images, labels = t.mixer(images, targets)
        # Under DDP, only the last micro-batch of a group all-reduces its gradients.
        sync = contextlib.nullcontext()
        if not last_in_group and hasattr(model, "no_sync"):
            sync = model.no_sync()
        with sync:
            with autocast(t.device, cfg.precision):
                outputs = model(images)
                loss = t.criterion(outputs, labels)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the training loss is {loss.item()} at step {t.global_step + 1} ({desc}); "
                    "the step was not applied and the last checkpoint is untouched"
                )
            t.scaler.scale(loss / group_size).backward()
        if last_in_group:
            log_now = (t.global_step + 1) % cfg.log_every_steps == 0
            _optimizer_step(t, log_now)
            if log_now and t.writer is not None:
                t.writer.add_scalar("train/loss_step", loss.item(), t.global_step)

        batch = targets.shape[0]
        seen += batch
        loss_sum += loss.detach().float() * batch
        correct += (outputs.detach().argmax(1) == targets).sum()
        bar.update(batch)
        if not bar.disable and ((i + 1) % BAR_REFRESH_STEPS == 0 or i in (0, n_batches - 1)):
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}%"
            )
    bar.close()
    seconds = time.perf_counter() - start
    n = max(seen, 1)
    return EpochStats(loss_sum.item() / n, 100 * correct.item() / n, seen, seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "eval",
    progress: bool | None = None,
) -> EpochStats:
    """Plain cross-entropy (no label smoothing) and top-1 accuracy over loader."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(len(loader.dataset), desc, progress)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            outputs = model(images)
        loss_sum += nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")
        correct += (outputs.argmax(1) == targets).sum()
        seen += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    n = max(seen, 1)
    return EpochStats(loss_sum.item() / n, 100 * correct.item() / n, seen, seconds)


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


def _metric(stats: EpochStats, name: str) -> float:
    return stats.acc if name.endswith("acc") else stats.loss


def fit(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train cfg's model on cfg's data; write checkpoints, TensorBoard logs and metrics.json in
    run_dir; return the metrics."""
    wall_start = time.perf_counter()
    tc = cfg.trainer
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_dir(run_dir, cfg.resume)
    resume_state = load_checkpoint(cfg.resume) if cfg.resume else None

    seed_everything(cfg.seed, tc.deterministic)
    device = resolve_device(tc.device)
    loaders = build_loaders(cfg.data, cfg.seed, device)
    model = build_model(cfg).to(device)
    global_batch = cfg.data.batch_size * tc.accumulate_steps
    lr = effective_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(cfg.optim, model, lr)
    steps_per_epoch = math.ceil(len(loaders.train) / tc.accumulate_steps)
    t = Training(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.schedule, optimizer, tc.epochs, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16"),
        criterion=build_criterion(tc.label_smoothing),
        device=device,
        cfg=tc,
        step_schedule_per_batch=cfg.schedule.interval == "step",
        mixer=build_batch_mixer(cfg.data.augment, loaders.num_classes),
    )
    if tc.ema.decay is not None:
        t.ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema.decay), use_buffers=True
        )
    es = tc.early_stopping
    monitor = Monitor(es.monitor, es.mode, es.patience, es.min_delta)

    start_epoch = 0
    if resume_state is not None:
        _restore(resume_state, cfg, t, monitor)
        start_epoch = resume_state["epoch"]
        previous_best = Path(cfg.resume).expanduser().parent / "best.pt"
        if monitor.best_epoch and previous_best.is_file() and not (run_dir / "best.pt").exists():
            copy_checkpoint(previous_best, run_dir / "best.pt")
        log.info("resumed from %s after epoch %d", cfg.resume, start_epoch)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s (%.2fM parameters) on %s, %d training / %d validation / %d test images, device %s, "
        "%s",
        cfg.model.name, n_params / 1e6, cfg.data.name, len(loaders.train.dataset),
        len(loaders.valid.dataset) if loaders.valid else 0, len(loaders.test.dataset), device,
        tc.precision,
    )  # fmt: skip
    log.info(
        "global batch %d (%d x %d accumulation steps), learning rate %.4g%s, %d optimizer "
        "steps per epoch",
        global_batch, cfg.data.batch_size, tc.accumulate_steps, lr,
        f" (optim.lr {cfg.optim.lr} x {global_batch}/{cfg.optim.reference_batch})"
        if cfg.optim.lr_scaling == "linear" else "",
        steps_per_epoch,
    )  # fmt: skip
    if loaders.valid is None:
        log.info(
            "no validation set (data.valid_ratio=%s): no model selection; the last checkpoint "
            "is kept and evaluated on the test set",
            cfg.data.valid_ratio,
        )
    log.info("run directory: %s", run_dir)

    t.writer = tensorboard_writer(run_dir)
    epochs = tc.epochs
    throughputs = []
    train_stats = None
    epochs_run = 0
    stop_reason = None
    try:
        for epoch in range(start_epoch, epochs):
            tag = f"epoch {epoch + 1}/{epochs}"
            lr_now = optimizer.param_groups[0]["lr"]
            train_stats = train_one_epoch(t, loaders.train, f"{tag} train")
            if not t.step_schedule_per_batch:
                t.scheduler.step()
            epochs_run += 1
            throughputs.append(train_stats.images_per_s)
            line = (
                f"{tag}  train loss {train_stats.loss:.4f} acc {train_stats.acc:.2f}%  "
                f"{train_stats.images_per_s:.0f} img/s {train_stats.seconds:.1f} s"
            )
            w, e = t.writer, epoch + 1
            w.add_scalar("train/loss", train_stats.loss, e)
            w.add_scalar("train/acc", train_stats.acc, e)
            w.add_scalar("train/images_per_s", train_stats.images_per_s, e)
            w.add_scalar("train/epoch_time_s", train_stats.seconds, e)

            improved, selected_weights, best_valid = False, "raw", None
            if loaders.valid is not None:
                results = {"raw": evaluate(model, loaders.valid, device, tc.precision,
                                           f"{tag} valid", tc.progress)}  # fmt: skip
                if t.ema is not None:
                    results["ema"] = evaluate(t.ema.module, loaders.valid, device, tc.precision,
                                              f"{tag} valid (EMA)", tc.progress)  # fmt: skip
                for name, stats in results.items():
                    prefix = "valid" if name == "raw" else "valid_ema"
                    w.add_scalar(f"{prefix}/loss", stats.loss, e)
                    w.add_scalar(f"{prefix}/acc", stats.acc, e)
                    line += f"  | {prefix} loss {stats.loss:.4f} acc {stats.acc:.2f}%"
                selected_weights = _select(results, tc.ema.select, monitor)
                chosen = results[selected_weights]
                best_valid = {"loss": chosen.loss, "acc": chosen.acc, "weights": selected_weights}
                improved = monitor.update(_metric(chosen, monitor.metric), e)
            log.info("%s  lr %.4g%s", line, lr_now, "  (best)" if improved else "")

            state = {
                "format_version": FORMAT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(),
                "scaler": t.scaler.state_dict(),
                "ema": t.ema.state_dict() if t.ema is not None else None,
                "monitor": monitor.state_dict(),
                "epoch": e,
                "global_step": t.global_step,
                "best_valid": best_valid,
                "weights": "raw",
                "config": to_dict(cfg),
                "torch_version": str(torch.__version__),
            }
            save_checkpoint(state, run_dir / "last.pt")
            if improved and selected_weights == "ema":
                ema_weights = t.ema.module.state_dict()
                save_checkpoint(
                    {**state, "model": ema_weights, "weights": "ema"}, run_dir / "best.pt"
                )
            elif improved:
                copy_checkpoint(run_dir / "last.pt", run_dir / "best.pt")
            w.flush()
            if monitor.should_stop:
                stop_reason = monitor.reason()
                log.info("%s", stop_reason)
                break

        # The test set is read once, at the end, with the selected weights.
        selected = "best.pt" if loaders.valid is not None else "last.pt"
        final = load_checkpoint(run_dir / selected)
        model.load_state_dict(final["model"])
        test_stats = evaluate(model, loaders.test, device, tc.precision, "test", tc.progress)
        log.info(
            "test loss %.4f acc %.2f%% with %s (epoch %d, %s weights)",
            test_stats.loss, test_stats.acc, selected, final["epoch"], final.get("weights", "raw"),
        )  # fmt: skip
        t.writer.add_scalar("test/loss", test_stats.loss, final["epoch"])
        t.writer.add_scalar("test/acc", test_stats.acc, final["epoch"])
    finally:
        t.writer.close()

    metrics = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs_run": epochs_run,
        "epochs_total": epochs,
        "stopped_early": stop_reason,
        "selected_checkpoint": selected,
        "selected_epoch": final["epoch"],
        "selected_weights": final.get("weights", "raw"),
        "train": asdict(train_stats) if train_stats else None,
        "valid": final.get("best_valid") if loaders.valid is not None else None,
        "test": {"loss": test_stats.loss, "acc": test_stats.acc},
        "images_per_s": float(np.median(throughputs)) if throughputs else None,
        "wall_time_s": time.perf_counter() - wall_start,
    }
    _write_json(run_dir / "metrics.json", metrics)
    return metrics


def _select(results: dict[str, EpochStats], select: str, monitor: Monitor) -> str:
    """Which weights the epoch's validation counts: raw, EMA, or the better of the two."""
    if "ema" not in results or select == "raw":
        return "raw"
    if select == "ema":
        return "ema"
    raw, ema = (_metric(results[k], monitor.metric) for k in ("raw", "ema"))
    return "ema" if monitor.better(ema, raw) else "raw"


def _restore(state: dict[str, Any], cfg: DictConfig, t: Training, monitor: Monitor) -> None:
    saved_model = state["config"].get("model", {}).get("name")
    if saved_model != cfg.model.name:
        raise CheckpointError(
            f"resume={cfg.resume} holds a {saved_model} model, not model.name={cfg.model.name}"
        )
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            t.scaler.load_state_dict(state["scaler"])
        if t.ema is not None and state.get("ema"):
            t.ema.load_state_dict(state["ema"])
        if state.get("monitor"):
            monitor.load_state_dict(state["monitor"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"resume={cfg.resume} does not fit this run's model or optimizer: {first}"
        ) from None
    t.global_step = state.get("global_step", 0)
    if state["epoch"] >= cfg.trainer.epochs:
        raise CheckpointError(
            f"resume={cfg.resume} already finished epoch {state['epoch']} of trainer.epochs="
            f"{cfg.trainer.epochs}; raise trainer.epochs to train further"
        )
