"""Fault injection for tests: stop the run at a named point as a crash or a signal would.

`RESNET_TRAIN_FAULT=POINT:N:SIGNAL` sends SIGNAL (KILL, TERM, INT, USR1) to this process the N-th
time the run passes POINT, for instance `saved best.pt:2:KILL` (killed right after the second
best.pt is in place) or `step:7:TERM` (a stop request after optimizer step 7). The points are
the calls to `point()` below: between any two file writes of an epoch's end, and after every
optimizer step. Unset, each call is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RESNET_TRAIN_FAULT"
_passed: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, count, signame = spec.rsplit(":", 2)
    if target != name:
        return
    _passed[name] += 1
    if _passed[name] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{signame}"))


def reset() -> None:
    """Forget the points passed (a test that runs several fits in one process)."""
    _passed.clear()
