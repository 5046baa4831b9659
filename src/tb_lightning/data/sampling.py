"""DataLoaders whose random draws depend on (seed, epoch) alone, so that a resumed run takes the
same shuffles and augmentations as an uninterrupted one, with any number of workers.

A plain DataLoader draws its shuffling seed and its workers' base seed from the global torch RNG
each time an epoch's iterator is created. With persistent workers the base seed is drawn only
once, so an uninterrupted run and a run resumed at epoch k draw a different number of times
(and workers' augmentation streams restart); and when Lightning resumes, it creates the resumed
epoch's iterator before it tells the samplers the epoch (`set_epoch`). Here the permutation and
the workers' base seed are derived from the run's seed and the trainer's current epoch, read at
the moment the iterator is created; workers are started afresh each epoch (non-persistent), so
their random streams are a function of (seed, epoch, worker) too. Nothing here touches the
global RNG, whose state (dropout masks) travels in the checkpoint (callbacks.RNGStateCheckpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

EpochFn = Callable[[], int]


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one epoch and one use (0: the permutation, 1: the workers).

    numpy's SeedSequence mixes the three (any size of seed, e.g. an unseeded run's 64-bit one).
    """
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of range(n) that is a function of (seed, current epoch)."""

    def __init__(self, n: int, seed: int, current_epoch: EpochFn) -> None:
        self.n = n
        self.seed = seed
        self.current_epoch = current_epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.current_epoch(), 0))
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class EpochSeededDataLoader(DataLoader):
    """A DataLoader whose workers' base seed is a function of (seed, current epoch).

    torch draws the base seed from `self.generator` when it creates an epoch's iterator; it is
    re-seeded right before. (`_get_iterator` is where every DataLoader iterator is created.)
    """

    def __init__(self, *args, seed: int, current_epoch: EpochFn, **kwargs) -> None:
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self.seed = seed
        self.current_epoch = current_epoch

    def _get_iterator(self):  # noqa: ANN202 - torch's private iterator types
        self.generator.manual_seed(epoch_seed(self.seed, self.current_epoch(), 1))
        return super()._get_iterator()
