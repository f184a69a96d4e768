"""Batch order: deterministic, resumable at any position, sharded across ranks."""
import itertools

import torch

from omni.data.sampler import BucketedBatches, ResumableBatchSampler, ShuffledBatches, sample_generator


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_resuming_at_any_position_continues_the_same_order():
    plan = ShuffledBatches(23, 4, seed=5)          # 5 batches an epoch, tail of 3 dropped
    full = take(ResumableBatchSampler(plan), 17)
    for start in range(17):
        assert take(ResumableBatchSampler(plan, start=start), 17 - start) == full[start:]
    epochs = [{e for _, e in batch} for batch in full]
    assert epochs[0] == {0} and epochs[5] == {1} and epochs[16] == {3}
    assert full[0] != full[5]                     # a new shuffle every epoch


def test_ranks_take_disjoint_shares_of_each_epoch():
    plan = ShuffledBatches(40, 4, seed=1)
    shares = [take(ResumableBatchSampler(plan, rank=r, world_size=2), 5) for r in range(2)]
    seen = [i for share in shares for batch in share for i, _ in batch]
    assert sorted(seen) == list(range(40))


def test_bucketed_batches_pad_less_and_resume_exactly():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    plan = BucketedBatches(lengths, 10, seed=2, pool_batches=10)
    shuffled = ShuffledBatches(300, 10, seed=2)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(plan.epoch(0).tolist()) < padding(shuffled.epoch(0).tolist()) / 3
    assert torch.equal(plan.epoch(0), BucketedBatches(lengths, 10, seed=2, pool_batches=10).epoch(0))
    assert not torch.equal(plan.epoch(0), plan.epoch(1))
    assert sorted(plan.epoch(1).flatten().tolist()) == list(range(300))
    full = take(ResumableBatchSampler(plan), 70)
    assert take(ResumableBatchSampler(plan, start=41), 29) == full[41:]


def test_sample_generator_depends_only_on_seed_epoch_index():
    a = sample_generator(1, 2, 3)
    assert torch_equal(a, sample_generator(1, 2, 3))
    assert not torch_equal(sample_generator(1, 2, 3), sample_generator(1, 2, 4))
    assert not torch_equal(sample_generator(1, 2, 3), sample_generator(1, 3, 3))


def torch_equal(g1, g2):
    return torch.equal(torch.rand(8, generator=g1), torch.rand(8, generator=g2))
