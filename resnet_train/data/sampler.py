"""The training order as a pure function of (seed, epoch), so a run can stop anywhere and resume.

`EpochSampler` yields `(index, sample_seed)` pairs: the permutation of an epoch and each image's
augmentation seed both come from a generator seeded with (seed, epoch). The data set draws its
random crops and flips from the image's own seed (`SeededSubset` in loaders.py), so the images of
a batch do not depend on which worker made them, how many workers there are, or where the epoch
was entered: resuming at batch k of epoch e gives the batches the uninterrupted run saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_weighted(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An epoch of len(weights) image indices drawn with replacement, i with probability
    weights[i] / sum (data.balance=sampler: every class equally often on average)."""
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator)


def shard(values: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of an epoch under DDP: the positions rank, rank + world, ... of
    `values` padded by wrapping around to a multiple of world (as DistributedSampler pads), so
    that every process runs the same number of steps."""
    if world == 1:
        return values
    total = math.ceil(len(values) / world) * world
    padded = torch.cat((values, values[: total - len(values)])) if total > len(values) else values
    return padded[rank::world]


def epoch_length(shard_size: int, batch_size: int | None) -> int:
    """How many of a process's `shard_size` images an epoch trains on: all, except that a last
    batch of a single image is left out (BatchNorm cannot normalise one image whose feature map
    has shrunk to 1x1, as ResNet-18's does on 32 px images). The order is shuffled every epoch, so
    a different image is left out each time."""
    if batch_size and shard_size > 1 and shard_size % batch_size == 1:
        return shard_size - 1
    return shard_size


class EpochSampler(Sampler):
    """(index, augmentation seed) pairs of an epoch, from its start-th on; under DDP only this
    process's shard (`rank` of `world`), with each image keeping the seed it has without DDP."""

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        batch_size: int | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """`weights` (one per image): each epoch draws `size` images with replacement, image i
        with probability weights[i] / sum (data.balance=sampler) instead of a permutation."""
        self.size = size
        self.weights = weights
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world = rank, world
        self.shard_size = epoch_length(math.ceil(size / world), batch_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its `start`-th sample (of this process's
        shard) on."""
        if not 0 <= start <= self.shard_size:
            raise ValueError(f"start={start} is outside an epoch of {self.shard_size} samples")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, augmentation seeds) of this process's whole epoch."""
        g = epoch_generator(self.seed, epoch)
        if self.weights is not None:
            indices = draw_weighted(self.weights, g)
        elif self.shuffle:
            indices = torch.randperm(self.size, generator=g)
        else:
            indices = torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        return shard(indices, self.rank, self.world), shard(seeds, self.rank, self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.order(self.epoch)
        part = slice(self.start, self.shard_size)
        yield from zip(indices[part].tolist(), seeds[part].tolist(), strict=True)

    def __len__(self) -> int:
        return self.shard_size - self.start


class ShardSampler(Sampler):
    """Evaluation under DDP: positions rank, rank + world, ... in order, unpadded, so that the
    summed figures count every image exactly once."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))
