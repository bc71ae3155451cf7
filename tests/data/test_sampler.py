"""Global-batch sampling: deterministic, disjoint per-rank shards, exact micro-batch plans."""

from __future__ import annotations

import pytest
import torch

from secondorder.data.sampler import GlobalBatchSampler, eval_shards, plan_batches


@pytest.mark.parametrize(
    ("global_batch", "world", "max_micro", "micro", "accumulation"),
    [
        (256, 1, 4096, 256, 1),
        (256, 2, 64, 64, 2),
        (32768, 1, 4096, 4096, 8),
        (32768, 2, 4096, 4096, 4),
        (96, 2, 40, 24, 2),
        (100, 4, 7, 5, 5),
    ],
)
def test_plan(global_batch: int, world: int, max_micro: int, micro: int, accumulation: int) -> None:
    plan = plan_batches(global_batch=global_batch, world_size=world, max_micro_batch=max_micro)
    assert (plan.micro_batch, plan.accumulation_steps) == (micro, accumulation)
    assert plan.micro_batch * plan.accumulation_steps * world == global_batch
    assert plan.micro_batch <= max_micro


def test_plan_refuses_uneven_split() -> None:
    with pytest.raises(ValueError, match="does not divide over 3 ranks"):
        plan_batches(global_batch=256, world_size=3, max_micro_batch=64)


def test_shards_are_disjoint_and_cover_the_global_batch() -> None:
    plan = plan_batches(global_batch=64, world_size=4, max_micro_batch=8)
    samplers = [GlobalBatchSampler(num_samples=1000, plan=plan, rank=r, seed=3) for r in range(4)]
    single = GlobalBatchSampler(
        num_samples=1000,
        plan=plan_batches(global_batch=64, world_size=1, max_micro_batch=64),
        rank=0,
        seed=3,
    )
    for step in (0, 1, 15, 16, 40):  # 15 steps per epoch: 16 and 40 are later epochs
        shards = [torch.cat(s.indices(step)) for s in samplers]
        assert all(len(s.indices(step)) == 2 for s in samplers)
        union = torch.cat(shards)
        assert len(set(union.tolist())) == 64
        assert torch.equal(union, torch.cat(single.indices(step)))
    epoch0 = torch.cat([torch.cat(single.indices(s)) for s in range(15)])
    assert len(set(epoch0.tolist())) == 15 * 64  # no repeats within an epoch
    assert not torch.equal(torch.cat(single.indices(0)), torch.cat(single.indices(15)))


def test_order_depends_on_seed_only() -> None:
    plan = plan_batches(global_batch=32, world_size=1, max_micro_batch=32)
    a = GlobalBatchSampler(num_samples=500, plan=plan, rank=0, seed=1)
    b = GlobalBatchSampler(num_samples=500, plan=plan, rank=0, seed=1)
    c = GlobalBatchSampler(num_samples=500, plan=plan, rank=0, seed=2)
    assert torch.equal(a.indices(20)[0], b.indices(20)[0])
    assert not torch.equal(a.indices(20)[0], c.indices(20)[0])


def test_batch_larger_than_dataset_is_refused() -> None:
    plan = plan_batches(global_batch=1024, world_size=1, max_micro_batch=1024)
    with pytest.raises(ValueError, match="larger than the training set"):
        GlobalBatchSampler(num_samples=1000, plan=plan, rank=0, seed=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_cover_every_example_once(world: int) -> None:
    seen = torch.cat(
        [
            torch.cat(
                eval_shards(101, batch_size=8, rank=r, world_size=world)
                or [torch.empty(0, dtype=torch.long)]
            )
            for r in range(world)
        ]
    )
    assert sorted(seen.tolist()) == list(range(101))
