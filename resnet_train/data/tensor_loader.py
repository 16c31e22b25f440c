"""The tensor data path (`data.loader=tensor`): a whole in-memory data set as one uint8 tensor on
the training device, augmented a batch at a time with tensor ops.

Random crop after zero padding, horizontal flip and Cutout are drawn per image, as the per-image
transforms of the DataLoader path draw them, but for a whole batch at once: no per-image Python,
no worker processes, no host-to-device copy per step. The order and every image's crop offsets,
flip and Cutout square come from a generator seeded with (seed, epoch), so an epoch entered at
any batch (a resumed run) gives the batches the uninterrupted run saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from resnet_train.config import AugmentConfig
from resnet_train.data.sampler import draw_weighted, epoch_generator, epoch_length, shard


@dataclass
class EpochDraws:
    """One epoch's random choices, one entry per position in the epoch."""

    order: torch.Tensor  # image indices
    dy: torch.Tensor  # crop offsets in the padded image
    dx: torch.Tensor
    flip: torch.Tensor  # bool
    cy: torch.Tensor  # Cutout centres
    cx: torch.Tensor


def draw_epoch(
    n: int,
    seed: int,
    epoch: int,
    height: int,
    width: int,
    augment: AugmentConfig,
    shuffle: bool,
    weights: torch.Tensor | None = None,
) -> EpochDraws:
    g = epoch_generator(seed, epoch)
    if weights is not None:  # data.balance=sampler
        order = draw_weighted(weights, g)
    else:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    pad = augment.padding if augment.crop == "pad" else 0
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cy = torch.randint(0, height, (n,), generator=g)
    cx = torch.randint(0, width, (n,), generator=g)
    return EpochDraws(order, dy, dx, flip, cy, cx)


def crop_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Per-image crops of the zero-padded batch at offsets (dy, dx), then flips where `flip`:
    (B, C, H, W) uint8 -> (B, C, H, W) uint8."""
    b, _, h, w = images.shape
    if pad:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    # Every (h, w) window of the padded images and of their mirror images as a view, then one
    # window per image: no per-pixel index grids (15 times slower on the CPU). The mirror of the
    # window at column dx is the window at column 2p - dx of the mirrored image.
    both = torch.stack((images, images.flip(3)), 1)  # (B, 2, C, H + 2p, W + 2p)
    windows = both.unfold(3, h, 1).unfold(4, w, 1)  # (B, 2, C, 2p+1, 2p+1, H, W)
    dx = torch.where(flip, 2 * pad - dx, dx)
    return windows[torch.arange(b, device=images.device), flip.long(), :, dy, dx]


def cutout_mask(
    cy: torch.Tensor, cx: torch.Tensor, size: int, height: int, width: int
) -> torch.Tensor:
    """(B, 1, H, W) bool: True outside each image's size x size square centred at (cy, cx),
    clipped at the border (Cutout as DeVries & Taylor 2017 and data.transforms.Cutout)."""
    rows = torch.arange(height, device=cy.device)[None, :, None]
    cols = torch.arange(width, device=cy.device)[None, None, :]
    top, left = (cy - size // 2)[:, None, None], (cx - size // 2)[:, None, None]
    inside_r = (rows >= top) & (rows < top + size)
    inside_c = (cols >= left) & (cols < left + size)
    return ~(inside_r & inside_c)[:, None]


class _Count:
    """Stands in for a DataLoader's dataset where only its length is read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class TensorLoader:
    """Iterates (normalised float images, int64 labels) batches, like a DataLoader."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        train: bool,
        augment: AugmentConfig,
        mean: list[float],
        std: list[float],
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Training under DDP (world > 1) yields this process's shard of each epoch (positions
        rank, rank + world, ... padded to equal length); evaluation sets come already split."""
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) int64
        self.batch_size, self.seed, self.train, self.augment = batch_size, seed, train, augment
        device = images.device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        self.channels_last = channels_last
        self.rank, self.world = rank, world
        self.weights = weights  # data.balance=sampler: drawn with replacement by these
        self.dataset = _Count(len(labels))
        if not train and world > 1:  # evaluation: this process's unpadded share, in order
            self.images, self.labels = images[rank::world], labels[rank::world]
        self.shard_size = (
            epoch_length(math.ceil(len(labels) / world), batch_size) if train else len(self.labels)
        )
        self.sampler = self  # set_epoch() is the sampler's interface in the DataLoader path
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.shard_size:
            raise ValueError(f"start={start} is outside an epoch of {self.shard_size} images")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil((self.shard_size - self.start) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, (h, w) = len(self.labels), self.images.shape[-2:]
        aug = self.augment
        if not self.train:
            for begin in range(0, n, self.batch_size):
                batch = self.images[begin : begin + self.batch_size]
                yield self._normalise(batch), self.labels[begin : begin + self.batch_size]
            return
        draws = draw_epoch(n, self.seed, self.epoch, h, w, aug, shuffle=True, weights=self.weights)
        device = self.images.device
        on_device = [
            shard(t, self.rank, self.world).to(device, non_blocking=True)
            for t in (draws.order, draws.dy, draws.dx, draws.flip, draws.cy, draws.cx)
        ]
        order, dy, dx, flip, cy, cx = on_device
        if not aug.hflip:
            flip = torch.zeros_like(flip)
        pad = aug.padding if aug.crop == "pad" else 0
        for begin in range(self.start, self.shard_size, self.batch_size):
            part = slice(begin, min(begin + self.batch_size, self.shard_size))
            index = order[part]
            # index_select: ~100 times faster than images[index] for uint8 rows on the CPU.
            batch = torch.index_select(self.images, 0, index)
            batch = crop_flip(batch, dy[part], dx[part], flip[part], pad)
            batch = self._normalise(batch)
            if aug.cutout:
                batch = batch * cutout_mask(cy[part], cx[part], aug.cutout, h, w)
            yield batch, torch.index_select(self.labels, 0, index)

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        return ((batch.float() - self.mean) * self.inv_std).contiguous(memory_format=memory)
