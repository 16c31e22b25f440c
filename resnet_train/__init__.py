"""resnet-train: a config-driven trainer for ResNets on CIFAR-10/100 and ImageNet."""

from pathlib import Path as _Path
from typing import Any as _Any

# The YAML configs ship inside an installed package as resnet_train.configs (setuptools maps the
# top-level configs/ there). A source checkout that is not installed (run from its root with
# `python -m resnet_train`, as on a machine that gets a copy of the tree) has them beside the
# package: there, the checkout's root joins this package's search path so that
# resnet_train.configs is that configs/ folder.
_here = _Path(__file__).resolve().parent
if not (_here / "configs").is_dir() and (_here.parent / "configs" / "train.yaml").is_file():
    __path__.append(str(_here.parent))

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"


def __getattr__(name: str) -> _Any:
    """create_model and list_models, imported on first use: the command line starts without
    torch (2 s of imports on a 2-core CPU), so that its first lines (a config's check, a stop
    signal's handling) come before them."""
    if name in __all__:
        from resnet_train import models

        return getattr(models, name)
    raise AttributeError(f"module 'resnet_train' has no attribute {name!r}")
