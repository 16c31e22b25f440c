"""The `resnet-train` command: compose the config with Hydra, validate it, train.

A single run is composed and checked here first, before Hydra starts, so that any bad input (an
unknown key or group option, a wrong type, a value out of range) ends the command with one line
that names the key, the value and what is allowed, and nothing is written. `task=summary` ends
here too. Multiruns go straight to Hydra, which checks each job's config as it starts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from resnet_train.config import (
    WEIGHTS_TASKS,
    check_name,
    complete,
    register_configs,
    schema,
    validate,
)
from resnet_train.errors import ConfigError, UserError, cause_in_chain
from resnet_train.launch import CHECKED_ENV, is_launch_flag, split_launch_args, with_a_sweep

CONFIG_MODULE = "resnet_train.configs"
register_configs()


# Under torchrun, how long a process other than rank 0 waits before it ends with an error: every
# process meets the same error and rank 0 says it; torchrun ends the others when one exits, and a
# rank 1 that exited at once could end rank 0 before its line was printed.
OTHER_RANKS_WAIT_S = 5.0


def _fail(message: object) -> None:
    """Print the error in one line and exit with status 2. Under torchrun, rank 0 alone prints
    it, and the others end OTHER_RANKS_WAIT_S later (unless torchrun has ended them)."""
    if int(os.environ.get("RANK", "0")) > 0:
        import time

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (torchrun's, once rank 0 has ended)
        time.sleep(OTHER_RANKS_WAIT_S)
        sys.exit(2)
    print(f"resnet-train: error: {one_line(str(message))}", file=sys.stderr)
    sys.exit(2)


def one_line(message: str) -> str:
    """An error raised in a DataLoader worker reaches the main process as "Caught DataError in
    DataLoader worker process 0. Original Traceback ...": its own message is the last line, after
    the exception's name."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def print_summary(cfg: DictConfig) -> None:
    from resnet_train.models.build import build_model
    from resnet_train.models.freeze import freeze
    from resnet_train.models.summary import format_summary, summarize

    model = build_model(cfg)
    freeze(model, cfg.model.freeze, cfg.model.freeze_bn)  # (trainable: what would train)
    print(format_summary(cfg.model.name, summarize(model, cfg.data.image_size)))


def describe_composition_error(error: Exception) -> str:
    """One line for Hydra's multi-line composition errors: the key, the value, what is allowed."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, MissingConfigException) and cause.options:
            group, _, option = (cause.missing_cfg_file or "").rpartition("/")
            choice = f"{group}={option}"  # (hydra/launcher/slrum: hydra/launcher=slrum)
            return f"{choice} is invalid: allowed: {', '.join(cause.options)}"
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
            parent, _, key = str(cause.full_key).rpartition(".")
            node = OmegaConf.select(schema(), parent) if parent else schema()
            if parent == "hydra" or parent.startswith("hydra."):  # (Hydra's own: not ours)
                from hydra.conf import HydraConf

                hydra = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
                node = OmegaConf.select(hydra, parent, throw_on_missing=False)
            allowed = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none"
            if parent in ("hydra.sweeper", "hydra.launcher"):  # (the plugin's own keys)
                plugin = parent.split(".")[1]
                allowed = (f"the keys of the {plugin} chosen (hydra/{plugin}=...; "
                           "hydra/sweeper=optuna_cpu for a search's n_trials)")  # fmt: skip
            where = parent or "the top level"
            return f"{cause.full_key} is not a config key: allowed in {where}: {allowed}"
        if isinstance(cause, ValidationError) and cause.full_key:
            value = getattr(cause, "value", None)
            message = str(cause.msg).splitlines()[0]
            if value is None and "is not Optional" in message:
                default = OmegaConf.select(schema(), str(cause.full_key))
                if isinstance(default, DictConfig):
                    needs = f"is a group of keys ({', '.join(default.keys())}): set those"
                else:
                    needs = f"needs a value of type {type(default).__name__}, not null"
                return f"{cause.full_key}=null is invalid: it {needs}"
            shown = f"={value}" if value is not None else ""
            return f"{cause.full_key}{shown} is invalid: {message}"
        if isinstance(cause, InterpolationResolutionError) and cause.full_key:
            why = str(cause).strip().splitlines()[0]
            return f"{cause.full_key} is invalid: its interpolation does not resolve ({why})"
        if isinstance(cause, ConfigTypeError) and "does not support deletion" in str(cause):
            key = getattr(cause, "full_key", None) or "that key"
            return (
                f"~{key} is invalid: a key of the schema cannot be deleted; set it to another "
                "value (key=VALUE) instead"
            )
        cause = cause.__cause__
    lines = str(error).strip().splitlines()
    if lines and lines[0].startswith("Ambiguous value for argument"):
        return (
            f"{lines[0]}: to sweep over the values add -m (--multirun); for a list write "
            "key=[a,b]; for a string with a comma, quote it: key='a,b'"
        )
    if lines and lines[0].startswith("LexerNoViableAltException: "):  # Hydra's lexer
        override = lines[0].split(": ", 1)[1]
        key, _, value = override.partition("=")
        why = ("unquoted values of ASCII characters only" if not override.isascii() else
               "no unquoted value with these characters")  # fmt: skip
        return (f"{override} is invalid: Hydra reads {why}; quote the value (in a shell: "
                f"{shell_quoted(f'{key}={hydra_quoted(value)}')})")  # fmt: skip
    if lines and lines[0].startswith("Error parsing override"):
        return (f"{lines[0]}: quote a value with special characters (in a shell: "
                "\"key='...'\")")  # fmt: skip
    if lines and lines[0].startswith("Config group override must be a string"):
        return f"{lines[0]}: a config group takes one of its options' names (group=OPTION)"
    return lines[0] if lines else type(error).__name__


def hydra_quoted(value: str) -> str:
    """`value` as a quoted string of Hydra's grammar: a quote escaped by a backslash, and the
    backslashes before a quote (the closing one included) doubled."""
    import re

    inner = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    inner = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, inner)
    return f"'{inner}'"


def shell_quoted(text: str) -> str:
    """`text` in a shell's double quotes, as one argument that the shell passes on unchanged."""
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in text) + '"'


def check_bool_overrides(overrides: list[str]) -> None:
    """A yes/no key takes true or false: OmegaConf would read 2, -1, yes, on or 1 as true."""
    from omegaconf.nodes import BooleanNode

    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or override.startswith("~"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema(), parent) if parent else schema()
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        if isinstance(node._get_node(leaf), BooleanNode):
            allowed = ("true", "false", "null") if node._get_node(leaf)._is_optional() else (
                "true", "false")  # fmt: skip
            given = value.strip().strip("'\"").lower()
            if given not in allowed and not given.startswith("${"):  # (an interpolation)
                raise ConfigError(f"{key}={value} is invalid: allowed: {', '.join(allowed)}")


def compose_run(args: list[str]) -> DictConfig:
    """A single run's config, its hydra node included, composed once from the command line's
    overrides (args are all key=value); a composition error ends the command in one line."""
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("train", overrides=args, return_hydra_config=True)
    except Exception as e:  # Hydra's composition errors come in several types
        _fail(describe_composition_error(e))
    try:
        # Named once: the name of a distilled run reads its teacher's file, which may change
        # between the checks and the run; the run goes where it was checked.
        with read_write(cfg.hydra), open_dict(cfg.hydra):
            cfg.hydra.run.dir = str(cfg.hydra.run.dir)
    except Exception as e:  # a resolver's error (an interpolation that does not resolve)
        _fail(describe_composition_error(e))
    HydraConfig.instance().set_config(cfg)
    return cfg


def precheck(args: list[str], composed: DictConfig | None = None) -> None:
    """Compose and validate a single run's config (args are all key=value overrides), make sure
    its data is there and that its run directory may be used (a new run must not land on an old
    one; a resumed one must fit its checkpoint), so that Hydra writes into a run directory only
    for a run that can start."""
    composed = compose_run(args) if composed is None else composed
    run_dir = Path(str(composed.hydra.run.dir))
    try:
        check_name(composed.get("name"))  # (a name too long: before its folder is looked at)
        given = "hydra.run.dir" if any(a.startswith("hydra.run.dir=") for a in args) else "name"
        check_output_folder(run_dir, given)
        check_bool_overrides(args)
        take_run_length(composed, run_dir, args)  # (the run and its record get it too)
        cfg = copy.deepcopy(composed)  # the checks fill in keys; the run gets it as composed
        with open_dict(cfg):
            del cfg["hydra"]
        validate(_as_the_task_runs(cfg, args))
        complete(cfg)
        from resnet_train.engine.distributed import check_env

        check_env()  # (before Hydra writes the run's record)
        if cfg.task != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"task={cfg.task} runs in one process (every process did all of it, writing "
                "the same files): start it without --nproc-per-node or torchrun"
            )
        if cfg.task == "summary":
            if cfg.model.weights is not None:  # a checkpoint's own model and data, as eval's
                from resnet_train.deploy.source import adopt_config, given_keys, own_choices
                from resnet_train.models.weights import read_weights

                saved = read_weights(cfg.model.weights, peek=True).config
                if saved is not None:
                    given = given_keys(args) - own_choices(args, saved)
                    cfg, _ = adopt_config(cfg, saved, given)
            if cfg.data.num_classes is None:  # data=imagefolder: its class folders
                from resnet_train.data.loaders import class_names

                cfg.data.num_classes = len(class_names(cfg.data, cfg.seed))
            from resnet_train.models.build import check_model

            check_model(cfg)
            print_summary(cfg)
            sys.exit(0)
        if cfg.task in WEIGHTS_TASKS:
            _check_deploy(cfg, args, run_dir)
            return
        from resnet_train.data import check_data
        from resnet_train.data.settle import settle_data
        from resnet_train.models.build import check_model, check_weights

        check_model(cfg)  # before anything is read
        check_data(cfg.data)
        settle_data(cfg)
        from resnet_train.engine.resume import resumed_config

        if resumed_config(cfg, run_dir) is None:  # (a resumed run does not read the file)
            check_weights(cfg)
        teacher = None
        if cfg.trainer.distill.teacher is not None:
            from resnet_train.data.loaders import class_names
            from resnet_train.engine.distill import load_teacher

            # (the data's class names, but ImageNet's: its million files are walked later)
            names = None if cfg.data.name == "imagenet" else class_names(cfg.data, cfg.seed)
            teacher = load_teacher(cfg, names)
        _check_run_dir(cfg, run_dir, teacher)
        _check_other_process_count(composed, run_dir)
        _check_steps(cfg)
        if "RANK" in os.environ or "WORLD_SIZE" not in os.environ:  # (not the launcher: its
            from resnet_train.engine import runlock  # rank 0 process takes it, in fit)

            if int(os.environ.get("RANK", "0")) == 0:  # held until this process ends
                runlock.hold(run_dir)  # (before Hydra writes the run's record and log)
    except UserError as e:
        _fail(e)


def take_run_length(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[str]:
    """A training run resumed without trainer.epochs (or patience) on its command line: set
    them in cfg to the resumed checkpoint's values, before the config is checked and recorded
    (engine.resume.keep_run_length); return those changed."""
    if cfg.get("task") != "train" or cfg.get("resume") is None:
        return []
    from resnet_train.engine.resume import keep_run_length, override_keys, resumed_config

    return keep_run_length(cfg, resumed_config(cfg, run_dir), override_keys(overrides))


# What each task that reads a trained model writes into its run directory.
DEPLOY_RECORDS = {
    "eval": "eval.json",
    "export": "export.json",
    "prune": "prune.json",
    "predict": "predict.json",
}


def _as_the_task_runs(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """cfg as it will run, for its checks: a task that reads a trained model takes the
    checkpoint's model and data where the command line did not give them (deploy.source)."""
    if cfg.get("task") not in WEIGHTS_TASKS or not cfg.model.get("weights"):
        return cfg
    from resnet_train.deploy.source import adopted_for_checks

    return adopted_for_checks(cfg, overrides)


def _check_deploy(cfg: DictConfig, args: list[str], run_dir: Path) -> None:
    """task=eval/export: the weights file fits the model, the data and the split are there,
    the optional dependencies are installed, the run directory is free."""
    from resnet_train.data import check_data
    from resnet_train.data.loaders import read_splits, split_indices
    from resnet_train.deploy.source import given_keys, load_trained, require

    if cfg.task == "export" and cfg.export.format == "onnx":
        require("onnx", "export.format=onnx")
        require("onnxruntime", "export.format=onnx")
        if cfg.export.quantize:
            require("onnxruntime.quantization", "export.quantize=int8")
    trained = load_trained(cfg, args)
    if cfg.task == "predict":  # new images: the data set is not needed
        from resnet_train.deploy.predict import list_inputs, usable_inputs

        usable_inputs(list_inputs(cfg.predict.inputs), bool(trained.cfg.data.skip_bad))
        _check_deploy_run_dir(cfg.task, run_dir)
        return
    if cfg.task == "prune":
        from resnet_train.deploy.prune import check_prune, method_for

        if method_for(trained.cfg, trained.model) == "groups":
            require("torch_pruning", "prune.method=groups")
        check_prune(trained)
    d = trained.cfg.data
    if d.name == "imagefolder" and not {"data", "data.root"} & given_keys(args):
        raise ConfigError(
            f"task={cfg.task} reads the images of the run's data=imagefolder: give its folder, "
            "data.root=DIR"
        )
    check_data(d)
    trained.check_data_classes(warn=False)  # (the task's log says it)
    splits = read_splits(trained.cfg.data, trained.cfg.seed)
    split_indices(splits, trained.cfg.eval.split, trained.cfg.data)
    _check_deploy_run_dir(cfg.task, run_dir)


def _deploy_record(run_dir: Path) -> tuple[str, str] | None:
    """(task, record file) of the task that wrote into run_dir, if one did."""
    return next(((t, r) for t, r in DEPLOY_RECORDS.items() if (run_dir / r).exists()), None)


def _check_deploy_run_dir(task: str, run_dir: Path) -> None:
    """A task's directory is its own: not a training run's, not another task's."""
    from resnet_train.engine.checkpoint import CHECKPOINT_NAMES
    from resnet_train.errors import RunDirError

    if any((run_dir / n).exists() for n in (*CHECKPOINT_NAMES, "metrics.json")):
        raise RunDirError(
            f"{run_dir} holds a training run; task={task} writes into a directory of its own: "
            "give another name="
        )
    if (found := _deploy_record(run_dir)) is not None:
        other, record = found
        earlier = "an earlier" if other == task else "a"
        raise RunDirError(
            f"{run_dir} already holds the {record} of {earlier} task={other}; give another "
            "name= or remove that directory"
        )
    from resnet_train.deploy.staging import LEFTOVER
    from resnet_train.engine.runlock import LOCK_NAME

    # What a task (or a killed one) leaves besides its record: Hydra's record, its log, its
    # TensorBoard folder, its temporary files. Anything else is someone's, and would be
    # written over (a predictions.csv of one's own).
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in (".hydra", "tensorboard", LOCK_NAME) and p.suffix != ".log"
                     and not LEFTOVER.match(p.name)) if run_dir.is_dir() else []  # fmt: skip
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunDirError(
            f"{run_dir} holds files that no task wrote there ({shown}); task={task} would write "
            "over them: give another name="
        )


def _check_steps(cfg: DictConfig) -> None:
    """The checks that need the data's size: empty or oversized parts, a warm-up longer than the
    run in steps, a floor above the scaled rate. (The run reuses what is read here.)"""
    from resnet_train.data.loaders import read_splits
    from resnet_train.engine.plan import plan_steps

    splits = read_splits(cfg.data, cfg.seed)
    plan_steps(cfg, len(splits.fit), int(os.environ.get("WORLD_SIZE", "1")))


def _check_other_process_count(composed: DictConfig, run_dir: Path) -> None:
    """An unnamed run's folder is named by its process count too, so resume=auto with another
    count found no checkpoint and started a new run beside the stopped one: refused, naming
    both counts, as for a named run."""
    from resnet_train.config import run_names_by_world
    from resnet_train.engine.checkpoint import CHECKPOINT_NAMES
    from resnet_train.errors import CheckpointError

    if composed.get("name") or composed.resume != "auto" or composed.get("task") != "train":
        return
    if any((run_dir / n).exists() for n in CHECKPOINT_NAMES):
        return
    prefix = run_dir.name.rsplit("-", 1)[0] + "-"
    parent = run_dir.parent
    siblings = {p.name for p in parent.glob(f"{prefix}*")} if parent.is_dir() else set()
    if not siblings:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for other, name in run_names_by_world(composed, range(1, 1025)).items():
        if other != world and name in siblings:
            if any((parent / name / n).exists() for n in CHECKPOINT_NAMES):
                raise CheckpointError(
                    f"resume=auto: {parent / name} holds this run, saved by {other} "
                    f"process(es); this run has {world}: resume it with {other} (resnet-train's "
                    f"or torchrun's --nproc-per-node x nodes = {other}; an unnamed run's folder "
                    "is named by its process count too)"
                )


def _check_run_dir(cfg: DictConfig, run_dir: Path, teacher: Any = None) -> None:
    from resnet_train.engine import runlock
    from resnet_train.engine.checkpoint import CHECKPOINT_NAMES
    from resnet_train.errors import RunDirError

    if int(os.environ.get("RANK", "0")) == 0:  # (torchrun's others: rank 0 holds it)
        runlock.check_free(run_dir)  # (a live run's files are not read: they change)
    if (found := _deploy_record(run_dir)) is not None:
        task, record = found
        raise RunDirError(
            f"{run_dir} holds the {record} of a task={task}, not a training run; give another name="
        )

    from resnet_train.engine.resume import (
        RESULT_NAMES,
        check_config,
        check_end_not_passed,
        check_not_finished,
        check_world_size,
        find_resume,
        finished,
        finished_metrics,
        finished_note,
    )

    holds_a_run = any((run_dir / n).exists() for n in (*CHECKPOINT_NAMES, *RESULT_NAMES))
    if not holds_a_run and (run_dir / "curves.png").exists():
        # (a run writes it at its end, with metrics.json: this one is someone's own)
        raise RunDirError(
            f"{run_dir} holds a curves.png but no run (no checkpoint, no metrics.json): the run "
            "would write over it; give another name= (or hydra.run.dir=)"
        )
    if cfg.resume is None and not holds_a_run:
        return
    point = find_resume(cfg, run_dir)
    if point is None:
        return
    from resnet_train.data.folders import check_same_files
    from resnet_train.data.loaders import data_fingerprint
    from resnet_train.engine.distill import check_same_teacher

    now = data_fingerprint(cfg.data, cfg.seed)
    check_same_files(point.state.get("data_files"), now, point.path)
    check_config(point, cfg)
    check_same_teacher(point.state.get("teacher"), teacher, point.path)
    if finished(point, cfg):
        # Decided here, before Hydra writes the run's .hydra/ record and log: a command that
        # does nothing, or is refused, leaves a finished run as it is.
        check_not_finished(cfg, point)
        if (done := finished_metrics(run_dir, point)) is not None:
            if int(os.environ.get("RANK", "0")) == 0:
                note = finished_note(point, cfg)
                print(f"resume=auto: {run_dir} already finished; nothing to do {note}")
                from resnet_train.curves import draw_if_missing

                if draw_if_missing(run_dir, done):  # (a run stopped before it was drawn)
                    print(f"drew the missing {run_dir / 'curves.png'}")
            sys.exit(0)
        check_end_not_passed(cfg, point)
    # (before Hydra rewrites the run's .hydra/ record and appends to its log)
    check_world_size(point, int(os.environ.get("WORLD_SIZE", "1")))


def run_train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    import signal

    from resnet_train.engine.preemption import (
        INTERRUPTED_EXIT_CODE,
        PREEMPTED_EXIT_CODE,
        Preempted,
    )
    from resnet_train.engine.trainer import fit  # torch and friends load only for a real run

    try:
        from resnet_train.engine.resume import override_keys

        metrics = fit(cfg, run_dir, override_keys(overrides))
    except Preempted as stop:  # fit() has logged where the checkpoint is
        sys.exit(INTERRUPTED_EXIT_CODE if stop.signum == signal.SIGINT else PREEMPTED_EXIT_CODE)
    except RuntimeError as e:
        if (reason := _peer_lost(e)) is None:
            raise
        rank = os.environ.get("RANK", "0")
        print(f"resnet-train: error: process {rank}: another process of the run ended "
              f"({reason}); the run continues from its last checkpoint with the same command "
              "and resume=auto", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    valid = metrics.get("valid")
    return valid["acc"] if valid else None


def _peer_lost(error: RuntimeError) -> str | None:
    """Under DDP, the words of a collective's error that says another process went away (a
    SIGKILL, a crash): a page of gloo or NCCL traceback otherwise; None for any other error."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(error)
    for words in (
        "Connection reset by peer",
        "Connection closed by peer",
        "Broken pipe",
        "Socket Timeout",
        "NCCL communicator was aborted",
        "remote process exited",
    ):
        if words.lower() in text.lower():
            return words
    return None


def run_summary(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    print_summary(cfg)


def run_eval(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    from resnet_train.deploy.evaluate import run_eval as evaluate

    return evaluate(cfg, run_dir, overrides)["top1"]


def run_export(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    from resnet_train.deploy.export import run_export as export

    export(cfg, run_dir, overrides)


def run_prune(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    from resnet_train.deploy.prune import run_prune as prune

    return prune(cfg, run_dir, overrides)["after"]["acc"]


def run_predict(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    from resnet_train.deploy.predict import run_predict as predict

    predict(cfg, run_dir, overrides)


# task=NAME -> what runs it: (config, run directory, the command line's overrides) -> the
# figure Hydra sweepers (Optuna, Ax) optimise, or None.
TASKS = {
    "train": run_train,
    "summary": run_summary,
    "eval": run_eval,
    "export": run_export,
    "prune": run_prune,
    "predict": run_predict,
}


# The sweep jobs of this process that ended in an error (one line each): the sweep goes on to
# its other jobs, and the command exits 2 at its end.
FAILED_JOBS: list[str] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) during a task that reads a trained model: unwinds as Ctrl-C does,
    so that the task's temporary files are removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated while the block runs (their default would end the
    process at once, with no clean-up). Only where they have their default action: one that
    nohup ignores, or that a launcher (submitit) handles, is left as it is. Training has its
    own handling (engine.preemption)."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    names = ("SIGTERM", "SIGHUP")
    wanted = [getattr(signal, n) for n in names if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in wanted if signal.getsignal(s) == signal.SIG_DFL]
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# The task this process is running (for the message of an interrupted one).
RUNNING_TASK: list[str] = []


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def train(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        check_bool_overrides(list(hydra_cfg.overrides.task))
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if take_run_length(cfg, run_dir, list(hydra_cfg.overrides.task)):
            # a sweep's job (a single run took it before Hydra wrote its record): its record
            # says what the run uses
            if hydra_cfg.output_subdir is not None:
                OmegaConf.save(cfg, run_dir / str(hydra_cfg.output_subdir) / "config.yaml")
        validate(_as_the_task_runs(cfg, list(hydra_cfg.overrides.task)))
        RUNNING_TASK[:] = [cfg.task]
        if cfg.task not in WEIGHTS_TASKS:
            return TASKS[cfg.task](cfg, run_dir, list(hydra_cfg.overrides.task))
        from resnet_train.deploy.staging import remove_leftovers

        _check_deploy_run_dir(cfg.task, run_dir)  # (a sweep's job is checked here only)
        with stop_signals_unwind():
            if removed := remove_leftovers(run_dir):
                logging.getLogger("resnet_train").info(
                    "removed what a killed task=%s left here: %s", cfg.task, ", ".join(removed)
                )
            return TASKS[cfg.task](cfg, run_dir, list(hydra_cfg.overrides.task))
    except (UserError, FloatingPointError) as e:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            log_file_only(logging.ERROR, f"this run failed: {one_line(str(e))}")  # (train.log)
            _fail(e)
        # One job of a sweep: its error is its result. The other jobs still run; an Optuna
        # search records the trial as failed (no objective) and goes on with the next.
        overrides = " ".join(hydra_cfg.overrides.task)
        message = f"job {hydra_cfg.job.num} ({overrides}): {one_line(str(e))}"
        # (resnet-train-report reads this line: report.FAILED)
        log_file_only(logging.ERROR, f"this job failed: {one_line(str(e))}")  # (the console
        # has the line below)
        print(f"resnet-train: error: {message}", file=sys.stderr, flush=True)
        FAILED_JOBS.append(message)
        return None
    except Exception as e:
        # A stop signal that a library wrapped in its own error (torch's ONNX exporter does):
        # the interruption itself, not a failed job (Hydra printed "Error executing job" first).
        if (interrupt := _interrupt_in_chain(e)) is not None:
            raise interrupt from None
        raise


def run_single(cfg: DictConfig) -> None:
    """Run one job from its composed config as Hydra's own single-run mode does (run directory,
    .hydra/ record, logging, callbacks), without composing the config twice more as
    hydra.main would (0.3-0.5 s each on a 2-core CPU)."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        with read_write(cfg.hydra):
            if cfg.hydra.mode is None:
                cfg.hydra.mode = RunMode.RUN
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name="train")
        ret = run_job(
            hydra_context=HydraContext(config_loader=loader, callbacks=callbacks),
            task_function=train.__wrapped__,
            config=cfg,
            job_dir_key="hydra.run.dir",
            job_subdir_key=None,
        )
        callbacks.on_run_end(config=cfg, config_name="train", job_return=ret)
        _ = ret.return_value  # raises the task's exception, if it failed


# Hydra's flags that take a value, and those of them after which a config is only printed.
VALUE_FLAGS = ("--cfg", "-c", "--package", "-p")
PRINT_FLAGS = ("--cfg", "-c")


def cfg_print_overrides(args: list[str]) -> list[str] | None:
    """The overrides of `resnet-train --cfg job [--package P] key=value ...`, or None for any
    other use of flags (Hydra handles those alone)."""
    overrides, flags, i = [], set(), 0
    while i < len(args):
        arg = args[i]
        if arg in VALUE_FLAGS:
            flags.add(arg)
            i += 2
            continue
        if arg == "--resolve":  # (a flag without a value: the printed config's interpolations)
            i += 1
            continue
        if arg.startswith("-"):
            return None
        overrides.append(arg)
        i += 1
    return overrides if flags & set(PRINT_FLAGS) else None


def check_config_only(overrides: list[str]) -> list[str]:
    """Compose and validate a config (no data read): a one-line error and exit 2 if it is bad.
    A resumed training run is checked with its own length (take_run_length): returned as
    key=value overrides, for the printed config to say what the run would use."""
    kept: list[str] = []
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except Exception as e:
        _fail(describe_composition_error(e))
    try:
        check_bool_overrides(overrides)
        if cfg.get("task") == "train" and cfg.get("resume") is not None:
            composed = compose_run(overrides)  # (its run folder)
            kept = take_run_length(cfg, Path(str(composed.hydra.run.dir)), overrides)
        OmegaConf.to_container(cfg, resolve=True)  # (a value that does not resolve: one line)
        validate(cfg)
        checked = copy.deepcopy(cfg)
        complete(checked)
        if checked.task == "train":
            # what the model and the weights file say (an image folder's classes are data)
            from resnet_train.models.build import check_model, check_weights

            check_model(checked)
            if checked.data.num_classes is not None and checked.resume is None:
                check_weights(checked)
    except UserError as e:
        _fail(e)
    except OmegaConfBaseException as e:  # (an interpolation that does not resolve)
        _fail(describe_composition_error(e))
    return kept


# Each value of a sweep is composed once before any job runs; a sweep of more values than this
# has the rest checked by Hydra as their jobs start.
MAX_CHECKED_SWEEP_VALUES = 200
# A sweep of up to this many jobs is refused before its first when every one of them would be.
MAX_CHECKED_SWEEP_JOBS = 32


def check_sweep_overrides(overrides: list[str]) -> None:
    """A sweep's overrides (args are all key=value) compose with every value of each swept key
    (each varied alone): a key that does not exist, a value of the wrong type or a group option
    that does not exist is the one-line error of a single run, exit 2, before any job runs (it
    was Hydra's many-line message, exit 1, after the jobs before it had run). A value out of its
    range is that job's error, as the sweep goes on, unless every job would be refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from resnet_train.config import sweep_values

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's grammar errors
        _fail(describe_composition_error(e))
    base: list[str] = []
    searchpath: list[str] = []  # (hydra.searchpath: one's own config files)
    swept: list[tuple[int, list[str]]] = []
    globs = []
    hydra_overrides: list[str] = []  # (hydra.sweeper.n_trials=..., hydra/launcher=...)
    search = any(o.get_key_element() == "hydra/sweeper" and "optuna" in str(o.value())
                 for o in parsed)  # fmt: skip
    for o in parsed:
        if o.is_hydra_override():
            if o.get_key_element() == "hydra.searchpath":
                searchpath.append(o.input_line)
            else:
                hydra_overrides.append(o.input_line)
            continue
        if o.is_interval_sweep() and not search:  # (Hydra's traceback: BasicSweeper does not
            _fail(  # support sweep type INTERVAL_SWEEP)
                f"{o.input_line} is invalid: interval() is a search space, which only a search "
                'draws from: add hydra/sweeper=optuna_cpu (pip install "resnet-train[optuna]"), '
                "or give values: key=a,b,c or range()"
            )
        if o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
            globs.append(o)
        if o.is_sweep_override() and sweep_values(o) == []:  # (Hydra launched 0 jobs, exit 0)
            _fail(f"{o.input_line} is invalid: it gives no value, so the sweep would run no job")
        if not o.is_sweep_override():
            base.append(o.input_line)
            continue
        # (interval(), an Optuna search space, and glob(), left to Hydra: no values here)
        if (read := sweep_values(o)) is None:
            continue
        values = [f"{o.get_key_element()}={v}" for v in read]
        if o.get_key_element() == "name" and len(values) > 1:
            _fail(
                f"{o.input_line} is invalid: name= names the sweep's folder "
                "(outputs/multirun/NAME): give one; its jobs are named by what they sweep"
            )
        if values:
            swept.append((len(base), values))
            base.append(values[0])
    variants = [base] + [base[:i] + [v] + base[i + 1 :] for i, values in swept for v in values[1:]]
    composed: dict[tuple[str, ...], DictConfig] = {}  # (each composed once)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for o in globs:  # (one that matches nothing: Hydra launched 0 jobs, exit 0)
            key = o.get_key_element()
            options = loader.get_group_options(key) if key in GROUPS else []
            if not o.value().filter(options):
                allowed = f"the options of {key}: {', '.join(options)}" if options else (
                    f"{key} is not a config group (glob() picks a group's options)")  # fmt: skip
                _fail(f"{o.input_line} is invalid: it matches none of {allowed}")
        try:  # Hydra's own keys, once (a mistyped one was Hydra's page of error, exit 1)
            compose("train", overrides=[*searchpath, *hydra_overrides, *variants[0]],
                    return_hydra_config=True)  # fmt: skip
        except Exception as e:
            _fail(describe_composition_error(e))
        for variant in variants[:MAX_CHECKED_SWEEP_VALUES]:
            try:
                cfg = composed[tuple(variant)] = compose("train", overrides=[*searchpath, *variant])
                OmegaConf.to_container(cfg, resolve=True)  # (a value that does not resolve:
            except Exception as e:  # it was Hydra's traceback as the sweep started)
                _fail(describe_composition_error(e))
            try:  # (the sweep's folder: Hydra makes it before any job checks its config)
                check_name(cfg.get("name"))
            except UserError as e:
                _fail(e)
        # every job (a grid small enough to check whole): a value that each would refuse (an
        # Optuna search's fixed keys ran every trial into it)
        jobs = [[]]
        for i, values in swept:
            jobs = [[*job, (i, v)] for job in jobs for v in values]
            if len(jobs) > MAX_CHECKED_SWEEP_JOBS:
                return
        refusals = []
        for job in jobs:
            variant = list(base)
            for i, v in job:
                variant[i] = v
            try:
                known = composed.get(tuple(variant))
                validate(known or compose("train", overrides=[*searchpath, *variant]))
                return  # (a job that runs)
            except UserError as e:
                refusals.append(str(e))
            except Exception:  # (a composition error: Hydra's, at that job)
                return
    _fail(f"every job of this sweep would be refused: {refusals[0]}")


def check_output_folder(folder: Path, key: str, what: str = "run") -> None:
    """A folder that a run (or a sweep) can make and write into, or a one-line RunDirError
    naming the key that placed it: a name too long, a path under a file, a link to nothing, a
    folder without write permission were the traceback of the OSError."""
    from resnet_train.config import NAME_MAX
    from resnet_train.errors import RunDirError

    for part in folder.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise RunDirError(
                f"{key}: the folder name {part[:40]}... of {folder.name[:40]}... is "
                f"{len(os.fsencode(part))} bytes long; at most {NAME_MAX} (the file system's)"
            )
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise RunDirError(
            f"{existing} is a link to {os.readlink(existing)}, which does not exist: make that "
            f"folder or remove the link (it holds {folder}: {key})"
        )
    if not existing.is_dir() and existing == folder:
        raise RunDirError(
            f"{folder} is a file, not a folder to write the {what} into: give another {key}="
        )
    if not existing.is_dir():
        raise RunDirError(
            f"{existing} is a file: {folder} cannot be made under it; give another {key}="
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"{existing} is not writable by this user: {folder} cannot be "
            f"{'written' if existing == folder else 'made'} there; give another {key}="
        )


def check_sweep_folder(config: DictConfig) -> None:
    """A sweep's folder that cannot be made or written (check_output_folder), and a sweep
    started again without resume= into the folder of an earlier one that trained:
    refused before anything is written. Each job was refused alone, but only after Hydra had
    rewritten the finished jobs' .hydra/ records with the new command's settings, added to
    their logs and replaced the sweep's multirun.yaml."""
    from resnet_train.engine.checkpoint import CHECKPOINT_NAMES

    try:
        folder = Path(str(config.hydra.sweep.dir))
    except Exception:  # (an interpolation that does not resolve: Hydra says so, as before)
        return
    given = [str(o).split("=", 1)[0] for o in config.hydra.overrides.hydra]
    try:
        key = "hydra.sweep.dir" if "hydra.sweep.dir" in given else "name"
        check_output_folder(folder, key, "sweep")
    except UserError as e:
        _fail(e)
    if not folder.is_dir():
        return
    from resnet_train.engine import runlock

    jobs = sorted(job for job in folder.iterdir() if job.is_dir())
    try:  # a job of it still training (the same sweep started twice, or relaunched with
        for job in jobs:  # resume=auto while it runs): Hydra would rewrite its record and log
            runlock.check_free(job)  # before the job met the lock
    except UserError as e:
        _fail(e)
    params = config.hydra.sweeper.get("params")  # (a search's fixed values: resume=auto)
    resume = params.get("resume") if isinstance(params, DictConfig) else None
    if resume is not None or config.get("resume") is not None or config.get("task") != "train":
        return
    names = (*CHECKPOINT_NAMES, "metrics.json")
    trained = [job for job in jobs if any((job / n).exists() for n in names)]
    if trained:
        _fail(
            f"{folder} holds the jobs of an earlier sweep ({len(trained)} with checkpoints or "
            "results, e.g. " + trained[0].name + "): continue it with resume=auto (its finished "
            "jobs are left as they are), or give the sweep another name="
        )


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def register_sweeper() -> None:
    """Make resnet-train's resumable Optuna sweeper (hydra_plugins/resnet_train_optuna) known to
    Hydra. Hydra's scan of the hydra_plugins namespace finds it in an installed wheel but not in
    an editable install (pip install -e), whose import hook the scan cannot list; Hydra's
    Plugins.register is the documented way to add it by hand. Without the optuna extra there
    is nothing to register."""
    # Alembic (Optuna's SQLite storage) logs 7 "setup plugin" lines at INFO on import
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        from hydra_plugins.resnet_train_optuna.resumable_sweeper import ResumableOptunaSweeper
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    Plugins.instance().register(ResumableOptunaSweeper)


# Under torchrun, the processes other than rank 0 share rank 0's run directory and write no
# .hydra/ record there (fit() takes their log file handler away).
QUIET_RANK_OVERRIDES = ["hydra.output_subdir=null"]


def main() -> None:
    args = sys.argv[1:]
    RUNNING_TASK.clear()  # this command's (main() may run more than once a process)
    if (launch_args := split_launch_args(args)) is not None:
        from resnet_train.launch import launch

        launch(*launch_args, precheck, _starting_interrupted)
        return
    if (ordered := check_overrides(config_dir_as_searchpath(check_flags(args)))) != args:
        sys.argv[1:] = args = ordered  # (as Hydra reads them)
    if "WORLD_SIZE" in os.environ and {"-m", "--multirun"} & set(args):
        _fail(
            "-m/--multirun under torchrun is invalid: every process would launch the whole "
            "sweep; run the sweep's jobs one torchrun each, or use hydra/launcher=slurm"
        )
    sweeper = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/sweeper=")), None)
    if (
        sweeper
        and sweeper.startswith("optuna")
        and not _installed("hydra_plugins.hydra_optuna_sweeper")
    ):
        _fail(
            f"hydra/sweeper={sweeper} needs Hydra's Optuna sweeper, which is not installed: "
            'pip install "resnet-train[optuna]" (or -e ".[optuna]" in a checkout)'
        )
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    printing = {"--cfg", "-c", "--help", "-h"} & set(args)
    multirun = {"-m", "--multirun"} & set(args)
    if multirun and {"--cfg", "-c"} & set(args):
        _fail(
            "--cfg with -m is invalid: --cfg prints one job's config (give one value per key, "
            "without -m); -m runs the sweep"
        )
    if launcher in ("slurm", "submitit_slurm") and not printing and not multirun:
        _fail(
            f"hydra/launcher={launcher} is invalid without -m: the launcher submits a sweep's "
            "jobs (a single run with -m is a sweep of one job); without it the run would train "
            "here"
        )
    if launcher in ("slurm", "submitit_slurm") and not printing:
        import shutil

        if shutil.which("sbatch") is None:
            _fail(
                "hydra/launcher=slurm is invalid here: this machine has no SLURM (no sbatch on "
                "PATH); run it on the cluster's login node, or leave hydra/launcher out to run "
                "the jobs here"
            )
    # A stop signal while a training run starts (its config's check, its data's reading) is
    # held until its training begins, which stops at once as a preempted run (exit 75, and a
    # SLURM requeue); it used to end the process silently. Other commands get it back.
    from resnet_train.engine.preemption import HeldSignals

    # (not for a launcher's sweep: its jobs run elsewhere, this process only waits for them)
    held = HeldSignals() if launcher else HeldSignals().install()
    from resnet_train.engine import faults

    faults.point("starting")
    try:
        # Flags (--help, --cfg, -m, ...) and multiruns are Hydra's to handle; --cfg prints a
        # config that is checked first, as a run's would be.
        if not any(arg.startswith("-") for arg in args):  # a single run
            if int(os.environ.get("RANK", "0")) > 0:
                args = [*args, *QUIET_RANK_OVERRIDES]
            cfg = compose_run(args)
            RUNNING_TASK[:] = [str(cfg.task)]  # (a Ctrl-C in the pre-check is this task's)
            if cfg.task != "train":  # (the other tasks handle stop signals themselves)
                held.release(redeliver=True)
            if not os.environ.get(CHECKED_ENV):  # checked once by `resnet-train --nproc-per-node`
                precheck(args, cfg)
            run_single(cfg)
            return
        tasks = {a.split("=", 1)[1] for a in args if a.startswith("task=")}
        if not (multirun and tasks <= {"train"}):
            held.release(redeliver=True)
        if (overrides := cfg_print_overrides(args)) is not None:
            # (Hydra reads and prints sys.argv's: the run's own length joins the overrides,
            # next to the first, where argparse takes them in any order of flags)
            if kept := check_config_only(overrides):
                first = next(i for i, a in enumerate(sys.argv) if i and a == overrides[0])
                sys.argv[first:first] = kept
        if multirun:
            keyed = [a for a in args if a not in multirun]
            if all("=" in a and not a.startswith("-") for a in keyed):  # (no other flags)
                check_sweep_overrides(keyed)
            register_sweeper()
        FAILED_JOBS.clear()  # this command's jobs only (main() may run more than once a process)
        train()
        if FAILED_JOBS:
            _fail(
                f"{len(FAILED_JOBS)} job(s) of the sweep failed (each said why above); the first: "
                f"{FAILED_JOBS[0]}"
            )
    except KeyboardInterrupt as e:  # a Ctrl-C outside a run's steps, or a second one inside
        _interrupted(e)
    except Exception as e:
        # A library that catches the Ctrl-C and raises its own error (torch's ONNX exporter
        # does, when it lands in its import of torch._dynamo): still an interruption.
        if (interrupt := _interrupt_in_chain(e)) is None:
            raise
        _interrupted(interrupt)
    finally:
        held.release()
        from resnet_train.engine import runlock

        runlock.release_all()  # (the process ends here; main() run again in one process)


GROUPS = ("model", "data", "optim", "schedule", "trainer", "experiment")


def config_dir_as_searchpath(args: list[str]) -> list[str]:
    """`--config-dir DIR` (one's own configs beside resnet-train's) as the override
    hydra.searchpath=[file://DIR], which every path of the command reads: a single run with the
    flag skipped its checks (a refused run rewrote a finished run's record; bad input wrote a
    folder). With --config-name (a primary config of one's own) it is left to Hydra."""
    if "--config-dir" not in args or {"--config-name", "--help", "-h", "--hydra-help"} & set(args):
        return args
    at = args.index("--config-dir")
    if at + 1 >= len(args):
        return args  # (argparse says its value is missing)
    folder = Path(args[at + 1]).expanduser()
    if not folder.is_dir():
        _fail(f"--config-dir={args[at + 1]} is invalid: no such folder (of one's own configs)")
    rest = args[:at] + args[at + 2 :]
    entry = hydra_quoted(f"file://{folder.resolve()}")  # (a path with , [ ] ' or =)
    given = next((i for i, a in enumerate(rest) if a.startswith("hydra.searchpath=")), None)
    if given is None:
        return [*rest, f"hydra.searchpath=[{entry}]"]
    value = rest[given].split("=", 1)[1].strip()
    inner = value[1:-1].strip() if value.startswith("[") and value.endswith("]") else value
    rest[given] = f"hydra.searchpath=[{inner + ',' if inner else ''}{entry}]"
    return rest


def check_overrides(args: list[str]) -> list[str]:
    """Overrides that Hydra takes but that mean nothing here, refused in one line: a list of a
    group's options (Hydra merges them into one config), hydra.mode (-m is the switch),
    hydra.job.chdir=true (relative paths are read from where the command starts)."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in GROUPS and value.strip().startswith("["):
            _fail(
                f"{key}={value} is invalid: {key} takes one option (a list merges them into "
                f"one config); to run each, sweep: -m {key}={value.strip()[1:-1]}"
            )
        if key == "hydra.mode" and value.strip().upper() == "MULTIRUN":
            _fail(f"{arg} is invalid: give -m for a sweep (a single run without it)")
        if key == "hydra.job.chdir" and value.strip().lower() not in ("false", "null"):
            _fail(
                f"{arg} is invalid: resnet-train reads data.root, model.weights and the other "
                "paths from the folder it starts in, and stays there (a run's files go to its "
                "run folder all the same)"
            )
    return args


def check_flags(args: list[str]) -> list[str]:
    """The command's arguments, flags first: Hydra's parser (argparse) gave its usage page for
    a flag after an override that another override follows (`model=resnet18 -m seed=0,1`).
    Refused in one line: what it would answer with that page (an option it does not know), and
    --nproc-per-node where the launcher does not take it (after an override, or with -m)."""
    if launch_flag := next((a for a in args if is_launch_flag(a)), None):
        if {"-m", "--multirun"} & set(args):
            _fail(with_a_sweep(launch_flag))
        _fail(
            f"{launch_flag} is invalid after {args[0]!r}: the launcher's options come first, "
            "as in `resnet-train --nproc-per-node=N [torchrun's options] key=value ...`"
        )
    if {"--help", "-h", "--hydra-help", "--version"} & set(args):
        return args  # (Hydra's to print; its parser would act on them here)
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "resnet-train"

    def error(message: str) -> NoReturn:
        _fail(f"{message} (resnet-train --help lists the options; a setting is key=value)")
        raise AssertionError  # (_fail exits)

    parser.error = error  # type: ignore[method-assign]
    parsed = parser.parse_intermixed_args(args)
    if parsed.experimental_rerun is not None:
        _fail(
            "--experimental-rerun is invalid here: run the run's command again (its "
            ".hydra/overrides.yaml) with resume=auto, which continues or leaves it as it is"
        )
    flags = []
    for action in parser._actions:
        value = getattr(parsed, action.dest, None)
        if not action.option_strings or value in (None, False) or value == action.default:
            continue
        option = max(action.option_strings, key=len)  # (--multirun, not -m)
        if action.nargs == 0:
            flags.append(option)
        elif action.nargs == "?":  # (--info=all: a next override is not taken for its value)
            flags.append(f"{option}={value}")
        else:
            flags += [option, str(value)]
    return [*flags, *parsed.overrides]


@contextlib.contextmanager
def _starting_interrupted() -> Iterator[None]:
    """A Ctrl-C while the launcher starts (its imports, its checks), before any process: one
    line, nothing written. The first is noted and acted on when the block ends: raised inside
    an import, it was a traceback of the import it broke, or a module left half made (numpy
    without its functions) and a later error; a second stops at once."""
    got: list[int] = []

    def note(signum: int, frame: object) -> None:
        got.append(signum)
        if len(got) > 1:
            raise KeyboardInterrupt

    swap = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # fmt: skip
    if swap:
        signal.signal(signal.SIGINT, note)
    try:
        try:
            yield
        finally:
            if swap:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if got:
            raise KeyboardInterrupt
    except Exception as e:  # (a library that turned the Ctrl-C into its own error)
        if _interrupt_in_chain(e) is None:
            raise
    except KeyboardInterrupt:
        pass
    else:
        return
    print("resnet-train: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def _interrupt_in_chain(error: BaseException) -> KeyboardInterrupt | None:
    found = cause_in_chain(error, lambda cause: isinstance(cause, KeyboardInterrupt))
    return found if isinstance(found, KeyboardInterrupt) else None


def log_file_only(level: int, message: str) -> None:
    """Write a line to the run's log file (train.log) and not to the console, which says it
    otherwise (the one-line error a run ends with, on stderr)."""
    logger = logging.getLogger("resnet_train")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + logger.handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def _interrupted(e: KeyboardInterrupt) -> None:
    """One line on what an interrupted command left, and the shell's status for the signal."""
    task = RUNNING_TASK[0] if RUNNING_TASK else "train"
    how = f"terminated ({e})" if isinstance(e, Terminated) else "interrupted"
    from resnet_train.deploy.staging import FINISHED_WHEN_STOPPED

    if task in WEIGHTS_TASKS and FINISHED_WHEN_STOPPED:
        what = (
            f"it came as task={task}'s files were put in place: they all are, its record "
            "included (only what it prints after them is not)"
        )
    elif task in WEIGHTS_TASKS:
        what = (
            f"task={task} stopped at once; its files are put in place only when it ends, so it "
            "left none (its log stays; run it again with the same name=)"
        )
    else:
        what = (
            "stopped at once; checkpoints are written whole, so the last one saved is intact "
            "(resume=auto continues from it)"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # (every process got it: rank 0 says it)
        print(f"resnet-train: {how}: {what}", file=sys.stderr)
        if not {"-m", "--multirun"} & set(sys.argv):  # (a sweep's handler may be an old job's)
            log_file_only(logging.WARNING, f"{how}: {what}")
    sys.exit(128 + e.signum if isinstance(e, Terminated) else 130)


def run() -> None:
    """The `resnet-train` command: main(), then an exit that skips the interpreter's teardown.
    With torch loaded, Python's own exit spends 1-1.5 s on a 2-core CPU freeing modules that
    the operating system frees at once; everything a run writes is closed by then (checkpoints,
    metrics, TensorBoard's event files), and the log handlers and standard streams are flushed
    here first. An uncaught exception still takes the ordinary way out, with its traceback."""

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
