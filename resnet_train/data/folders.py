"""data=imagefolder: one's own images, one folder per class.

Two layouts are read. One folder of class folders (`DIR/<class>/<image>`) is split per class into
training, validation (`data.valid_ratio`) and test (`data.test_ratio`) images. Or `DIR/train/`,
with `DIR/val/` (or `valid/`) and `DIR/test/` where the user has made them; a split without its
folder is carved from `train/` by its ratio. Classes are the class folders' names, in sorted
order (the labels 0, 1, ...), and every split must hold every class.

Files whose names do not end in an image extension are ignored (notes, .DS_Store). Every image's
header is read once when the folders are scanned, and a JPEG or PNG without its end marker (cut
short) is decoded, so a file that is not an image is found before training: an error that names
it, or, with `data.skip_bad=true`, left out and listed in the log. With skip_bad, each image is
also decoded once, so that a file with a good header and a broken body is left out too.
Grayscale, palette and RGBA images are converted to RGB when read.

The test split of one folder does not depend on the run's seed: every run on the same folder is
tested on the same images. The validation split does, as CIFAR's does.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from resnet_train.config import TRAIN_FOLDER, VALID_FOLDERS
from resnet_train.errors import ConfigError, DataError

log = logging.getLogger("resnet_train")

# The file names read as images (torchvision's ImageFolder's list); case does not matter.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The names of the split folders of the second layout.
TEST_FOLDER = "test"
SPLIT_FOLDERS = (TRAIN_FOLDER, *VALID_FOLDERS, TEST_FOLDER)
RESERVED = (
    f" ({', '.join(f + '/' for f in SPLIT_FOLDERS)} name the splits: a class of one of these "
    "names needs its folder renamed, e.g. train_/)"
)
# The seed of the test split carved from one folder: the same for every run.
TEST_SPLIT_SEED = 0


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


# What an unreadable image's error advises: data=imagefolder checks its files before training
# (data.skip_bad leaves the bad ones out); data=imagenet reads its files as it trains.
SKIP_BAD = "remove it, or set data.skip_bad=true to leave such files out"
REMOVE = "remove it (data=imagenet reads its files as it trains; data=imagefolder checks them)"


def read_image(path: str, remedy: str = SKIP_BAD) -> torch.Tensor:
    """An image file as a uint8 RGB CHW tensor, turned upright as its EXIF orientation says (a
    phone's photo is stored sideways with a tag that every viewer follows), by torchvision.io
    (libjpeg-turbo, libpng: about 1.8 times the images/s of PIL for 500x375 JPEGs with the
    ImageNet training transforms on this project's CPU), else PIL; DataError naming the file
    and the `remedy` when neither can read it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    from resnet_train.data.device_decode import JPEG_MAGIC, jpeg_orientation, orient

    try:
        data = read_file(path)
        # A JPEG's orientation read as the device decoder reads it (torchvision's own reading
        # missed an EXIF segment after an XMP one); other formats' by torchvision.
        head = bytes(data[:12].tolist())
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":  # (torchvision leaves its tag unread)
            raise RuntimeError("a WebP: read by PIL")
        jpeg = head[:3] == JPEG_MAGIC
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=not jpeg)
        return orient(image, jpeg_orientation(data)) if jpeg else image
    except RuntimeError:
        pass
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(read_pil_image(path, remedy))


def read_pil_image(path: str, remedy: str = SKIP_BAD) -> Any:
    """data.decoder=pil: an image file as an RGB PIL image, turned upright as its EXIF
    orientation says (as read_image does); DataError naming the file when PIL cannot read it."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as e:
        raise DataError(
            f"{path} is not a readable image ({type(e).__name__}: {e}); {remedy}"
        ) from None


# The end marker each format's last bytes hold (JPEG's EOI, PNG's IEND chunk), looked for in
# the file's last TAIL_BYTES (some cameras write a few bytes after it).
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
TAIL_BYTES = 1024


def check_image(path: Path, decode: bool) -> str | None:
    """Why `path` cannot be used as an image (None when it can): its header is read, and with
    `decode` the whole image. A JPEG or PNG whose end marker is missing (a download or a copy cut
    short) is decoded whole too, to be sure: such a file was met only when a batch held it, by
    then after the run's training, at its test."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (the header is parsed on open)
            if decode or _cut_short(path, image.format):
                image.convert("RGB")
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _cut_short(path: Path, image_format: str | None) -> bool:
    """Whether a JPEG or PNG may be cut short: its end marker is not in its last bytes, and for
    a JPEG (a phone's photo may carry kilobytes to megabytes after its image: a motion photo's
    video) not after the start of its image data either."""
    marker = END_MARKERS.get(image_format or "")
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
        if marker in f.read():
            return False
        if image_format != "JPEG":
            return True
        f.seek(0)
        data = f.read()
    start = _jpeg_image_data(data)
    return start is None or data.rfind(marker) < start


def _jpeg_image_data(data: bytes) -> int | None:
    """Where a JPEG's image data starts (its SOS segment), past the segments before it (whose
    embedded thumbnails hold end markers of their own); None where the segments do not lead
    there."""
    from resnet_train.data.device_decode import jpeg_segments

    return next((i for marker, i, _ in jpeg_segments(data) if marker == 0xDA), None)


def readable_images(
    paths: list[Path], skip_bad: bool, skipped: list[tuple[str, str]], remove: str = "remove it"
) -> list[Path]:
    """The paths whose header reads as an image (with skip_bad, whose whole image decodes); the
    others are a DataError naming the first, or with skip_bad appended to `skipped` with why."""
    good = []
    for path in paths:
        problem = check_image(path, decode=skip_bad)
        if problem is None:
            good.append(path)
        elif skip_bad:
            skipped.append((str(path), problem))
        else:
            raise DataError(
                f"{path} is not a readable image ({problem}); {remove}, or set "
                "data.skip_bad=true to leave such files out"
            )
    return good


class FolderImages(Dataset):
    """Image files and their labels, served as (uint8 RGB CHW tensor, label), decoded by
    torchvision.io (data.decoder=torchvision) or PIL (pil)."""

    def __init__(
        self, files: list[str], labels: np.ndarray, classes: list[str], decoder: str = "torchvision"
    ) -> None:
        self.files = files
        self.targets = labels
        self.classes = classes
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.decoder == "pil":
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(read_pil_image(self.files[i])), int(self.targets[i])
        return read_image(self.files[i]), int(self.targets[i])


@dataclass(frozen=True)
class FolderSplits:
    """The scanned folders: the files of each split with their labels, and what was left out."""

    root: Path
    classes: list[str]
    layout: str  # "one folder" or "split folders"
    train: tuple[list[str], np.ndarray]
    valid: tuple[list[str], np.ndarray]
    test: tuple[list[str], np.ndarray]
    skipped: list[tuple[str, str]]  # (file, why)
    sources: dict[str, str]  # split -> where its images come from (for the log)

    def dataset(self, split: str, decoder: str = "torchvision") -> FolderImages:
        files, labels = getattr(self, split)
        return FolderImages(files, labels, self.classes, decoder)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path, broken: list[Path] | None = None) -> list[Path]:
    """The image files under a folder (a class folder, predict.inputs), at any depth, symbolic
    links followed, hidden folders left out; a folder reached twice (a link back up the tree: a
    loop) and a file reached twice are read once (os.walk would follow a loop to the system's
    depth limit: each image ~40 times, in every split). Image names that are no file (a link
    whose target is gone) are left out, and added to `broken` where given."""
    found, folders, files = [], set(), set()
    for top, dirs, names in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(top)
        if real in folders:
            dirs[:] = []
            continue
        folders.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for path in (Path(top) / name for name in sorted(names)):
            real_file = os.path.realpath(path) if is_image_name(path) else None
            if real_file is not None and real_file not in files:
                files.add(real_file)
                found.append(path)
    if broken is not None:
        broken += sorted(p for p in found if not p.is_file())
    return sorted(p for p in found if p.is_file())


def _scan_split(
    folder: Path, skip_bad: bool, skipped: list[tuple[str, str]], classes: list[str] | None
) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, files, labels) of a folder of class folders; `classes` (those of train/)
    must be exactly its classes."""
    class_dirs = _class_folders(folder)
    names = [p.name for p in class_dirs]
    if not class_dirs:
        loose = [p for p in folder.iterdir() if p.is_file() and is_image_name(p)]
        raise DataError(
            f"{folder} holds no class folders"
            + (f" ({len(loose)} images lie in it directly)" if loose else "")
            + ": data=imagefolder reads DIR/<class>/<image>, or DIR/train/<class>/<image> with "
            "optional val/ and test/; set data.root to such a folder"
            + (RESERVED if loose and folder.name in SPLIT_FOLDERS else "")
        )
    if classes is None and len(class_dirs) < 2:
        raise DataError(
            f"{folder} holds one class folder ({names[0]}): a classifier needs at least 2 "
            "classes, one folder of images each"
        )
    if classes is not None and names != classes:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        what = []
        if missing:
            what.append(f"no folder for class(es) {', '.join(missing[:5])}")
        if extra:
            what.append(f"class folder(s) {', '.join(extra[:5])} that train/ lacks")
        raise DataError(
            f"{folder} has {' and '.join(what)}: every split must hold every class of "
            f"{folder.parent / TRAIN_FOLDER}"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = image_files(class_dir)
        good = readable_images(found, skip_bad, skipped)
        if not good:
            left = f" ({len(found)} unreadable, left out)" if found else ""
            raise DataError(
                f"class folder {class_dir} holds no images{left}: every class needs images "
                f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}); remove the folder or "
                "add images to it"
            )
        files += [str(p) for p in good]
        labels += [label] * len(good)
    return names, files, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class FolderFiles:
    """What the folders hold, before any split is drawn: per split folder (train, val, test, or
    the one folder as "all"), its files and labels."""

    root: Path
    layout: str
    classes: list[str]
    parts: dict[str, tuple[list[str], np.ndarray]]
    skipped: list[tuple[str, str]]


@functools.lru_cache(maxsize=4)
def scan_files(root_name: str, skip_bad: bool) -> FolderFiles:
    """Read data.root's folders and every image's header (with skip_bad, decode every image),
    once per process whatever the seed."""
    if not root_name:
        raise DataError("data.root='' is invalid: give the folder of the images, data.root=DIR")
    root = Path(root_name).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root_name} is not a folder: data=imagefolder reads a folder of class "
            "folders (DIR/<class>/<image>) or DIR/train/<class>/<image>"
        )
    valid_dirs = [root / v for v in VALID_FOLDERS if (root / v).is_dir()]
    if len(valid_dirs) > 1:
        raise DataError(
            f"{root} has both {' and '.join(d.name + '/' for d in valid_dirs)}: keep one "
            "folder of validation images"
        )
    skipped: list[tuple[str, str]] = []
    parts: dict[str, tuple[list[str], np.ndarray]] = {}
    if (root / TRAIN_FOLDER).is_dir():
        layout = "split folders"
        classes, files, labels = _scan_split(root / TRAIN_FOLDER, skip_bad, skipped, None)
        parts["train"] = (files, labels)
        for split, folder in (("valid", valid_dirs[0] if valid_dirs else None),
                              ("test", root / TEST_FOLDER)):  # fmt: skip
            if folder is not None and folder.is_dir():
                _, more, more_labels = _scan_split(folder, skip_bad, skipped, classes)
                parts[split] = (more, more_labels)
    else:
        if valid_dirs or (root / TEST_FOLDER).is_dir():
            raise DataError(
                f"{root} has a val/ or test/ folder but no train/ folder: put the training "
                "images' class folders in train/, or make every folder in it a class folder"
                + RESERVED
            )
        layout = "one folder"
        classes, files, labels = _scan_split(root, skip_bad, skipped, None)
        parts["all"] = (files, labels)
    return FolderFiles(root, layout, classes, parts, skipped)


def held_out_count(n: int, ratio: float) -> int:
    """How many of a class's n images a held-out split takes: ratio * n rounded half up, at least
    one when ratio > 0 (a split must hold every class)."""
    if ratio <= 0:
        return 0
    return max(1, math.floor(ratio * n + 0.5))


def carve(
    labels: np.ndarray,
    ratio: float,
    seed: int,
    classes: list[str],
    what: str,
    key: str,
    of: np.ndarray | None = None,
    earlier: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) positions: per class, held_out_count(n, ratio) images drawn with the seed,
    n the class's count in `of` (the labels before an earlier split took its share: `earlier`,
    its key=value, names it) or here; a DataError naming the class when it has too few images
    to leave one behind."""
    rng = np.random.default_rng(seed)
    base = np.bincount(labels if of is None else of, minlength=len(classes))
    kept, taken = [], []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        k = held_out_count(int(base[c]), ratio)
        if k >= len(idx):
            left = f" left after {earlier} took its share" if earlier else ""
            lower = f"lower {earlier.split('=')[0]} or {key}, " if earlier else ""
            raise DataError(
                f"class {name!r} has {len(idx)} image(s){left} to split, and {key}={ratio} "
                f"takes {k} for the {what} split, leaving none to train on: {lower}add images "
                f"to it, or give the {what} images a folder of their own"
            )
        idx = rng.permutation(idx)
        taken.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(taken))


def _pick(files: list[str], labels: np.ndarray, idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [files[i] for i in idx], labels[idx]


def scan_folders(
    root_name: str, valid_ratio: float, test_ratio: float, seed: int, skip_bad: bool
) -> FolderSplits:
    """The three splits of data.root: its split folders, or what is carved from them per class
    (the test split with a fixed seed, the validation split with the run's)."""
    found = scan_files(root_name, skip_bad)
    root, classes, parts = found.root, found.classes, found.parts
    if found.layout == "split folders":
        train = parts["train"]
        files, labels = train
        sources = {"train": str(root / TRAIN_FOLDER)}
        if "test" in parts:
            test = parts["test"]
            sources["test"] = str(root / TEST_FOLDER)
        else:
            _no_ratio("data.test_ratio", test_ratio, root, found.layout)
            kept, taken = carve(labels, test_ratio, TEST_SPLIT_SEED, classes, "test",
                                "data.test_ratio")  # fmt: skip
            test, train = _pick(files, labels, taken), _pick(files, labels, kept)
            sources["test"] = f"data.test_ratio={test_ratio} of {root / TRAIN_FOLDER}"
        if "valid" in parts:
            valid = parts["valid"]
            sources["valid"] = "its own folder"
        else:
            earlier = None if "test" in parts else tested(test_ratio)
            valid, train = _carve_valid(train, valid_ratio, seed, classes, labels,
                                        earlier)  # fmt: skip
            sources["valid"] = f"data.valid_ratio={valid_ratio} of {root / TRAIN_FOLDER}"
    else:
        files, labels = parts["all"]
        _no_ratio("data.test_ratio", test_ratio, root, found.layout)
        kept, taken = carve(labels, test_ratio, TEST_SPLIT_SEED, classes, "test",
                            "data.test_ratio")  # fmt: skip
        test, rest = _pick(files, labels, taken), _pick(files, labels, kept)
        valid, train = _carve_valid(rest, valid_ratio, seed, classes, labels,
                                    tested(test_ratio))  # fmt: skip
        sources = {
            "train": str(root),
            "valid": f"data.valid_ratio={valid_ratio} of {root}",
            "test": f"data.test_ratio={test_ratio} of {root}",
        }
    return FolderSplits(root, classes, found.layout, train, valid, test, found.skipped, sources)


def _no_ratio(key: str, ratio: float, root: Path, layout: str) -> None:
    if ratio <= 0:
        own = (
            f"{root}/{TEST_FOLDER}/<class>/"
            if layout == "split folders"
            else f"{root}/{TEST_FOLDER}/<class>/ with the training images in "
            f"{root}/{TRAIN_FOLDER}/<class>/"
        )
        raise ConfigError(
            f"{key}={ratio} is invalid: {root} has no {TEST_FOLDER}/ folder, so the test images "
            "are carved from the training images by this ratio; set it in (0, 1) (0.1 is usual), "
            f"or give them a folder of their own, {own}"
        )


def tested(test_ratio: float) -> str | None:
    """The test split's key=value, where it took a share of the images before validation."""
    return f"data.test_ratio={test_ratio}" if test_ratio > 0 else None


def _carve_valid(
    train: tuple[list[str], np.ndarray],
    ratio: float,
    seed: int,
    classes: list[str],
    of: np.ndarray,
    earlier: str | None = None,
) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """The validation split: ratio x each class's count in `of` (all its images, before the
    test split took its share: `earlier`), drawn from `train` with the run's seed."""
    files, labels = train
    if ratio <= 0:
        return ([], np.zeros(0, dtype=np.int64)), train
    kept, taken = carve(labels, ratio, seed, classes, "validation", "data.valid_ratio", of,
                        earlier)  # fmt: skip
    return _pick(files, labels, taken), _pick(files, labels, kept)


def scan(cfg: Any, seed: int) -> FolderSplits:
    """The folders of a data config (data=imagefolder)."""
    return scan_folders(str(cfg.root), float(cfg.valid_ratio), float(cfg.test_ratio), int(seed),
                        bool(cfg.skip_bad))  # fmt: skip


def fingerprint(cfg: Any, seed: int) -> dict[str, Any]:
    """What a checkpoint keeps of the folders it was trained on: the images per split, and a
    sha256 of every file's path (under data.root), label, size and split, so that a resumed run
    sees a changed folder (an image added moves others between the splits)."""
    found = scan(cfg, seed)
    digest = hashlib.sha256()
    images = {}
    for split in ("train", "valid", "test"):
        files, labels = getattr(found, split)
        images[split] = len(files)
        for path, label in sorted(zip(files, labels.tolist(), strict=True)):
            rel = os.path.relpath(path, found.root)
            digest.update(f"{split}\0{rel}\0{label}\0{os.path.getsize(path)}\n".encode())
    return {"images": images, "sha256": digest.hexdigest()}


def check_same_files(saved: dict[str, Any] | None, now: dict[str, Any] | None, path: Any) -> None:
    """Refuse to resume a run whose image folders changed since its checkpoint was written."""
    if saved is None or now is None or saved["sha256"] == now["sha256"]:
        return
    counts = "/".join(str(saved["images"][s]) for s in ("train", "valid", "test"))
    counts_now = "/".join(str(now["images"][s]) for s in ("train", "valid", "test"))
    from resnet_train.errors import CheckpointError

    raise CheckpointError(
        f"{path} was trained on other images: data.root's folders changed since (train/valid/test "
        f"images {counts} then, {counts_now} now), and resuming would move images between the "
        "splits; restore the folder, or start a new run with name=NEW_NAME"
    )


def log_folders(cfg: Any, seed: int) -> None:
    """What the run reads: the classes with their images per split, where each split comes
    from, and the files data.skip_bad left out."""
    found = scan(cfg, seed)
    counts = {s: np.bincount(getattr(found, s)[1], minlength=len(found.classes))
              for s in ("train", "valid", "test")}  # fmt: skip
    log.info("%s (%s): %d classes; images per class (train/valid/test): %s", found.root,
             found.layout, len(found.classes), ", ".join(
                 f"{name} {counts['train'][c]}/{counts['valid'][c]}/{counts['test'][c]}"
                 for c, name in enumerate(found.classes)))  # fmt: skip
    log.info("validation images: %s; test images: %s", found.sources["valid"],
             found.sources["test"])  # fmt: skip
    if found.skipped:
        log.warning("data.skip_bad=true: %d file(s) left out:", len(found.skipped))
        for path, why in found.skipped:
            log.warning("  %s (%s)", path, why)
