"""Checkpoint files: written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from resnet_train.engine import faults
from resnet_train.errors import CheckpointError, UserError, cause_in_chain
from resnet_train.models.weights import is_exported_program

FORMAT_VERSION = 2
# The training states of a run directory, newest first: the latest, and the one it replaced.
# (best.pt holds the selected weights for evaluation; runs continue from these two.)
CHECKPOINT_NAMES = ("last.pt", "previous.pt")
REQUIRED_KEYS = ("format_version", "model", "optimizer", "scheduler", "epoch", "config")


TMP_SUFFIX = ".tmp"


def _replace_atomically(
    path: Path, write, keep_previous: Path | None = None, also_as: Path | None = None
) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a failed save leaves the previous file intact and no temporary file behind (a killed one
    leaves a temporary file that remove_temporaries() clears at the next start). With
    keep_previous, the file being replaced is first renamed to it, so that one readable
    checkpoint exists at every moment. With also_as, the written file is first put in place
    under that name too (a copy, itself atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if also_as is not None:
            copy_checkpoint(tmp, also_as)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
            faults.point(f"kept {keep_previous.name}")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if (failed := _os_error_in(e)) is not None:  # a full disk, a size limit, a read-only
            # folder: one line (it was two chained tracebacks); the file in place is whole
            kept = f"the {path.name} in place is whole" if path.exists() else "nothing was saved"
            raise SaveError(
                f"could not save {path}: {failed.strerror or failed} ({type(failed).__name__}); "
                f"{kept}, and resume=auto continues from the newest checkpoint once there is "
                "room"
            ) from e
        raise
    _sync_directory(path.parent)
    faults.point(f"saved {path.name}")


class SaveError(UserError):
    """A checkpoint that could not be written (the disk, not the input: still one line)."""


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error (torch.save's writer raises a RuntimeError from it)."""
    found = cause_in_chain(error, lambda cause: isinstance(cause, OSError)
                           and not isinstance(cause, FileNotFoundError))  # fmt: skip
    return found if isinstance(found, OSError) else None


def _sync_directory(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of saves that were killed midway (their process is gone: a
    live one's is being written)."""
    from resnet_train.deploy.staging import LEFTOVER, _alive

    stale = [p for p in folder.glob(f".*.pt.*{TMP_SUFFIX}") if p.is_file()
             and not ((m := LEFTOVER.match(p.name)) and _alive(int(m.group(1))))]  # fmt: skip
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    state: dict[str, Any],
    path: str | Path,
    keep_previous: str | Path | None = None,
    also_as: str | Path | None = None,
) -> None:
    """Save `state` to `path` atomically (see _replace_atomically for keep_previous and
    also_as: the trainer puts a new best.pt in place before the last.pt that names it)."""
    previous = Path(keep_previous) if keep_previous is not None else None
    also = Path(also_as) if also_as is not None else None
    _replace_atomically(Path(path), lambda f: torch.save(state, f), previous, also)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    with open(src, "rb") as source:
        _replace_atomically(Path(dst), lambda f: shutil.copyfileobj(source, f))


def _reason(error: Exception) -> str:
    """The informative line of a torch.load error (they can run to a page)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
    sentence = detail.split(". ")[0].rstrip(".")  # whole sentences only, never cut midway
    if len(sentence) > 200:
        sentence = sentence[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {sentence}"


def unreadable(path: Path, error: Exception) -> str:
    """Why torch.load could not read a file, in words: what the file looks like, and the error's
    informative line."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if head.startswith(b"PK"):  # torch's zip format
        if is_exported_program(path):
            return ("a torch.export program (what task=export writes), not a checkpoint: give "
                    "the run's best.pt or last.pt")  # fmt: skip
        return (f"a damaged or truncated PyTorch file ({size} bytes; a save that was cut "
                f"short?) ({_reason(error)})")  # fmt: skip
    if head.startswith(b"\x80"):  # a pickle
        return ("a pickle of Python objects, not a checkpoint of tensors (torch.load with "
                "weights_only=True reads only those)")  # fmt: skip
    return f"not a PyTorch file (it starts with {head!r})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch's legacy-format notes: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, foreign formats: all unreadable
        raise CheckpointError(f"checkpoint {path} is unreadable: {unreadable(path, e)}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"checkpoint {path} is not a resnet-train checkpoint")
    return state
