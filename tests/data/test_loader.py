"""Sharded batches: the shards of every rank make up exactly the single-process batch."""

from __future__ import annotations

import torch

from deqdiff.data import ShardedBatches


def test_shards_partition_the_global_batch():
    single = ShardedBatches(23, 8, seed=3).epoch()
    shards = [ShardedBatches(23, 8, seed=3, rank=r, world_size=3).epoch() for r in range(3)]
    assert len(single) == 3
    for step, (g, idx) in enumerate(single):
        parts = [s[step][1] for s in shards]
        assert all(s[step][0] == g for s in shards)
        assert torch.equal(torch.cat(parts), idx)
        assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1


def test_generator_state_replays_an_epoch():
    b = ShardedBatches(10, 4, seed=0)
    b.epoch()
    state = b.get_state()
    second = b.epoch()
    b.set_state(state)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(second, b.epoch()))
    first_again = ShardedBatches(10, 4, seed=0).epoch()
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(second, first_again))
