"""The engine's sampler: the order of every epoch, and each item's augmentation seed, from (seed, epoch) alone."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Yields ``(index, seed)`` for every item once per epoch: the order (shuffled or not) and the per-item
    augmentation seeds are functions of (``seed``, epoch) only, so every process of a distributed run sees the
    same global order (Accelerate then gives each its share) and a resumed run the same batches.

    ``set_epoch(epoch)`` picks the epoch (Accelerate's data loader calls it); ``skip`` items at the start of the
    epoch are left out (resume in the middle of an epoch).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch, self.skip = n, seed, shuffle, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and seeds the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return max(0, self.n - self.skip)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=gen)
        for i, s in list(zip(order.tolist(), seeds.tolist()))[self.skip:]:
            yield i, s
