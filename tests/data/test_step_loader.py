"""The step loader: every worker prepares part of every step, batches do not depend on the
worker count (resume included), the next step is prepared ahead, and close leaves no process."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from secondorder.data.loader import (
    InMemoryLoader,
    InProcessLoader,
    WorkerStepLoader,
    load_items,
    make_eval_loader,
    make_step_loader,
    sample_seed,
)
from secondorder.data.sampler import GlobalBatchSampler, eval_shards, plan_batches
from secondorder.data.synthetic_data import synthetic

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class UInt8Images(Dataset):
    """Random uint8 images drawn from the sample's generator; label = index. Workers write
    their id per index and a flag per prepared index into shared memory."""

    normalization = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))

    def __init__(self, size: int = 48, side: int = 4):
        self.size, self.side = size, side
        self.worker = torch.full((size,), -1, dtype=torch.int64).share_memory_()
        self.prepared = torch.zeros(size, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.sample(index, None)

    def sample(self, index: int, generator: torch.Generator | None):
        info = get_worker_info()
        self.worker[index] = -1 if info is None else info.id
        self.prepared[index] += 1
        image = torch.randint(0, 256, (3, self.side, self.side), generator=generator)
        return image.to(torch.uint8), index


def _sampler(*, size=48, global_batch=12, world_size=1, rank=0, micro=4, seed=5):
    plan = plan_batches(global_batch=global_batch, world_size=world_size, max_micro_batch=micro)
    return GlobalBatchSampler(num_samples=size, plan=plan, rank=rank, seed=seed)


def _children() -> set[int]:
    """Live child processes of this process (from /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry))
    return found


def _wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {limit_s} s: {what}"
        time.sleep(0.02)


def test_every_worker_prepares_part_of_every_step() -> None:
    data, sampler = UInt8Images(), _sampler()  # 12 per step, 4 steps per epoch
    # one epoch only: later steps would prepare (and mark) the same indices again
    loader = make_step_loader(data, sampler, num_workers=3, total_steps=4)
    assert isinstance(loader, WorkerStepLoader)
    try:
        for step in range(sampler.steps_per_epoch):
            loader.batches(step)
            step_indices = torch.cat(sampler.indices(step))
            workers = data.worker[step_indices]
            assert set(workers.tolist()) == {0, 1, 2}, f"step {step}: workers {workers.tolist()}"
            # contiguous chunks of 4: each worker prepared one third of the step
            assert workers.tolist() == sorted(workers.tolist())
    finally:
        loader.close()


@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (2, 1)])
def test_batches_do_not_depend_on_the_worker_count(world_size: int, rank: int) -> None:
    steps = [0, 1, 2, 3, 4]
    results = {}
    for workers in (0, 1, 3):
        loader = make_step_loader(
            UInt8Images(), _sampler(world_size=world_size, rank=rank, micro=2), num_workers=workers
        )
        try:
            results[workers] = [loader.batches(step) for step in steps]
            resumed = make_step_loader(
                UInt8Images(),
                _sampler(world_size=world_size, rank=rank, micro=2),
                num_workers=workers,
            )
            try:  # a resumed run starts at step 3
                assert _same(resumed.batches(3), results[workers][3])
                assert _same(resumed.batches(4), results[workers][4])
            finally:
                resumed.close()
        finally:
            loader.close()
    sampler = _sampler(world_size=world_size, rank=rank, micro=2)
    for step, batches in zip(steps, results[0], strict=True):
        # exactly the sampler's order, one micro-batch per index tensor
        assert [y.tolist() for _, y in batches] == [i.tolist() for i in sampler.indices(step)]
        assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 4, 4) for x, _ in batches)
    for workers in (1, 3):
        for ours, reference in zip(results[workers], results[0], strict=True):
            assert _same(ours, reference)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(a, b, strict=True)
    )


def test_augmentation_is_seeded_by_seed_step_and_position() -> None:
    data, sampler = UInt8Images(), _sampler(micro=12)
    ((x, y),) = InProcessLoader(data, sampler).batches(2)
    position = 7
    generator = torch.Generator().manual_seed(sample_seed(sampler.seed, 2, position))
    expected, _ = data.sample(int(y[position]), generator)
    assert torch.equal(x[position], expected)
    # the same index at another step gets other randomness
    other = load_items(data, [int(y[position])], seed=sampler.seed, step=3, start=position)[0]
    assert not torch.equal(other[0], expected)


def test_next_step_is_prepared_before_it_is_asked_for() -> None:
    # 40 steps an epoch: the steps prefetched while this runs never repeat step 1's images
    data, sampler = UInt8Images(size=480), _sampler(size=480)
    loader = make_step_loader(data, sampler, num_workers=2)
    try:
        held = loader.batches(0)  # step 0's batches, not yet consumed
        step1 = torch.cat(sampler.indices(1))
        # No call for step 1 was made: only prefetch can prepare its items.
        _wait_until(lambda: bool((data.prepared[step1] == 1).all()), "step 1 prepared ahead")
        assert [y.tolist() for _, y in held] == [i.tolist() for i in sampler.indices(0)]
        assert [y.tolist() for _, y in loader.batches(1)] == [
            i.tolist() for i in sampler.indices(1)
        ]
        # prepared once: handing the prefetched step over did not prepare it again
        assert (data.prepared[step1] == 1).all()
    finally:
        loader.close()


def test_in_memory_data_keeps_its_vectorised_gather() -> None:
    bundle = synthetic(num_samples=48, eval_samples=8, shape=[3], num_classes=2)
    sampler = _sampler()
    loader = make_step_loader(bundle.train, sampler, num_workers=3)
    assert isinstance(loader, InMemoryLoader)
    for (x, y), idx in zip(loader.batches(1), sampler.indices(1), strict=True):
        expected = bundle.train.get_batch(idx)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_batches_cover_the_shard_and_reuse_the_workers(workers: int) -> None:
    data = UInt8Images(size=20)
    shards = eval_shards(20, batch_size=3, rank=1, world_size=2)  # indices 10..19
    loader = make_eval_loader(data, shards, num_workers=workers)
    before = _children()
    try:
        for _ in range(2):
            labels = [y.tolist() for _, y in loader.batches()]
            assert labels == [s.tolist() for s in shards]
        started = _children() - before
        assert len(started) == workers  # one set of persistent workers for both evaluations
    finally:
        loader.close()
    _wait_until(lambda: not (_children() - before), "no loader process after close")


def test_close_leaves_no_process_and_is_idempotent() -> None:
    before = _children()
    loader = make_step_loader(UInt8Images(), _sampler(), num_workers=3)
    loader.batches(0)
    assert len(_children() - before) == 3
    loader.close()
    loader.close()
    _wait_until(lambda: not (_children() - before), "no loader process after close")


def test_ranks_together_see_the_single_process_batch() -> None:
    """Seeds follow the position in the global batch, so the world size changes no sample."""
    whole = InProcessLoader(UInt8Images(), _sampler(micro=12)).batches(2)
    parts = []
    for rank in (0, 1):
        loader = make_step_loader(
            UInt8Images(), _sampler(world_size=2, rank=rank, micro=6), num_workers=2
        )
        try:
            parts.extend(loader.batches(2))
        finally:
            loader.close()
    assert torch.equal(torch.cat([x for x, _ in parts]), whole[0][0])
    assert torch.equal(torch.cat([y for _, y in parts]), whole[0][1])


def test_the_loader_leaves_the_global_random_stream_alone() -> None:
    """Training draws from the global RNG (dropout, curvature sampling): workers starting in
    the background must not move it."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loader = make_step_loader(UInt8Images(), _sampler(), num_workers=2)
    evaluation = make_eval_loader(UInt8Images(), [torch.arange(4)], num_workers=2)
    try:
        loader.batches(0)
        loader.batches(3)  # a restart
        list(evaluation.batches())
    finally:
        loader.close()
        evaluation.close()
    assert torch.equal(torch.get_rng_state(), state)


class GlobalRandomImages(Dataset):
    """Augmentation from torch's global RNG, as a data set without ``sample`` draws it."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, index: int):
        return torch.randint(0, 256, (3, 2, 2)).to(torch.uint8), index


def test_data_without_sample_is_seeded_per_position_too() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    results = []
    for workers in (0, 3):
        loader = make_step_loader(GlobalRandomImages(), _sampler(), num_workers=workers)
        try:
            results.append([loader.batches(step) for step in (0, 1, 6)])
        finally:
            loader.close()
    assert all(_same(a, b) for a, b in zip(*results, strict=True))
    assert torch.equal(torch.get_rng_state(), state)  # the in-process path restored it
    first = torch.cat([x for x, _ in results[0][0]])
    assert len({tuple(x.flatten().tolist()) for x in first}) == len(first)  # no repeated draw
