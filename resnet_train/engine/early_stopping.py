"""The validation monitor: which epoch is best, and when to stop."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Monitor:
    """Tracks one validation metric. `best` moves on any improvement (it picks best.pt); the
    patience counter resets only on an improvement larger than min_delta (early stopping)."""

    metric: str = "valid/acc"
    mode: str = "max"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int | None = None
    reference: float | None = None  # the last value that beat its predecessor by min_delta
    bad_epochs: int = 0

    def better(self, value: float, than: float | None, margin: float = 0.0) -> bool:
        if not math.isfinite(value):  # a nan or inf validation figure is never an improvement
            return False
        if than is None:
            return True
        return value > than + margin if self.mode == "max" else value < than - margin

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; return whether it is the best so far."""
        improved = self.better(value, self.best)
        if improved:
            self.best, self.best_epoch = value, epoch
        if self.better(value, self.reference, self.min_delta):
            self.reference, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def reason(self) -> str:
        best = (f"best {self.best:.4f} at epoch {self.best_epoch}" if self.best is not None
                else "no finite value yet")  # fmt: skip
        return (
            f"early stopping: {self.metric} has not improved by more than {self.min_delta} for "
            f"{self.bad_epochs} epochs ({best})"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best", "best_epoch", "reference", "bad_epochs"):
            setattr(self, key, state[key])
