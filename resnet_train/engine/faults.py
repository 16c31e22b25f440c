"""Fault injection for tests: stop the run at a named point as a crash or a signal would.

`RESNET_TRAIN_FAULT=POINT:N:SIGNAL` sends SIGNAL (KILL, TERM, INT, USR1) to this process the N-th
time the run passes POINT, for instance `saved best.pt:2:KILL` (killed right after the second
best.pt is in place) or `step:7:TERM` (a stop request after optimizer step 7). The points are
the calls to `point()` below: between any two file writes of an epoch's end, and after every
optimizer step. Several, separated by commas, are sent in order (`step:2:INT,step:2:INT`: two
Ctrl-C at the same step). Unset, each call is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RESNET_TRAIN_FAULT"
_passed: Counter[str] = Counter()


def point(name: str) -> None:
    specs = os.environ.get(ENV)
    if not specs:
        return
    faults = [spec.rsplit(":", 2) for spec in specs.split(",")]
    if not any(target == name for target, _, _ in faults):
        return
    _passed[name] += 1
    for target, count, signame in faults:  # several, in order (a second Ctrl-C)
        if target == name and _passed[name] == int(count):
            os.kill(os.getpid(), getattr(signal, f"SIG{signame}"))


def reset() -> None:
    """Forget the points passed (a test that runs several fits in one process)."""
    _passed.clear()
