"""curves.png: a run's learning curves, readable without TensorBoard.

Per epoch (the resumed processes' epochs included, from metrics.json's history): training and
validation loss, training and validation accuracy with the test accuracy of the selected
checkpoint marked, and the learning rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_curves(path: Path, metrics: dict[str, Any]) -> None:
    """Draw metrics.json's history into path (a PNG), replaced whole."""
    import os

    # A bare Figure renders to PNG without pyplot and its backend machinery (0.3 s less import)
    from matplotlib.figure import Figure

    history = metrics.get("history") or []
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(15, 4.2), dpi=100)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy (%)")):
        ax.plot(epochs, [h.get(f"train_{key}") for h in history], "o-", label="train")
        if any(h.get(f"valid_{key}") is not None for h in history):
            ax.plot(epochs, [h.get(f"valid_{key}") for h in history], "s-", label="validation")
        if any(h.get(f"test_{key}") is not None for h in history):
            ax.plot(epochs, [h.get(f"test_{key}") for h in history], "^:", label="test (by epoch)")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    test = metrics.get("test") or {}
    if test.get("acc") is not None and metrics.get("selected_epoch"):
        label = f"test {test['acc']:.2f}% ({metrics.get('selected_checkpoint')})"
        acc_ax.plot([metrics["selected_epoch"]], [test["acc"]], "r*", markersize=14, label=label)
    losses = [v for h in history for k in ("train_loss", "valid_loss", "test_loss")
              if (v := h.get(k)) is not None and v > 0]  # fmt: skip
    if losses and max(losses) / min(losses) > 50:  # early BN-lag spikes would flatten the rest
        loss_ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax, lr_ax):
        if len(epochs) <= 12:  # one tick per epoch (a locator finds no integers in a 1-epoch run)
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    acc_ax.legend(loc="lower right")
    lr_ax.plot(epochs, [h.get("lr") for h in history], "o-", color="tab:green")
    lr_ax.set_xlabel("epoch")
    lr_ax.set_title("learning rate (at the epoch's start)")
    lr_ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics.get('model')} on {metrics.get('data')}: "
                 f"{metrics.get('epochs_done')}/{metrics.get('epochs_total')} epochs")  # fmt: skip
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
