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
    run_command()
