"""Which checkpoint a run continues from, whether its config may continue it, and the random
state that makes the continuation exact."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from resnet_train.config import MAY_CHANGE, flatten, to_dict
from resnet_train.engine.checkpoint import CHECKPOINT_NAMES, load_checkpoint
from resnet_train.errors import CheckpointError, RunDirError
from resnet_train.logging import log

_warned: set[str] = set()


@dataclass
class ResumePoint:
    path: Path
    state: dict[str, Any]


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key whose value differs."""
    old, new = flatten(saved), flatten(current)
    missing = object()
    return [
        (key, old.get(key, missing), new.get(key, missing))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    ]


def check_config(point: ResumePoint, cfg: DictConfig) -> None:
    """Refuse a checkpoint made with another model, data, optimizer or recipe, naming every
    changed key; say which allowed keys changed."""
    changes = config_changes(point.state["config"], to_dict(cfg))
    refused = [c for c in changes if c[0] not in MAY_CHANGE]

    def show(items: list[tuple[str, Any, Any]]) -> str:
        return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in items)

    if refused:
        raise CheckpointError(
            f"{point.path} was made with another config: {show(refused)}. Only these keys may "
            f"change on resume: {', '.join(MAY_CHANGE)}"
        )
    allowed = [c for c in changes if c[0] not in ("resume", "name", "task")]
    if allowed:
        log.info("resuming with changed settings: %s", show(allowed))


# The keys that set how long a run trains. A resume whose command line leaves them out keeps
# the run's own values (a 160-epoch run resumed without trainer.epochs ends at 160, not at the
# config's default); given, they extend or shorten the run.
RUN_LENGTH_KEYS = ("trainer.epochs", "trainer.early_stopping.patience")


def override_keys(overrides: list[str]) -> set[str]:
    """The keys a command line's overrides set (key=value, +key=value, ~key, group=option)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def _given(key: str, given: set[str]) -> bool:
    """Whether the command line set `key`, itself or through a parent (trainer.early_stopping=
    {patience:5}, trainer=default)."""
    return any(key == g or key.startswith(g + ".") for g in given)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def peek_config(path: Path) -> dict[str, Any] | None:
    """A checkpoint's position and config, read without loading its tensors (memory-mapped);
    None where it is not a readable checkpoint (the run's own checks say why)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return None
    if "epoch" not in state:
        return None
    return state


def resumed_config(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The config of the checkpoint that cfg's resume continues (resume=auto: the newest readable
    one in run_dir; resume=PATH: that file), or None: a new run, or nothing readable."""
    resume = cfg.get("resume")
    if resume is None:
        return None
    if resume == "auto":
        states = [peek_config(run_dir / n) for n in CHECKPOINT_NAMES if (run_dir / n).is_file()]
        readable = [s for s in states if s is not None]
        return max(readable, key=_position)["config"] if readable else None
    path = Path(str(resume)).expanduser()
    state = peek_config(path) if path.is_file() else None
    return state["config"] if state else None


def keep_run_length(
    cfg: DictConfig, saved: dict[str, Any] | None, given: set[str] | None
) -> list[str]:
    """Set the RUN_LENGTH_KEYS that the command line did not give (`given`: its keys) to the
    resumed checkpoint's values (`saved`: its config); return those that changed, as key=value.
    given=None (a config built in code): nothing is changed."""
    flat = flatten(saved or {})
    kept = []
    for key in RUN_LENGTH_KEYS if given is not None else ():
        if _given(key, given) or key not in flat or OmegaConf.select(cfg, key) == flat[key]:
            continue
        OmegaConf.update(cfg, key, flat[key], merge=False)
        kept.append(f"{key}={_shown(flat[key])}")
    return kept


def own_run_length(saved: dict[str, Any], given: set[str] | None) -> list[str]:
    """The RUN_LENGTH_KEYS a resume took from its checkpoint, as key=value."""
    flat = flatten(saved or {})
    return [f"{key}={_shown(flat[key])}" for key in RUN_LENGTH_KEYS
            if given is not None and key in flat and not _given(key, given)]  # fmt: skip


def _valid_checkpoints(run_dir: Path) -> tuple[list[ResumePoint], list[str]]:
    points, problems = [], []
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        if not path.exists():
            continue
        try:
            points.append(ResumePoint(path, load_checkpoint(path)))
        except CheckpointError as e:
            problems.append(str(e))
    return points, problems


def _position(state: dict[str, Any]) -> tuple[int, int]:
    return state.get("global_step", 0), state["epoch"]


def find_resume(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """The checkpoint this run continues from, or None for a new run.

    resume=null: a new run; a directory that already holds checkpoints is refused.
    resume=auto: the newest readable checkpoint of run_dir (bad ones are reported); none at all
    starts a new run; checkpoints that are all unreadable are an error, never a silent restart.
    resume=PATH: that file.
    """
    existing = [name for name in CHECKPOINT_NAMES if (run_dir / name).exists()]
    results = [name for name in RESULT_NAMES if (run_dir / name).exists()]
    if cfg.resume is None:
        if existing and "metrics.json" in results:
            raise RunDirError(
                f"run directory {run_dir} already holds {', '.join(existing + results)} of a "
                "finished run: start another run with name=NEW_NAME (or train it on: "
                "resume=auto with a larger trainer.epochs)"
            )
        if existing:
            raise RunDirError(
                f"run directory {run_dir} already holds {', '.join(existing + results)}: "
                "continue it with "
                "resume=auto, or start another run with name=NEW_NAME"
            )
        if "metrics.json" in results:
            raise RunDirError(
                f"run directory {run_dir} already holds {', '.join(results)} of a finished "
                "run: start another run with name=NEW_NAME"
            )
        if results:  # best.pt alone: a run killed before its first last.pt
            raise RunDirError(
                f"run directory {run_dir} already holds {', '.join(results)}: continue it with "
                "resume=auto, or start another run with name=NEW_NAME"
            )
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume).expanduser()
        if path.is_dir():
            inside = next((path / n for n in CHECKPOINT_NAMES if (path / n).is_file()), None)
            what = f"give resume={inside}" if inside else "it holds no last.pt or previous.pt"
            raise CheckpointError(
                f"resume={cfg.resume} is a folder, not a checkpoint file: {what} (resume=auto "
                "continues the run of this command's own folder)"
            )
        if (existing or results) and path.resolve().parent != run_dir.resolve():
            raise RunDirError(
                f"run directory {run_dir} already holds {', '.join(existing + results)} of "
                "another run: "
                f"resume={cfg.resume} continues that checkpoint in a directory of its own "
                "(name=NEW_NAME); resume=auto continues the run that is there"
            )
        state = load_checkpoint(path)
        if state.get("weights", "raw") != "raw":
            raise CheckpointError(
                f"resume={cfg.resume} holds the run's {state['weights']} weights (a best.pt "
                "chosen with trainer.ema.select), not the raw weights training continues from: "
                f"resume from {path.parent / 'last.pt'}"
            )
        return ResumePoint(path, state)
    points, problems = _valid_checkpoints(run_dir)
    for problem in problems:
        if problem not in _warned:  # once per process: the check before the run finds it too
            _warned.add(problem)
            log.warning("resume=auto: skipping %s", problem)
    if not points:
        if problems:
            raise CheckpointError(
                f"resume=auto: no readable checkpoint in {run_dir} ({'; '.join(problems)}); "
                "the run was not restarted from scratch"
            )
        if "metrics.json" in results:  # (best.pt alone: killed before its first last.pt)
            raise RunDirError(
                f"resume=auto: {run_dir} holds {', '.join(results)} of a finished run but no "
                f"{' or '.join(CHECKPOINT_NAMES)} to continue from; the run was not restarted "
                "from scratch over them: start another run with name=NEW_NAME"
            )
        log.info("resume=auto: no checkpoint in %s yet; starting a new run", run_dir)
        return None
    return max(points, key=lambda p: _position(p.state))


def check_world_size(point: ResumePoint, world: int) -> None:
    """A checkpoint continues with the number of processes that saved it (each one's random
    state and place in the data are in it)."""
    saved = point.state.get("world_size", 1)
    if saved != world:
        raise CheckpointError(
            f"{point.path} was saved by {saved} process(es), this run has {world}: resume it "
            f"with {saved} (resnet-train's or torchrun's --nproc-per-node x nodes = {saved})"
        )


def set_aside_unread(run_dir: Path, point: ResumePoint) -> Path | None:
    """A run resumed from previous.pt (its last.pt unreadable): last.pt is renamed out of the way
    (last.pt.unreadable), so that the next save does not rotate it over the readable previous.pt,
    the only checkpoint to fall back on; returns where it went."""
    last = run_dir / CHECKPOINT_NAMES[0]
    if point.path.name == last.name or point.path.resolve().parent != run_dir.resolve():
        return None
    if not last.exists():
        return None
    try:
        load_checkpoint(last)
        return None  # readable (resume=PATH chose the older one): it rotates as usual
    except CheckpointError:
        pass
    aside = last.with_name(f"{last.name}.unreadable")
    n = 1
    while aside.exists():
        aside, n = last.with_name(f"{last.name}.unreadable.{n}"), n + 1
    os.replace(last, aside)
    log.warning("resume=auto: renamed the unreadable %s to %s (for a look; delete it at will), "
                "so that this run's saves do not rotate it over %s", last.name, aside.name,
                point.path.name)  # fmt: skip
    return aside


def _monitor(point: ResumePoint, cfg: DictConfig) -> Any:
    from resnet_train.engine.early_stopping import Monitor

    state = point.state
    monitor = Monitor(**{k: state["monitor"][k] for k in ("metric", "mode")})
    monitor.load_state_dict(state["monitor"])
    monitor.patience = cfg.trainer.early_stopping.patience
    monitor.min_delta = state["monitor"].get("min_delta", 0.0)
    return monitor


def finished(point: ResumePoint, cfg: DictConfig) -> bool:
    """Whether the checkpoint's run has trained all it will: trainer.epochs reached, or early
    stopping's patience run out."""
    return point.state["epoch"] >= cfg.trainer.epochs or _monitor(point, cfg).should_stop


def finished_note(point: ResumePoint, cfg: DictConfig) -> str:
    """Why a finished run is: "(epoch 30 of trainer.epochs=30)", or its early stop and how to
    train on."""
    epoch = point.state["epoch"]
    if epoch >= cfg.trainer.epochs:
        return f"(epoch {epoch} of trainer.epochs={cfg.trainer.epochs})"
    return (
        f"(stopped early at epoch {epoch}: {_monitor(point, cfg).reason()}; a larger "
        "trainer.early_stopping.patience, or null, trains on)"
    )


def finished_metrics(run_dir: Path, point: ResumePoint) -> dict[str, Any] | None:
    """run_dir's metrics.json where it records the run that `point` ends (the final test done);
    None where there is none, or it is of an earlier end (a run extended with a larger
    trainer.epochs and stopped before its final test)."""
    import json

    path = run_dir / "metrics.json"
    if point.path.parent.resolve() != run_dir.resolve() or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except ValueError:
        return None
    same_end = (metrics.get("global_step"), metrics.get("epochs_done")) == (
        point.state.get("global_step"),
        point.state.get("epoch"),
    )
    return metrics if same_end else None


def check_end_not_passed(cfg: DictConfig, point: ResumePoint) -> None:
    """A finished run about to be tested: a trainer.epochs that ends before a checkpoint saved
    inside an epoch is refused, its weights being past that end (tested, they were reported
    as the last epoch's)."""
    epoch, batch = point.state["epoch"], point.state.get("batch_in_epoch", 0)
    if batch and epoch >= cfg.trainer.epochs:
        raise CheckpointError(
            f"trainer.epochs={cfg.trainer.epochs} ends before {point.path}, saved {batch} "
            f"batches into epoch {epoch + 1}: its weights are past epoch "
            f"{cfg.trainer.epochs}'s end; give trainer.epochs={epoch + 1} or more to finish "
            "that epoch"
        )


def check_not_finished(cfg: DictConfig, point: ResumePoint) -> None:
    """resume=PATH from a run that has trained all it will: refused (resume=auto on its own
    finished run is a command that does nothing, not an error)."""
    if cfg.resume != "auto" and finished(point, cfg):
        epoch = point.state["epoch"]
        if epoch < cfg.trainer.epochs:
            raise CheckpointError(
                f"resume={cfg.resume} stopped early at epoch {epoch}: "
                f"{_monitor(point, cfg).reason()}; a larger trainer.early_stopping.patience, "
                "or null, trains on"
            )
        raise CheckpointError(
            f"resume={cfg.resume} already finished epoch {epoch} of "
            f"trainer.epochs={cfg.trainer.epochs}; raise trainer.epochs to train further"
        )


def record_run_length(cfg: DictConfig, run_dir: Path, point: ResumePoint) -> list[str]:
    """A run found finished by a new length (trainer.epochs lowered to where it is, or an early
    stopping patience that has run out) trains no step, so saves no checkpoint: last.pt is
    written again with the new config, so that a later resume=auto without those keys (a
    requeue, the same command) keeps them, rather than the old length that trained on. Returns
    the keys recorded, as key=value."""
    saved = flatten(point.state["config"])
    changed = [f"{key}={_shown(OmegaConf.select(cfg, key))}" for key in RUN_LENGTH_KEYS
               if key in saved and saved[key] != OmegaConf.select(cfg, key)]  # fmt: skip
    if not changed or point.path.parent.resolve() != run_dir.resolve():
        return []
    from resnet_train.engine.checkpoint import save_checkpoint

    # Each file in place (no rotation: previous.pt stays the earlier state a damaged last.pt
    # falls back to), and previous.pt too, so that a fall back keeps the new length.
    for name in CHECKPOINT_NAMES:
        path = run_dir / name
        if path == point.path or (path.exists() and path.resolve() == point.path.resolve()):
            state = point.state
        else:
            try:
                state = load_checkpoint(path) if path.is_file() else None
            except CheckpointError:
                state = None  # (unreadable: left as it is)
        if state is not None:
            lengths = {key: OmegaConf.select(cfg, key) for key in RUN_LENGTH_KEYS}
            save_checkpoint({**state, "config": _with(state["config"], lengths)}, path)
    return changed


def _with(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's config with dotted keys set to values."""
    import copy

    out = copy.deepcopy(config)
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# What a run leaves besides its checkpoints: a directory that holds them holds a run.
RESULT_NAMES = ("best.pt", "metrics.json")


# --- random state --------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, in types torch.load(weights_only=True)
    reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
