"""From the data config to DataLoaders: read the set, carve the validation split, wrap."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from resnet_train.config import DataConfig
from resnet_train.data.cifar import cifar_files, load_cifar
from resnet_train.data.device_decode import (
    DeviceDecodeLoader,
    collate_files,
    read_file_bytes,
    seeded,
)
from resnet_train.data.folders import REMOVE, read_image, read_pil_image
from resnet_train.data.sampler import EpochSampler, ShardSampler
from resnet_train.data.split import stratified_split, stratified_subset
from resnet_train.data.synthetic import make_synthetic
from resnet_train.data.tensor_loader import TensorLoader
from resnet_train.data.transforms import build_transform
from resnet_train.errors import ConfigError, DataError


class ArrayImages(Dataset):
    """uint8 images held in memory, served as (CHW uint8 tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW, a view
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


class TransformedSubset(Dataset):
    """The images `indices` of `base`, each passed through `transform`."""

    def __init__(self, base: Any, indices: np.ndarray, transform: Any) -> None:
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """`i` is a position, or (position, seed) from EpochSampler: then the transform draws its
        randomness from that seed alone, and the caller's random state is left as it was."""
        if isinstance(i, tuple):
            i, seed = i
            image, label = self.base[int(self.indices[i])]
            with seeded(seed):
                return self.transform(image), label
        image, label = self.base[int(self.indices[i])]
        return self.transform(image), label


class FileBytesSubset(Dataset):
    """data.decoder=gpu: the images `indices` of a data set whose loader reads raw file bytes,
    served undecoded as (bytes, label, sample seed or -1, place in the data set);
    DeviceDecodeLoader does the rest."""

    def __init__(self, base: Any, indices: np.ndarray) -> None:
        self.base = base
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        i, seed = i if isinstance(i, tuple) else (i, -1)
        data, label = self.base[int(self.indices[i])]
        return data, label, seed, int(self.indices[i])

    def path(self, place: int) -> str:
        """The file of the base data set's image `place` (an ImageFolder's)."""
        return str(self.base.samples[place][0])


@dataclass
class Loaders:
    train: DataLoader
    valid: DataLoader | None
    test: DataLoader
    num_classes: int
    # Images per class of the training split (what data.balance evens out).
    train_counts: np.ndarray | None = None


@dataclass
class Splits:
    """The data set read from disk and the indices of its three parts: the training images that
    are trained on (`fit`), the held-out validation images, and the test images."""

    train_base: Any
    test_base: Any
    train_labels: np.ndarray
    test_labels: np.ndarray
    fit: np.ndarray  # indices into train_base
    valid: np.ndarray  # indices into valid_base
    test: np.ndarray  # indices into test_base
    # The validation images' own data set (data=imagefolder's val/); None: part of train_base.
    valid_base: Any = None

    @property
    def valid_set(self) -> Any:
        return self.train_base if self.valid_base is None else self.valid_base

    def fit_counts(self, num_classes: int) -> np.ndarray:
        """Images per class of the part trained on."""
        return np.bincount(self.train_labels[self.fit], minlength=num_classes)


def _read_sets(cfg: DataConfig, seed: int) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """(train base, train labels, test base, test labels) for the configured data set. The last
    set read is kept, so that the check before a run and the run itself read the files once."""
    synthetic = cfg.name == "synthetic"
    return _read_sets_cached(
        cfg.name,
        str(cfg.root),
        bool(cfg.download),
        cfg.decoder,
        cfg.num_classes,
        cfg.image_size,
        cfg.train_size if synthetic else None,
        cfg.test_size if synthetic else None,
        seed if synthetic else None,
    )


@functools.lru_cache(maxsize=1)
def _read_sets_cached(
    name: str,
    root: str,
    download: bool,
    decoder: str,
    num_classes: int,
    image_size: int,
    train_size: int | None,
    test_size: int | None,
    seed: int | None,
) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    if name in ("cifar10", "cifar100"):
        train_x, train_y = load_cifar(name, root, train=True, download=download)
        test_x, test_y = load_cifar(name, root, train=False, download=False)
        return ArrayImages(train_x, train_y), train_y, ArrayImages(test_x, test_y), test_y
    if name == "synthetic":
        n_train = train_size or 512
        n_test = test_size or 256
        # Train and test images come from the same class templates (same seed), other noise.
        images, labels = make_synthetic(n_train + n_test, num_classes, image_size, seed or 0)
        train = ArrayImages(images[:n_train], labels[:n_train])
        test = ArrayImages(images[n_train:], labels[n_train:])
        return train, train.targets, test, test.targets
    if name == "imagenet":
        return _read_image_folders(root, decoder, num_classes)
    raise DataError(
        f"data.name={name!r} is invalid: allowed: cifar10, cifar100, imagenet, synthetic "
        "(data=imagefolder is read by read_splits)"
    )


def _subsets(
    cfg: DataConfig, train_labels: np.ndarray, test_labels: np.ndarray, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """The training and test indices: all, or the data.train_size / data.test_size stratified
    subsets; a size above what the part holds is an error naming `where` ("the cifar10 {part}
    set")."""
    parts = {"training": (cfg.train_size, train_labels), "test": (cfg.test_size, test_labels)}
    chosen = []
    for (part, (size, labels)), key in zip(parts.items(), ("data.train_size", "data.test_size"),
                                           strict=True):  # fmt: skip
        n = len(labels)
        if size is not None and size > n:
            holder = where.replace("{part}", part)
            raise ConfigError(
                f"{key}={size} is invalid: {holder} has {n} images; set at most {n}, or null "
                "for all"
            )
        chosen.append(np.arange(n) if size is None else stratified_subset(labels, size, seed))
    return chosen[0], chosen[1]


def _folder_splits(cfg: DataConfig, seed: int) -> Splits:
    """data=imagefolder: the scanned folders' three splits (data.train_size / data.test_size
    subsets taken as for the other data sets)."""
    from resnet_train.data.folders import scan

    found = scan(cfg, seed)
    train, valid, test = (found.dataset(s, cfg.decoder) for s in ("train", "valid", "test"))
    where = f"the {{part}} split of {found.root}"
    fit, test_idx = _subsets(cfg, train.targets, test.targets, seed, where)
    if cfg.num_classes is not None and cfg.num_classes != len(found.classes):
        raise DataError(
            f"data.num_classes={cfg.num_classes} but {found.root} has {len(found.classes)} "
            "class folders: point data.root at the model's images, or (to train) set "
            "data.num_classes=null to take the folders'"
        )
    return Splits(
        train, test, train.targets, test.targets, fit, np.arange(len(valid)), test_idx,
        valid_base=valid,
    )  # fmt: skip


def read_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read the data set and carve its parts: `data.train_size` / `data.test_size` subsets
    (exact sizes, stratified), then the stratified `data.valid_ratio` hold-out. Raise a UserError
    naming the key when a part the run needs would be empty or a size is more than the set
    holds."""
    if cfg.name == "imagefolder":
        return _folder_splits(cfg, seed)
    train_base, train_labels, test_base, test_labels = _read_sets(cfg, seed)
    if len(train_labels) and (
        train_labels.max() >= cfg.num_classes
        or (len(test_labels) and test_labels.max() >= cfg.num_classes)
    ):
        top = max(train_labels.max(), test_labels.max() if len(test_labels) else 0)
        raise DataError(f"data.num_classes={cfg.num_classes} but the labels go up to {top}")
    if cfg.name == "synthetic":  # made at data.train_size / data.test_size already
        train_idx, test_idx = np.arange(len(train_labels)), np.arange(len(test_labels))
    else:
        where = f"the {cfg.name} {{part}} set"
        train_idx, test_idx = _subsets(cfg, train_labels, test_labels, seed, where)
    fit_part, valid_part = stratified_split(train_labels[train_idx], cfg.valid_ratio, seed)
    n = len(train_idx)
    if len(fit_part) == 0:
        raise ConfigError(
            f"data.valid_ratio={cfg.valid_ratio} is invalid: it leaves 0 of the {n} training "
            "images to train on; lower data.valid_ratio"
            + (" or raise data.train_size" if cfg.train_size is not None else "")
        )
    if cfg.valid_ratio > 0 and len(valid_part) == 0:
        raise ConfigError(
            f"data.valid_ratio={cfg.valid_ratio} is invalid: it holds out 0 of the {n} training "
            "images for validation; raise it"
            + (", raise data.train_size" if cfg.train_size is not None else "")
            + ", or set data.valid_ratio=0 to train without a validation set"
        )
    if len(test_idx) == 0:
        raise DataError(f"the {cfg.name} test set is empty: there is nothing to evaluate on")
    return Splits(
        train_base, test_base, train_labels, test_labels,
        train_idx[fit_part], train_idx[valid_part], test_idx,
    )  # fmt: skip


def check_data(cfg: DataConfig) -> None:
    """Make sure the data set's files are there (downloading what may be downloaded) before a
    run directory is made; raise DataError naming what is missing."""
    if cfg.name in ("cifar10", "cifar100"):
        cifar_files(cfg.name, cfg.root, train=True, download=cfg.download)
        cifar_files(cfg.name, cfg.root, train=False, download=False)
    elif cfg.name == "imagenet":
        _check_image_folders(Path(cfg.root).expanduser())
    elif cfg.name == "imagefolder":
        from resnet_train.data.folders import scan

        scan(cfg, 0)


def _check_image_folders(root: Path) -> None:
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"{root / split} is missing: data=imagenet reads class folders under "
                f"{root}/train and {root}/val; set data.root to the folder that holds them"
            )


def worker_count(cfg: DataConfig) -> int:
    """data.num_workers, or with null the CPUs this process may use, at most 16."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, 16)


def _read_image_folders(
    root_name: str, decoder: str, num_classes: int
) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    from torchvision.datasets import ImageFolder

    root = Path(root_name).expanduser()
    _check_image_folders(root)
    sets = []
    for split in ("train", "val"):
        folder = root / split
        try:
            readers = {"torchvision": read_image, "pil": read_pil_image}
            loader = (read_file_bytes if decoder == "gpu" else
                      functools.partial(readers[decoder], remedy=REMOVE))  # fmt: skip
            sets.append(ImageFolder(str(folder), loader=loader))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{folder} holds no readable class folders of images ({e})") from None
    train, val = sets
    if train.classes != val.classes:
        raise DataError(
            f"{root}/train and {root}/val have different class folders "
            f"({len(train.classes)} and {len(val.classes)}); they must match"
        )
    if len(train.classes) != num_classes:
        raise DataError(
            f"data.num_classes={num_classes} but {root}/train has {len(train.classes)} class "
            f"folders; set data.num_classes={len(train.classes)}"
        )
    return train, np.asarray(train.targets), val, np.asarray(val.targets)


def _init_worker(worker_id: int) -> None:
    # Each worker's torch seed is base_seed + worker_id (set by the DataLoader from its
    # generator); numpy and random follow it, for any transform that draws from them. The
    # training images themselves are seeded per sample (EpochSampler).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # A stop signal sent to the whole process group (SLURM's preemption, `kill -- -PGID`, Ctrl-C
    # in a terminal) reaches the workers too; the main process saves a checkpoint on it and
    # then shuts them down, so they must not die of it meanwhile.
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def close_loaders(loaders: Loaders | None) -> None:
    """End the data workers of the loaders that keep theirs between epochs (persistent_workers):
    at once, when a run ends or stops, rather than whenever the garbage collector finds them (a
    program that trains several runs in one process, a sweep's jobs, would otherwise carry their
    idle workers along and wait seconds for each when they are collected)."""
    if loaders is None:
        return
    for loader in (loaders.train, loaders.valid, loaders.test):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


@functools.cache
def _register_exit_handler() -> None:
    """Once per process, the first time a loader with workers is built."""
    atexit.register(_stop_workers_at_exit)


def _stop_workers_at_exit() -> None:
    """Data workers ignore SIGTERM (see _init_worker), so the SIGTERM that multiprocessing sends
    its daemonic children when the interpreter exits (after a crash or a Ctrl-C with a DataLoader
    still open) would leave the exit waiting for them forever. They hold nothing to save: end
    them with SIGKILL first (this runs before multiprocessing's own exit handler)."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and hasattr(signal, "SIGCHLD"):  # torch's handler would report them as failed
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


def _loader(
    dataset: Dataset,
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    train: bool,
    reused: bool,
    rank: int = 0,
    world: int = 1,
    weights: torch.Tensor | None = None,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    if worker_count(cfg) > 0:
        _register_exit_handler()
    if train:
        sampler: Any = EpochSampler(
            len(dataset), seed, rank=rank, world=world, batch_size=cfg.batch_size, weights=weights
        )
    else:
        sampler = ShardSampler(len(dataset), rank, world) if world > 1 else None
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=collate_files if isinstance(dataset, FileBytesSubset) else None,
        sampler=sampler,
        num_workers=worker_count(cfg),
        pin_memory=device.type == "cuda",
        persistent_workers=reused and worker_count(cfg) > 0,  # the test set is read once
        worker_init_fn=_init_worker,
        generator=generator,
    )


def _tensor_part(
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    base: ArrayImages,
    idx: np.ndarray,
    train: bool,
    channels_last: bool,
    rank: int = 0,
    world: int = 1,
    weights: torch.Tensor | None = None,
) -> TensorLoader:
    images = base.images[torch.from_numpy(idx)].contiguous().to(device)
    labels = torch.from_numpy(np.asarray(base.targets)[idx]).long().to(device)
    return TensorLoader(images, labels, cfg.batch_size, seed, train, cfg.augment,
                        list(cfg.mean), list(cfg.std), channels_last, rank, world,
                        weights)  # fmt: skip


def _torch_part(
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    base: Any,
    idx: np.ndarray,
    transform: Any,
    train: bool,
    reused: bool,
    rank: int = 0,
    world: int = 1,
    weights: torch.Tensor | None = None,
) -> Any:
    if cfg.decoder == "gpu" and cfg.name == "imagenet":
        files = FileBytesSubset(base, idx)
        return DeviceDecodeLoader(
            _loader(files, cfg, seed, device, train, reused, rank, world, weights),
            transform,
            device,
        )
    subset = TransformedSubset(base, idx, transform)
    return _loader(subset, cfg, seed, device, train, reused, rank, world, weights)


def balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """data.balance=sampler: each image's chance of being drawn, 1 / its class's count, so that
    every class is drawn equally often."""
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels]).double()


def build_loaders(
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    channels_last: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Loaders:
    """Train, validation and test loaders; under DDP (world > 1) each yields only this process's
    share: the training epoch sharded and padded to equal length, the evaluation sets split
    without padding (their figures are summed over the processes)."""
    sp = read_splits(cfg, seed)
    if cfg.name == "imagefolder":
        from resnet_train.data.folders import log_folders

        log_folders(cfg, seed)
    train_base, test_base = sp.train_base, sp.test_base
    fit_idx, valid_idx, test_idx = sp.fit, sp.valid, sp.test
    weights = balanced_weights(sp.train_labels[fit_idx]) if cfg.balance == "sampler" else None

    if cfg.loader == "tensor":

        def part(base: Any, idx: np.ndarray, train: bool, reused: bool) -> Any:
            return _tensor_part(cfg, seed, device, base, idx, train, channels_last, rank, world,
                                weights if train else None)  # fmt: skip
    else:
        transforms = {train: build_transform(cfg, train=train) for train in (True, False)}

        def part(base: Any, idx: np.ndarray, train: bool, reused: bool) -> Any:
            return _torch_part(cfg, seed, device, base, idx, transforms[train], train, reused,
                               rank, world, weights if train else None)  # fmt: skip

    train = part(train_base, fit_idx, True, True)
    valid = part(sp.valid_set, valid_idx, False, True) if len(valid_idx) else None
    test = part(test_base, test_idx, False, False)
    return Loaders(train=train, valid=valid, test=test, num_classes=cfg.num_classes,
                   train_counts=sp.fit_counts(cfg.num_classes))  # fmt: skip


def split_indices(sp: Splits, split: str, cfg: DataConfig) -> tuple[Any, np.ndarray]:
    """(the base data set, the indices) of one part of the data: "train" (the images a run
    trains on), "valid" or "test"; a UserError when the part is empty."""
    if split == "valid" and len(sp.valid) == 0:
        raise ConfigError(
            f"eval.split=valid is invalid: data.valid_ratio={cfg.valid_ratio} holds out no "
            "validation images; use train or test, or set data.valid_ratio > 0"
        )
    return {
        "train": (sp.train_base, sp.fit),
        "valid": (sp.valid_set, sp.valid),
        "test": (sp.test_base, sp.test),
    }[split]


def build_eval_loader(
    cfg: DataConfig,
    seed: int,
    device: torch.device,
    split: str,
    channels_last: bool = False,
    sample: int | None = None,
) -> Any:
    """A loader over one part of the data ("train", "valid", "test") with the evaluation
    transform (no augmentation), in order, of the kind build_loaders makes for the run (so that
    it yields the same batches as the run's own evaluation); with `sample`, only that many of
    the part's images, drawn at random with the seed (kept in their order)."""
    sp = read_splits(cfg, seed)
    base, idx = split_indices(sp, split, cfg)
    if sample is not None and sample < len(idx):
        idx = idx[np.sort(np.random.default_rng(seed).choice(len(idx), sample, replace=False))]
    if cfg.loader == "tensor":
        return _tensor_part(cfg, seed, device, base, idx, False, channels_last)
    transform = build_transform(cfg, train=False)
    return _torch_part(cfg, seed, device, base, idx, transform, False, False)


def data_fingerprint(cfg: DataConfig, seed: int) -> dict[str, Any] | None:
    """data=imagefolder: the fingerprint of its files that checkpoints keep (None for the data
    sets whose files do not change)."""
    if cfg.name != "imagefolder":
        return None
    from resnet_train.data.folders import fingerprint

    return fingerprint(cfg, seed)


def class_names(cfg: DataConfig, seed: int = 0) -> list[str]:
    """The data set's class names, in label order: CIFAR's meta file, ImageNet's class folders,
    class0, class1, ... where the data set names none."""
    if cfg.name in ("cifar10", "cifar100"):
        from resnet_train.data.cifar import read_class_names

        names = read_class_names(cfg.name, cfg.root)
        if names is not None and len(names) == cfg.num_classes:
            return names
    elif cfg.name == "imagenet":
        base = _read_sets(cfg, 0)[0]
        return list(base.classes)
    elif cfg.name == "imagefolder":
        from resnet_train.data.folders import scan

        return list(scan(cfg, seed).classes)
    return [f"class{i}" for i in range(cfg.num_classes)]
