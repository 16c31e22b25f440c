"""Decoding image files on the training device (`data.decoder=gpu`).

The DataLoader workers only read files; the main process decodes each batch at once on the
training device (nvJPEG through `torchvision.io.decode_jpeg(device="cuda")`) and runs the same
per-image transforms there, each image seeded as on the worker path, so a run gives the batches
the CPU decoders give (up to the decoders' rounding). Files that are not JPEG are decoded on the
CPU and moved. nvJPEG does not apply a JPEG's EXIF orientation: the workers read it from the
file's segments (jpeg_orientation, which the CPU decoder uses too), and the decoded image is
turned here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

JPEG_MAGIC = b"\xff\xd8\xff"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with `seed`, and restore its state after. The CPU
    generator alone: torch.manual_seed would also seed every CUDA device, and costs ~100 times
    more (~190 us against ~2 us per image, measured on this project's CPU)."""
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


def read_file_bytes(path: str) -> torch.Tensor:
    """An ImageFolder loader that leaves the decoding to the main process: the file as uint8."""
    from torchvision.io import read_file

    return read_file(path)


def collate_files(
    batch: list[tuple[torch.Tensor, int, int, int]],
) -> tuple[torch.Tensor, ...]:
    """Files of different lengths, as one byte tensor and their lengths (one shared-memory block
    to send from a worker, not one per file), labels, sample seeds, the JPEGs' EXIF
    orientations (1 for upright or not a JPEG) and the files' places in the data set."""
    files, labels, seeds, places = zip(*batch, strict=True)
    lengths = torch.tensor([len(f) for f in files])
    orientations = torch.tensor([jpeg_orientation(f) for f in files])
    return (torch.cat(files), lengths, torch.tensor(labels), torch.tensor(seeds), orientations,
            torch.tensor(places))  # fmt: skip


EXIF_ORIENTATION_TAG = 0x0112


def jpeg_segments(data: Any) -> Iterator[tuple[int, int, int]]:
    """(marker, start, length) of each segment of a JPEG's bytes (bytes or a memoryview) before
    its image data, the SOS segment (0xDA) last; nothing past a byte that is not a marker."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        yield marker, i, length
        if marker in (0xD9, 0xDA):  # the end, or the image data
            return
        i += 2 + length


def jpeg_orientation(data: torch.Tensor) -> int:
    """The EXIF orientation (1 to 8) of a JPEG file's bytes: 1 where it has none or the file is
    not a JPEG. Walks the segments before the image data (an XMP or ICC segment may come
    first, of any length), not the image."""
    head = memoryview(data.numpy())  # (no copy)
    if head[:2] != b"\xff\xd8":
        return 1
    for marker, i, length in jpeg_segments(head):
        if marker == 0xE1 and head[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(bytes(head[i + 10 : i + 2 + length]))
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order) if ifd + 2 <= len(tiff) else 0
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == EXIF_ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # (a SHORT)
            return value if 1 <= value <= 8 else 1
    return 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image as it is seen upright under its EXIF `orientation` (what PIL's
    ImageOps.exif_transpose and torchvision's apply_exif_orientation do)."""
    if orientation in (5, 6, 7, 8):  # stored a quarter turn off: rows and columns swap
        image = image.transpose(-2, -1)
        # 5: transposed; 6: turned a quarter clockwise; 7: transverse; 8: counter-clockwise
        flips = {5: (), 6: (-1,), 7: (-2, -1), 8: (-2,)}[orientation]
    else:  # 2: mirrored; 3: half a turn; 4: flipped upside down
        flips = {1: (), 2: (-1,), 3: (-2, -1), 4: (-2,)}.get(orientation, ())
    return image.flip(flips) if flips else image


def decode_batch(
    files: list[torch.Tensor], device: torch.device, orientations: list[int]
) -> list[torch.Tensor]:
    """uint8 CHW RGB images on `device`, upright: JPEGs decoded together there (and turned by
    their `orientations`, from jpeg_orientation), the rest on the CPU."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpeg = [i for i, f in enumerate(files) if bytes(f[:3].tolist()) == JPEG_MAGIC]
    images: list[Any] = [None] * len(files)
    if jpeg:
        decoded = decode_jpeg([files[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded, strict=True):
            images[i] = orient(image, orientations[i])
    for i, image in enumerate(images):
        if image is None:
            images[i] = decode_image(
                files[i], mode=ImageReadMode.RGB, apply_exif_orientation=True
            ).to(device)
    return images


class DeviceDecodeLoader:
    """Wraps a DataLoader over FileBytesSubset: yields (normalised images, labels) on `device`."""

    def __init__(
        self,
        loader: DataLoader,
        transform: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
    ) -> None:
        self.loader = loader
        self.transform = transform
        self.device = device

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for data, lengths, labels, seeds, orientations, places in self.loader:
            files = list(data.split(lengths.tolist()))
            try:
                images = decode_batch(files, self.device, orientations.tolist())
            except RuntimeError as e:
                raise self._unreadable(files, places.tolist(), e) from None
            out = []
            for image, seed in zip(images, seeds.tolist(), strict=True):
                if seed < 0:  # evaluation: no randomness
                    out.append(self.transform(image))
                else:
                    with seeded(seed):
                        out.append(self.transform(image))
            yield torch.stack(out), labels.to(self.device, non_blocking=True)

    def _unreadable(self, files: list[torch.Tensor], places: list[int], error: Exception) -> Any:
        """The DataError of a batch that did not decode, naming the first file of it that the
        CPU decoders cannot read either."""
        from resnet_train.data.folders import REMOVE, read_image
        from resnet_train.errors import DataError

        paths = [self.dataset.path(place) for place in places]
        for path in paths:
            try:
                read_image(path, remedy=REMOVE)
            except DataError as e:
                return e
        return DataError(f"a batch of {', '.join(paths)} did not decode on {self.device} "
                         f"({type(error).__name__}: {error})")  # fmt: skip
