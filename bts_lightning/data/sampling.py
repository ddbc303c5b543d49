"""Shuffling that depends only on (seed, epoch), so resumed runs see the same batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch from ``seed + epoch``; Lightning calls :meth:`set_epoch`.

    Unlike ``RandomSampler`` it does not draw from the global RNG, whose state differs between a
    resumed run and an uninterrupted one. Under DDP the data module shards it (:class:`RankShare`).
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


def _draw(group: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` members of ``group``: a random subset, or whole permutations and a partial one when it is smaller."""
    if count == 0:
        return group[:0]
    rounds = [group[torch.randperm(len(group), generator=generator)] for _ in range(-(-count // len(group)))]
    return torch.cat(rounds)[:count]


class EmptyFractionSampler(EpochShuffleSampler):
    """``len(empty)`` draws per epoch, ``round(fraction * len(empty))`` of them from the samples whose mask is empty.

    ``empty[i]`` says whether sample ``i`` has an all-zero mask. Each group is drawn uniformly, without
    replacement while it lasts (whole permutations, then part of one), and the draws are shuffled together;
    like :class:`EpochShuffleSampler` they depend only on ``seed + epoch``. ``fraction`` 0 draws tumor slices
    only. Negatives made on the fly (``TumorFreeCrop``) are not known here and do not count. Under DDP the
    data module shards each epoch's draw (:class:`RankShare`). With ``batch_size`` the draws are not shuffled
    together but placed so that every batch of ``batch_size`` of each of ``num_replicas`` ranks holds the share
    within one slice (:func:`_in_even_batches`); without it, each batch holds it on average.
    """

    def __init__(self, empty: Sequence[bool], fraction: float, seed: int, batch_size: int | None = None,
                 num_replicas: int = 1) -> None:
        super().__init__(len(empty), seed)
        flags = torch.as_tensor(list(empty), dtype=torch.bool)
        self.empty, self.tumor = flags.nonzero().flatten(), (~flags).nonzero().flatten()
        self.empty_count = round(fraction * self.length)
        if (self.empty_count and not len(self.empty)) or (self.empty_count < self.length and not len(self.tumor)):
            raise ValueError(f"cannot draw an empty share of {fraction} from {len(self.empty)} empty and "
                             f"{len(self.tumor)} tumor samples")
        if batch_size is not None and (batch_size < 1 or num_replicas < 1):
            raise ValueError(f"batch_size={batch_size} and num_replicas={num_replicas} must be >= 1")
        self.batch_size, self.num_replicas = batch_size, num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        empty = _draw(self.empty, self.empty_count, generator)
        tumor = _draw(self.tumor, self.length - self.empty_count, generator)
        if self.batch_size is None:
            draws = torch.cat([empty, tumor])
            return iter(draws[torch.randperm(self.length, generator=generator)].tolist())
        return iter(_in_even_batches(empty, tumor, self.batch_size, self.num_replicas, generator).tolist())


def _spread(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion, each part within one of its exact share."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    length = bounds[-1]
    return [(bounds[i + 1] * total) // length - (bounds[i] * total) // length for i in range(len(sizes))]


def _in_even_batches(empty: torch.Tensor, tumor: torch.Tensor, batch_size: int, num_replicas: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``empty`` and ``tumor`` draws ordered so that every batch of every rank holds the epoch's empty share.

    The draws are dealt to ``num_replicas`` ranks (rank ``r`` gets positions ``r, r + num_replicas, ...``, as
    :class:`RankShare` reads them), each rank's into batches of ``batch_size``; every batch gets its share of
    the empty draws within one slice (:func:`_spread`), in random order within the batch.
    """
    length = len(empty) + len(tumor)
    ranks = [length // num_replicas + (rank < length % num_replicas) for rank in range(num_replicas)]
    empties, tumors = iter(empty.tolist()), iter(tumor.tolist())
    ordered = torch.empty(length, dtype=torch.long)
    for rank, (rank_length, rank_empty) in enumerate(zip(ranks, _spread(len(empty), ranks))):
        batches = [min(batch_size, rank_length - start) for start in range(0, rank_length, batch_size)]
        local = []
        for size, count in zip(batches, _spread(rank_empty, batches)):
            batch = torch.tensor([next(empties) for _ in range(count)] + [next(tumors) for _ in range(size - count)],
                                 dtype=torch.long)
            local.append(batch[torch.randperm(size, generator=generator)])
        if local:
            ordered[rank::num_replicas] = torch.cat(local)
    return ordered


class RankShare(DistributedSampler):
    """Rank ``rank``'s share of each epoch's draw of ``sampler`` (an :class:`EpochShuffleSampler`), for DDP.

    Every rank draws the same epoch (it depends only on ``seed + epoch``) and keeps every ``num_replicas``-th
    index from its ``rank``, the draw padded with its own start to a multiple of ``num_replicas`` as
    ``DistributedSampler`` pads. :meth:`set_epoch`, which Lightning calls on it every epoch, reaches
    ``sampler``. Lightning wraps other samplers in its ``DistributedSamplerWrapper``, which splits one draw
    made once and only reshuffles it: an epoch-dependent draw (:class:`EmptyFractionSampler`) would repeat
    its first epoch's multiset; being a ``DistributedSampler``, this one is kept as it is.
    """

    def __init__(self, sampler: EpochShuffleSampler, num_replicas: int, rank: int) -> None:
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        draws = list(self.sampler)
        while len(draws) < self.total_size:
            draws += draws[: self.total_size - len(draws)]
        return iter(draws[self.rank : self.total_size : self.num_replicas])
