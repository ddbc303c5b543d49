"""Shuffling that depends only on (seed, epoch), so resumed runs see the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch from ``seed + epoch``; Lightning calls :meth:`set_epoch`.

    Unlike ``RandomSampler`` it does not draw from the global RNG, whose state differs between a
    resumed run and an uninterrupted one. (Under DDP Lightning swaps in ``DistributedSampler``,
    which is seeded the same way.)
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
