"""One process at a time in a run folder. Two runs started with one name, a sweep started
twice, or a requeued job resumed while the old one still ran trained into one folder: their
checkpoints, logs and TensorBoard files mixed, and one could delete the other's checkpoint
being written. A training process holds an advisory lock (flock) on the folder's
`.resnet-train.lock` while it runs; the operating system drops it when the process ends, however
it ends (a SIGKILL too), so a stale lock never blocks a resume."""

from __future__ import annotations

import os
from pathlib import Path

from resnet_train.errors import RunDirError

LOCK_NAME = ".resnet-train.lock"
_HELD: dict[str, int] = {}  # folder -> the lock file's descriptor


def check_free(folder: Path) -> None:
    """RunDirError if another process holds `folder`'s lock; takes nothing, makes nothing."""
    try:
        import fcntl
    except ImportError:
        return
    key = str(Path(folder).resolve())
    if key in _HELD:
        return
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # (none: no run has started there)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise RunDirError(_in_use(folder, fd)) from None
    finally:
        os.close(fd)


def _in_use(folder: Path, fd: int) -> str:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    return (
        f"{folder} is in use by another resnet-train process (PID {holder}): two processes in "
        "one run folder would mix their checkpoints; wait for it to end (then resume=auto "
        "continues the run), or give another name="
    )


def hold(folder: Path) -> bool:
    """Lock `folder` for this process (made if missing); RunDirError, naming the process that
    holds it, if another does. Returns whether this call took it (False: already held here)."""
    try:
        import fcntl
    except ImportError:  # (not POSIX: no advisory locks to take)
        return False
    key = str(Path(folder).resolve())
    if key in _HELD:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        message = _in_use(folder, fd)
        os.close(fd)
        raise RunDirError(message) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return True


def release(folder: Path) -> None:
    """Give the lock back (a sweep's job, done: the next job's folder is another)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)  # (closing the descriptor drops the flock)


def release_all() -> None:
    """Give back every lock this process holds (a command run again in one process: tests)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key))
