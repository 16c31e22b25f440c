"""The training order as a pure function of (seed, epoch), so a run can stop anywhere and resume.

`EpochSampler` yields `(index, sample_seed)` pairs: the permutation of an epoch and each image's
augmentation seed both come from a generator seeded with (seed, epoch). The data set draws its
random crops and flips from the image's own seed (`SeededSubset` in loaders.py), so the images of
a batch do not depend on which worker made them, how many workers there are, or where the epoch
was entered: resuming at batch k of epoch e gives the batches the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochSampler(Sampler):
    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch `epoch` from its `start`-th sample on."""
        if not 0 <= start <= self.size:
            raise ValueError(f"start={start} is outside an epoch of {self.size} samples")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, augmentation seeds) of a whole epoch."""
        g = epoch_generator(self.seed, epoch)
        if self.shuffle:
            indices = torch.randperm(self.size, generator=g)
        else:
            indices = torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        return indices, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.order(self.epoch)
        yield from zip(indices[self.start :].tolist(), seeds[self.start :].tolist(), strict=True)

    def __len__(self) -> int:
        return self.size - self.start
