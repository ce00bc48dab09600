"""The order of training examples: a pure function of (seed, position in an endless stream of epochs).

A resumed run asks for the stream from the batch where it stopped, so the data order survives a crash
exactly, and DDP ranks take disjoint slices of the same global batch.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from diffusekit.errors import check_positive_int
from diffusekit.training.data import ArrayDataset, TrainDataset, collate


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation drawn from SeedSequence((seed, epoch))."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_items)


class StreamBatchSampler:
    """Endless batches of indices from a stream of shuffled epochs, starting at stream position ``start``.

    With B = ``batch_size * world_size``, global batch k covers stream positions [start + k B, start + (k+1) B)
    and rank r receives the ``batch_size`` positions from start + k B + r * batch_size. The stream depends only
    on (seed, dataset size), so a run resumed at the position where it stopped, or split across ranks, sees
    exactly the examples a single uninterrupted process would have seen.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_items = check_positive_int("dataset size", num_items)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed, self.start, self.rank, self.world_size = int(seed), int(start), int(rank), int(world_size)
        self._epoch, self._perm = -1, None

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.num_items, self.seed, epoch)
        return int(self._perm[offset])

    def indices(self, k: int) -> list[int]:
        """This rank's indices of global batch ``k`` (counted from ``start``)."""
        first = self.start + k * self.batch_size * self.world_size + self.rank * self.batch_size
        return [self._at(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        k = 0
        while True:
            yield self.indices(k)
            k += 1


def make_batches(
    dataset: TrainDataset, sampler: StreamBatchSampler, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """An endless iterator of (images, labels) batches in the sampler's order.

    In-memory datasets are indexed directly; folder datasets decode in ``num_workers`` DataLoader worker
    processes (the order does not depend on the number of workers).
    """
    if num_workers <= 0 or isinstance(dataset, ArrayDataset):
        return (dataset.batch(idx) for idx in sampler)
    labelled = dataset.num_classes > 0
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=functools.partial(collate, labelled=labelled),
        persistent_workers=True,
        prefetch_factor=4,
        generator=torch.Generator().manual_seed(sampler.seed),  # keeps the global torch RNG untouched
        worker_init_fn=_ignore_sigint,
    )
    return iter(loader)


def _ignore_sigint(worker_id: int) -> None:
    """In a DataLoader worker: leave Ctrl-C to the training process, which stops after the current step and
    saves a checkpoint (a worker that died of it would break the batches of that last step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
