"""The `resnet-train` command's entry point, which imports nothing before it is ready for a
Ctrl-C: one during the command's own imports (Hydra, OmegaConf: its first ~0.3 s) printed
Python's traceback of the import it broke."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from resnet_train.cli import run as run_command
    except KeyboardInterrupt:
        import os

        if os.environ.get("RANK", "0") == "0":  # (under torchrun every process got it)
            print("resnet-train: interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        run_command()
    except BrokenPipeError:  # `resnet-train --help | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (for the exit's flush)
        if not {"--help", "-h", "--hydra-help", "--info", "--cfg", "-c"} & set(sys.argv):
            print("resnet-train: stopped: its output's reader went away (a broken pipe)",
                  file=sys.stderr)  # fmt: skip
        sys.exit(141)  # (128 + SIGPIPE, as a shell reports a command a pipe ended)
