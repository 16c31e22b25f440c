"""Shared fixtures: small data sets in the real on-disk formats, config composition, the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from resnet_train.config import register_configs
from resnet_train.data.cifar import LAYOUTS
from resnet_train.data.shapes import SHAPES, make_shape_folders, shape_image  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

register_configs()

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # Test processes side by side share the cores: each gets its share of threads (OpenMP
    # threads that outnumber the cores spin against each other), and so do the runs it starts.
    import torch

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ["OMP_NUM_THREADS"] = threads
    torch.set_num_threads(int(threads))


# Test processes side by side: two on this project's 2-core machine. Much of a test's time is
# Python's (composing configs, starting processes) and runs on one core; two processes keep
# both busy (the suite took 699 s in one process, about 450 s in two). `pytest -n 0` runs it in
# one; without pytest-xdist installed (a GPU box's bare environment) it runs in one as well.
MAX_TEST_PROCESSES = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    option = config.option
    if getattr(option, "numprocesses", 0) is None and not os.environ.get("PYTEST_XDIST_WORKER"):
        gpu = "cuda" in (option.markexpr or "")  # the CUDA tests share one GPU: one at a time
        if not (gpu or option.collectonly or config.getoption("usepdb", False)):
            option.numprocesses = max(1, min(os.cpu_count() or 1, MAX_TEST_PROCESSES))
            if option.dist == "no":
                option.dist = "worksteal"  # long tests and short ones: idle workers take work


def _stop_pytest(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


# A SIGTERM sent to pytest stops it (with its summary), also while a test trains in-process: the
# trainer saves, then hands the signal on to this handler.
signal.signal(signal.SIGTERM, _stop_pytest)


def compose_config(*overrides: str) -> DictConfig:
    """The config the CLI would compose for these overrides."""
    with initialize_config_module("resnet_train.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_hydra(*overrides: str) -> DictConfig:
    """The config the CLI would compose, with its hydra node (run and sweep directories)."""
    with initialize_config_module("resnet_train.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def run_dir_name(*overrides: str) -> str:
    """The name of the run directory the CLI gives these overrides (and a sweep's job with the
    same config: a sweep's job folder is named as its single run would be)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_hydra(*overrides)
    HydraConfig.instance().set_config(cfg)
    return Path(str(cfg.hydra.run.dir)).name


def run_cli_process(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m resnet_train ARGS` in cwd in a process of its own, as a user would from a
    shell: for what only a process shows (its imports, signals, a crash, torchrun)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "resnet_train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fresh_process_state() -> None:
    """Forget what an earlier command left in this process that a new process would not have:
    Hydra's singletons, resnet-train's per-process caches and once-only warnings."""
    from hydra.core.global_hydra import GlobalHydra

    from resnet_train.engine import faults, resume

    GlobalHydra.instance().clear()
    faults.reset()
    resume._warned.clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("resnet_train") and module is not None:
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
                    value.cache_clear()


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`resnet-train ARGS` run in cwd as from a shell, but inside this process (a new Python
    process costs 3-5 s of imports): its exit status, stdout and stderr as a process would give
    them. `timeout` is for run_cli_process's signature: an in-process run cannot be cut short."""
    from resnet_train import cli

    return run_in_process("resnet-train", cli.main, args, cwd)


def run_program(program: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python PROGRAM ARGS` (a script's path, or the name of a module with a main()) in cwd,
    inside this process like run_cli."""
    import importlib
    import runpy

    if program.endswith(".py"):
        path = str(Path(cwd, program))
        return run_in_process(path, lambda: runpy.run_path(path, run_name="__main__"), args, cwd)
    module = importlib.import_module(program)  # its console script's entry point: main()
    return run_in_process(program, module.main, args, cwd)


def run_in_process(argv0: str, entry, args, cwd: Path) -> subprocess.CompletedProcess:
    """Call entry() with sys.argv = [argv0, *args] in cwd, as a fresh process would run it: its
    exit status (SystemExit), stdout and stderr. The working directory, arguments, environment,
    logging, warnings, signal handlers and torch's global switches are put back afterwards."""
    import logging

    import torch

    root = logging.getLogger()
    saved = (
        os.getcwd(),
        sys.argv,
        dict(os.environ),
        list(root.handlers),
        root.level,
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
    )
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    _fresh_process_state()
    os.environ["HYDRA_FULL_ERROR"] = "0"
    os.chdir(cwd)
    sys.argv = [argv0, *args]
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            warnings.resetwarnings()
            warnings.simplefilter("default")
            warnings.showwarning = _print_warning
            try:
                entry()
            except SystemExit as e:
                code = e.code
    finally:
        cwd_before, sys.argv, environ, handlers, level, deterministic, threads, handlers_by = saved
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        for signum, handler in handlers_by.items():
            signal.signal(signum, handler)
        _fresh_process_state()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints it and exits 1
        err.write(f"{code}\n")
        code = 1
    return subprocess.CompletedProcess([argv0, *args], code, out.getvalue(), err.getvalue())


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """One batch file as the official release stores it: a pickled dict whose 'data' rows are
    3072 bytes (R, G, B planes of 32x32), written with protocol 2 like the Python 2 originals."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    entry = {
        "batch_label": path.name,
        label_key: [int(v) for v in labels],
        "data": rows,
        "filenames": [f"img_{i}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_cifar(root: Path, name: str = "cifar10", per_file: int = 40, seed: int = 0) -> dict:
    """Write a small CIFAR-10 or CIFAR-100 in torchvision's layout; return what was written."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    folder, train_files, test_files, label_key = LAYOUTS[name]
    (root / folder).mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {"train": [], "test": []}
    for split, files in (("train", train_files), ("test", test_files)):
        for file in files:
            images = rng.integers(0, 256, size=(per_file, 32, 32, 3), dtype=np.uint8)
            labels = np.arange(per_file) % num_classes
            rng.shuffle(labels)
            write_cifar_batch(root / folder / file, images, labels, label_key)
            written[split].append((images, labels))
    meta_name = "batches.meta" if name == "cifar10" else "meta"
    with open(root / folder / meta_name, "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(num_classes)]}, f, protocol=2)
    return {
        split: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        for split, parts in written.items()
    }


EXIF_ORIENTATION = 0x0112  # the EXIF tag


def make_image_folders(
    root: Path,
    classes: int = 3,
    per_class: int = 6,
    size: int = 40,
    jpeg_every: int = 0,
    jpeg_subsampling: int = 2,
    exif_orientations: bool = False,
) -> Path:
    """train/ and val/ folders of PNGs (every jpeg_every-th image a JPEG, its chroma subsampled
    as PIL's `subsampling` says: 2 is 4:2:0, 0 is 4:4:4; with exif_orientations, the JPEGs'
    EXIF orientation tags go round 1 to 8), one folder per class (the ImageNet layout)."""
    from PIL import Image

    jpegs = 0

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size + 8 * i, 3), dtype=np.uint8)
                jpeg = jpeg_every and i % jpeg_every == 0
                if jpeg:
                    exif = Image.Exif()
                    if exif_orientations:
                        exif[EXIF_ORIENTATION] = jpegs % 8 + 1
                    jpegs += 1
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", subsampling=jpeg_subsampling,
                                                 exif=exif.tobytes())  # fmt: skip
                else:
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar10")
    return root, make_cifar(root, "cifar10")


# The shortest real run: a CIFAR ResNet-20 on 512 synthetic images.
SMOKE = ["model=resnet20", "data=synthetic", "trainer.epochs=1", "trainer.device=cpu"]
