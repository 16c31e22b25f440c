"""`resnet-train --nproc-per-node=N [torchrun options] key=value ...`: DistributedDataParallel
started by resnet-train itself, through torchrun's own launcher (torch.distributed.run).

Started so, a run behaves as a single process does: a bad config is refused once, in one line,
with exit status 2, before any process starts or anything is written; an error in the
processes is the one line rank 0 prints, and the command exits with the processes' status (2
for bad input, 75 when stopped by SIGTERM, 130 by Ctrl-C) instead of torchrun's report of a
failed child (a page of traceback, status 1). `torchrun ... -m resnet_train` works as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

# The options that make a command a launch: torchrun's, in either spelling.
LAUNCH_FLAGS = ("--nproc-per-node", "--nproc_per_node")
# Set on the processes this launcher starts: their config was checked once, here.
CHECKED_ENV = "RESNET_TRAIN_LAUNCHED"


def split_launch_args(args: list[str]) -> tuple[list[str], list[str]] | None:
    """(torchrun's options, the overrides) of `[--opt[=v] ...] --nproc-per-node=N [--opt[=v]
    ...] key=value ...`, or None for a command whose leading options hold no --nproc-per-node.
    The options end at the first argument that is neither an option nor an option's value
    (key=value); --nproc-per-node may stand anywhere among them (`--nnodes=2
    --nproc-per-node=8`, as torchrun takes them)."""
    i = 0
    while i < len(args) and args[i].startswith("--"):
        takes_value = "=" not in args[i]
        i += 1
        if takes_value and i < len(args) and not args[i].startswith("-") and "=" not in args[i]:
            i += 1  # --nproc-per-node 2
    if not any(is_launch_flag(a) for a in args[:i]):
        return None
    return args[:i], args[i:]


def is_launch_flag(arg: str) -> bool:
    return arg.split("=", 1)[0] in LAUNCH_FLAGS


def with_a_sweep(launch_flag: str) -> str:
    """The refusal of --nproc-per-node with -m."""
    return (
        f"{launch_flag} with -m is invalid: a sweep runs its jobs one at a time in this process; "
        "give each job its own `resnet-train --nproc-per-node=N key=value ...`, or sweep with "
        "hydra/launcher=slurm, whose tasks per job form a DDP group"
    )


def launch(launch_args: list[str], overrides: list[str], precheck, starting=None) -> None:
    """Check the config as the processes will see it (their number known), then start them.
    `starting`: a context manager that turns a Ctrl-C before the processes start into one line."""
    from resnet_train.cli import _fail

    with starting() if starting is not None else contextlib.nullcontext():
        args, nproc = _prepare(launch_args, overrides, precheck, _fail)
    _start(args, nproc)


def _prepare(launch_args: list[str], overrides: list[str], precheck, _fail):
    """torchrun's parsed options and the number of processes per node, the config checked."""
    if {"-m", "--multirun"} & {*launch_args, *overrides}:
        _fail(with_a_sweep(next(a for a in launch_args if is_launch_flag(a))))
    if any(a.startswith("-") for a in overrides):
        _fail(
            f"{' '.join(a for a in overrides if a.startswith('-'))} is invalid with "
            "--nproc-per-node: give torchrun's options first, then key=value overrides only"
        )
    import torch.distributed.elastic.multiprocessing.errors  # noqa: F401  (what _start needs,
    import torch.distributed.run as torchrun  # loaded where a Ctrl-C is one line)

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # argparse's usage text: its error line is kept
            args = torchrun.parse_args([*launch_args, "-m", "resnet_train", *overrides])
        nproc = torchrun.determine_local_world_size(args.nproc_per_node)
        min_nodes, max_nodes = torchrun.parse_min_max_nnodes(args.nnodes)
    except (SystemExit, ValueError) as e:
        lines = [line for line in said.getvalue().splitlines() if ": error: " in line]
        reason = lines[-1].split(": error: ", 1)[1] if lines else str(e)
        _fail(f"{' '.join(launch_args)} is invalid: torchrun's options are expected ({reason})")
    if nproc < 1:
        _fail(f"--nproc-per-node={args.nproc_per_node} is invalid: must be a number of processes "
              ">= 1 (or gpu, cpu, auto)")  # fmt: skip
    if not 1 <= min_nodes <= max_nodes:
        _fail(f"--nnodes={args.nnodes} is invalid: a number of machines >= 1, or MIN:MAX with "
              "1 <= MIN <= MAX")  # fmt: skip
    world = nproc * min_nodes if min_nodes == max_nodes else None
    os.environ["WORLD_SIZE"] = str(world or nproc)  # the run's directory and step plan use it
    try:
        precheck(overrides)
    finally:
        del os.environ["WORLD_SIZE"]
    return args, nproc


def _start(args, nproc: int) -> None:
    """Start the processes with torchrun's launcher; exit with their status."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from resnet_train.cli import _fail

    os.environ[CHECKED_ENV] = "1"
    # Spread the cores over the processes (torchrun's default is 1 thread each, with a banner).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun's own lines about a failed or signalled process: the processes say it better
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except KeyboardInterrupt:  # a Ctrl-C as the processes start, before torchrun handles it
        print("resnet-train: interrupted as its processes started; they stop with it (a run's "
              "checkpoints are written whole: resume=auto continues from the last one)",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)
    except RuntimeError as e:  # the launcher's own rendezvous store (a port that is taken)
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        _fail(f"the rendezvous port {args.master_port} is in use (EADDRINUSE): give another "
              "--master-port, or --standalone to pick a free one")  # fmt: skip
    except ChildFailedError as e:
        # The cause first: a process killed by a signal (the others then fail, losing it),
        # then one that said why in one line (bad input, stopped), then the first.
        failures = sorted(e.failures.items(), key=lambda f: (f[1].exitcode >= 0,
                          f[1].exitcode not in (2, 75, 130), f[1].timestamp))  # fmt: skip
        rank, failure = failures[0]
        code = failure.exitcode
        if code in (2, 75, 130):  # rank 0 has said why in one line
            sys.exit(code)
        if code < 0:
            print(f"resnet-train: error: process {rank} was killed by signal {-code}",
                  file=sys.stderr)  # fmt: skip
            sys.exit(128 - code)
        print(f"resnet-train: error: process {rank} failed with exit status {code} (its error "
              "is above)", file=sys.stderr)  # fmt: skip
        sys.exit(code)
    except SignalException as e:  # a signal to this launcher: torchrun passed it on to the
        # processes, which saved at a step and stopped (rank 0 says where)
        sys.exit(130 if e.sigval == 2 else 75)
