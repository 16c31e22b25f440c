"""CIFAR-10 and CIFAR-100 from torchvision's on-disk layout (the official "python version")."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np

from resnet_train.errors import DataError

# name -> (folder under data.root, training files, test files, label key)
LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise DataError(
            f"{path} is not a readable CIFAR batch file ({type(e).__name__}: {e})"
        ) from None
    # Rows are 3072 bytes: 1024 red, 1024 green, 1024 blue, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _download(name: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(str(root), train=True, download=True)


def _where_to_look(folder: str, names: tuple[str, ...], root: Path) -> str:
    """The advice of a missing-data error: the parent, where data.root names the batch folder
    itself; else what data.root must hold."""
    if any((root / n).is_file() for n in names):
        if root.name == folder:
            return (
                f"data.root={root} holds the batch files themselves: give its parent, "
                f"data.root={root.parent}"
            )
        return (
            f"data.root={root} holds the batch files themselves: they go in a folder named "
            f"{folder}/ inside data.root (DIR/{folder}/{names[0]}, then data.root=DIR)"
        )
    return (
        f"set data.root to the folder that contains {folder}/ (data.root=DIR for "
        f"DIR/{folder}/{names[0]})"
    )


def cifar_files(name: str, root: str | Path, train: bool, download: bool) -> list[Path]:
    """The batch files of one split, downloaded first when missing and `download` is true."""
    folder, train_files, test_files, _ = LAYOUTS[name]
    root = Path(root).expanduser()
    names = tuple(train_files if train else test_files)
    files = [root / folder / f for f in names]
    missing = [f for f in files if not f.is_file()]
    if missing and any((root / n).is_file() for n in names):  # the batch folder itself
        raise DataError(f"{name} not found: {missing[0]} is missing; "
                        f"{_where_to_look(folder, names, root)}")  # fmt: skip
    if missing and download:
        made = [p for p in (root, *root.parents) if not p.exists()]  # (made by the download)
        try:
            _download(name, root)
        except Exception as e:  # network errors come in many types; all mean the same here
            if made:  # the folders it made, and what it left in them, are not kept
                shutil.rmtree(made[-1], ignore_errors=True)
            raise DataError(
                f"{name} not found in {root / folder} and the download failed "
                f"({type(e).__name__}: {e}); {_where_to_look(folder, names, root)}"
            ) from None
        missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{name} not found: {missing[0]} is missing; {_where_to_look(folder, names, root)}"
            + ("" if download else ", or data.download=true to fetch it")
        )
    return files


def load_cifar(
    name: str, root: str | Path, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 32, 32, 3) and labels as int64 (N,)."""
    label_key = LAYOUTS[name][3]
    parts = [_read_batch(f, label_key) for f in cifar_files(name, root, train, download)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_class_names(name: str, root: str | Path) -> list[str] | None:
    """The label names of the release's meta file ("airplane", ...), or None without one."""
    folder = LAYOUTS[name][0]
    meta, key = {
        "cifar10": ("batches.meta", "label_names"),
        "cifar100": ("meta", "fine_label_names"),
    }[name]
    try:
        with open(Path(root).expanduser() / folder / meta, "rb") as f:
            names = pickle.load(f, encoding="latin1")[key]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
        return None
    return [str(n) for n in names]
