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

try:
    import fcntl
except ImportError:  # (not POSIX: no advisory locks to take)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".resnet-train.lock"
_HELD: dict[str, int] = {}  # folder -> the lock file's descriptor


def check_free(folder: Path) -> None:
    """RunDirError if another process holds `folder`'s lock; takes nothing, makes nothing."""
    if _key(folder) in _HELD:
        return
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # (none: no run has started there)
        return
    try:
        _lock(folder, fd)
    finally:
        os.close(fd)


def hold(folder: Path) -> bool:
    """Lock `folder` for this process (made if missing); RunDirError, naming the process that
    holds it, if another does. Returns whether this call took it (False: already held here, or
    no advisory locks to take: not POSIX)."""
    key = _key(folder)
    if key in _HELD or fcntl is None:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(folder, fd)
    except RunDirError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return True


def _key(folder: Path) -> str:
    return str(Path(folder).resolve())


def _lock(folder: Path, fd: int) -> None:
    """flock the open lock file `fd`, or RunDirError naming the process that holds it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise RunDirError(
            f"{folder} is in use by another resnet-train process (PID {holder}): two processes "
            "in one run folder would mix their checkpoints; wait for it to end (then "
            "resume=auto continues the run), or give another name="
        ) from None


def release(folder: Path) -> None:
    """Give the lock back (a sweep's job, done: the next job's folder is another)."""
    fd = _HELD.pop(_key(folder), None)
    if fd is not None:
        os.close(fd)  # (closing the descriptor drops the flock)


def release_all() -> None:
    """Give back every lock this process holds (a command run again in one process: tests)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key))
