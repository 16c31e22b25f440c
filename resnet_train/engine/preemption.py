"""Stopping on request: SIGTERM, SIGUSR1 or SIGUSR2 finishes the current optimizer step, saves a
checkpoint and exits with PREEMPTED_EXIT_CODE (under SLURM the job can requeue itself); a first
Ctrl-C (SIGINT) does the same and exits with INTERRUPTED_EXIT_CODE, a second ends at once."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("resnet_train")  # (not resnet_train.logging: it loads torch)

# EX_TEMPFAIL of sysexits.h: "temporary failure, try again": distinct from success (0), a crash
# (1) and bad input (2).
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, what a shell reports for a program ended by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130
# SIGUSR1: sbatch --signal=USR1@N; SIGUSR2: what submitit (Hydra's SLURM launcher) asks for.
NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2")
SIGNALS = tuple(getattr(signal, name) for name in NAMES if hasattr(signal, name))


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved at `step` (checkpoint=None: the signal came
    while the run was starting, and it stopped before its first step, saving nothing new)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else name
        if checkpoint is None:
            super().__init__(
                f"stopped by {name}, which came while the run was starting (at step {step}); "
                "nothing new was saved: the same command with resume=auto starts it again"
            )
            return
        super().__init__(
            f"stopped by {name} after step {step}; the run continues from {checkpoint} with "
            "the same command and resume=auto"
        )


# A stop signal that came before the run's own handling began (StopSignals), while it started:
# the data's check and reading, the model's building. Held here by HeldSignals.
_PENDING: list[int] = []


class HeldSignals:
    """From install() to release(), a SIGTERM / SIGUSR1 / SIGUSR2 is remembered instead of ending
    the process at once (their default): a training run that starts meanwhile takes it
    (StopSignals) and stops before its first step, with the exit status and the SLURM requeue of
    a preemption. Only signals at their default action are held (one that a launcher handles,
    or that nohup ignores, is left as it is). release(redeliver=True) hands a signal still held
    back to its default action: the process ends of it, as it would have."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def install(self) -> HeldSignals:
        if threading.current_thread() is threading.main_thread():
            wanted = [s for s in SIGNALS if signal.getsignal(s) == signal.SIG_DFL]
            self._previous = {s: signal.signal(s, self._hold) for s in wanted}
        return self

    @staticmethod
    def _hold(signum: int, frame: FrameType | None) -> None:
        if not _PENDING:
            _PENDING.append(signum)

    def release(self, redeliver: bool = False) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        pending = _PENDING.pop() if _PENDING else None
        if redeliver and pending is not None:
            signal.raise_signal(pending)


@contextlib.contextmanager
def signals_end_the_process() -> Iterator[None]:
    """While joining a process group: a stop signal (or Ctrl-C) ends the process at once, by
    its default action, instead of being held for a run that may never start (a rendezvous
    waits up to 30 minutes for its peers inside torch, where no Python handler runs). Nothing
    of the run is written yet."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [s for s in SIGNALS if signal.getsignal(s) == HeldSignals._hold]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        held.append(signal.SIGINT)
    previous = {s: signal.signal(s, signal.SIG_DFL) for s in held}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopSignals:
    """While active, remember the first SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT instead of dying of
    it: the run saves at its next step and stops. The previous handlers come back on exit, so a
    program that calls the trainer keeps its own; one that handles SIGTERM itself is sent the
    SIGTERM again once the run has saved.

    A second Ctrl-C raises KeyboardInterrupt at once, and is remembered too: Python raises it in
    whatever frame the main thread is running, and when that is a finalizer (`__del__` of an
    object being collected) the exception is printed and dropped. The trainer raises it again at
    its next step (`interrupted`), so a second Ctrl-C always ends the run."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum  # the first Ctrl-C: finish the step, save, stop
            log.info("Ctrl-C: saving at the end of this step (Ctrl-C again to stop at once)")
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if _PENDING:  # it came while the run was starting (HeldSignals)
            self.received = _PENDING.pop()
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        previous_term = self._previous.get(signal.SIGTERM)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self.received == signal.SIGTERM and callable(previous_term):
            # The program that called the trainer has a SIGTERM handler of its own (a test
            # runner, an application): the run has saved, now it gets the signal it was sent.
            signal.raise_signal(signal.SIGTERM)


def requeue_slurm_job() -> None:
    """Put this SLURM job back in the queue (rank 0 only), so that it starts again by itself and
    continues with resume=auto."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or int(os.environ.get("RANK", "0")) != 0:
        return
    if shutil.which("scontrol") is None:
        log.warning("SLURM job %s: scontrol not found; the job was not requeued", job)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("SLURM job %s requeued", job)
    else:
        log.warning("SLURM job %s: scontrol requeue failed: %s", job, result.stderr.strip())
