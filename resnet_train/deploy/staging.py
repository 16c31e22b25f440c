"""A task's files put in place together, at its end.

task=eval, export, prune and predict write each file under a temporary name in their run
directory (".NAME.PID.tmpSUFFIX", a folder ".NAME.PID.tmp") and rename them all when the task
has finished, its record (eval.json, export.json, ...) last: an interrupted or failed task leaves
none of its files, and a task's record says that the rest is there. Whatever a killed task
left under such names (SIGKILL runs no clean-up) is removed when the next task starts there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

LEFTOVER = re.compile(r"^\..+\.(\d+)\.tmp[^/]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own are from an earlier task of it, and done
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_leftovers(run_dir: Path) -> list[str]:
    """Remove the temporary files and folders that an earlier, killed task left in run_dir
    (those whose process is gone); return their names."""
    if not run_dir.is_dir():
        return []
    removed = []
    for entry in run_dir.iterdir():
        match = LEFTOVER.match(entry.name)
        if not match or _alive(int(match.group(1))):  # a live process's: still being written
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return sorted(removed)


# Set when a stop signal came while a task's files were being put in place: they all are, and
# the signal ends the command only after that.
FINISHED_WHEN_STOPPED: list[bool] = []


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the block runs: each that comes is noted and
    sent again, to the handler it would have met, when the block ends. (Python-level: blocking
    them in the kernel holds them for one thread only, and torch's threads would take them.)
    Outside the main thread, where handlers cannot be set, the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    wanted = [getattr(signal, n) for n in names if hasattr(signal, n)]
    wanted = [s for s in wanted if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    came: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if came:
            FINISHED_WHEN_STOPPED.append(True)  # (for the interrupted command's message)
        for signum in dict.fromkeys(came):  # each once, in the order they came
            signal.raise_signal(signum)


class Staging:
    """Temporary names in run_dir for the files (and folders) a task writes; `commit` puts them
    in place in the order they were staged; leaving the `with` block without a commit (an
    error, Ctrl-C, SIGTERM) removes them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.staged: dict[Path, Path] = {}  # final path -> temporary path

    def __enter__(self) -> Staging:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self

    def file(self, name: str) -> Path:
        """The temporary path to write `name` to (its suffix kept: writers go by it)."""
        stem, suffix = os.path.splitext(name)
        return self._stage(name, f".{stem}.{os.getpid()}.tmp{suffix}")

    def folder(self, name: str) -> Path:
        """A temporary folder for the folder `name` (created); on commit its files join those
        already in `name`."""
        path = self._stage(name, f".{name}.{os.getpid()}.tmp")
        path.mkdir()
        return path

    def _stage(self, name: str, temporary: str) -> Path:
        final = self.run_dir / name
        if final in self.staged:
            raise ValueError(f"{name} is staged twice")
        self.staged[final] = self.run_dir / temporary
        return self.staged[final]

    def commit(self) -> list[Path]:
        """Put every staged file in place, in staging order; return the final paths. Ctrl-C,
        SIGTERM and SIGHUP wait until all are in place (a stop between two renames would leave
        some files without their record)."""
        with _stop_signals_held():
            return self._commit()

    def _commit(self) -> list[Path]:
        for final, temporary in self.staged.items():
            if temporary.is_dir():
                final.mkdir(exist_ok=True)
                for item in sorted(temporary.rglob("*")):
                    if item.is_file():
                        target = final / item.relative_to(temporary)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(item, target)
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                os.replace(temporary, final)
        done = list(self.staged)
        self.staged = {}
        return done

    def discard(self) -> None:
        for temporary in self.staged.values():
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)
        self.staged = {}

    def __exit__(self, *exc: object) -> None:
        self.discard()  # nothing is left after a commit
