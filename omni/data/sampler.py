"""Deterministic, resumable batch order.

A *plan* decides the batches of one epoch from (seed, epoch) alone; `ResumableBatchSampler` walks
the plans epoch after epoch, jumps straight to any position (O(1): skipped batches are never
built or loaded) and gives each torchrun rank its own share. Datasets receive keys
`(index, epoch)`, so randomness inside a sample (crops, masks) comes from
`sample_generator(seed, epoch, index)` and never depends on which worker loads it.
"""
from __future__ import annotations

import hashlib

import torch

from omni.config import UserError


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed so that neighbouring inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, epoch, index))


class ShuffledBatches:
    """Every epoch: a fresh permutation of all samples cut into full batches (the tail is dropped)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_samples < batch_size:
            raise UserError(f"training data has {num_samples} samples, fewer than batch_size {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.batches_per_epoch = num_samples // batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of sample indices (int64: 8 bytes a sample, where a Python list
        of ints would take about 60 on a corpus of millions of windows)."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def epoch(self, epoch: int) -> torch.Tensor:
        """The epoch's batches: row k of a [batches_per_epoch, batch_size] tensor is batch k."""
        return self.order(epoch)[:self.batches_per_epoch * self.batch_size].view(-1, self.batch_size)


class BucketedBatches(ShuffledBatches):
    """Batches of similar lengths (less padding), still shuffled and deterministic per epoch.

    The shuffled order is cut into pools of `pool_batches` batches; each pool is sorted by length
    and cut into batches; then the order of all batches is shuffled.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, pool_batches: int = 50):
        super().__init__(len(lengths), batch_size, seed)
        self.lengths, self.pool = lengths, pool_batches * batch_size

    def epoch(self, epoch: int) -> torch.Tensor:
        order, b = self.order(epoch).tolist(), self.batch_size
        order = order[:self.batches_per_epoch * b]
        batches = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start:start + self.pool], key=lambda i: (self.lengths[i], i))
            batches += [pool[i:i + b] for i in range(0, len(pool), b)]
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
        return torch.tensor(batches)[torch.randperm(len(batches), generator=g)]


class ResumableBatchSampler:
    """Endless batches of `(index, epoch)` keys for one rank, from global batch `start` on.

    The epochs' batches form one global stream; global batch g is row g % batches_per_epoch of
    epoch g // batches_per_epoch. The ranks take turns: rank r takes g = start + k*world_size + r.
    A checkpoint records how many global batches were taken, so a run resumed on any number of
    ranks continues the same stream: no sample is skipped or seen twice.
    """

    def __init__(self, plan, start: int = 0, rank: int = 0, world_size: int = 1):
        self.plan, self.start, self.rank, self.world = plan, start, rank, world_size

    def __iter__(self):
        per_epoch, g = self.plan.batches_per_epoch, self.start + self.rank
        epoch, batches = g // per_epoch, self.plan.epoch(g // per_epoch)
        while True:
            if g // per_epoch != epoch:
                epoch, batches = g // per_epoch, self.plan.epoch(g // per_epoch)
            yield [(i, epoch) for i in batches[g % per_epoch].tolist()]
            g += self.world
