"""Collectives of the torch communicator on 1, 2 and 4 spawned gloo ranks; failures don't hang."""

from __future__ import annotations

import time

import pytest
import torch

from secondorder.distributed.comm import NoComm, TorchComm
from secondorder.distributed.testing import run_on_ranks


def _collectives() -> dict:
    comm = TorchComm()
    r, w = comm.rank, comm.world_size
    out: dict = {"rank": r, "world": w}
    t = torch.full((3,), float(r + 1), dtype=torch.float64)
    comm.all_reduce(t, op="sum")
    out["sum"] = t.tolist()
    t = torch.full((3,), float(r + 1), dtype=torch.float64)
    handle = comm.all_reduce(t, op="avg", async_op=True)
    handle.wait()
    out["avg"] = t.tolist()
    b = torch.tensor([float(r)]) if r == 0 else torch.tensor([-1.0])
    comm.broadcast(b, src=0)
    out["bcast"] = b.item()
    out["gather"] = [x.item() for x in comm.all_gather(torch.tensor([float(r * 10)]))]
    out["obj"] = comm.broadcast_object({"from": r})
    out["objs"] = comm.all_gather_object(r * 2)
    # Bucketed all-reduce over mixed shapes and dtypes with a tiny bucket: several buckets.
    tensors = [
        torch.full((5, 7), float(r), dtype=torch.float64),
        torch.full((11,), float(r), dtype=torch.float32),
        torch.full((2, 3, 4), float(r + 1), dtype=torch.float64),
    ]
    comm.all_reduce_tensors(tensors, op="avg", bucket_mb=100 / 2**20)
    out["bucketed"] = [t.mean().item() for t in tensors]
    comm.barrier()
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_collectives(world_size: int) -> None:
    results = run_on_ranks(_collectives, world_size=world_size, timeout_s=90)
    total = sum(range(1, world_size + 1))
    mean_rank = (world_size - 1) / 2
    for r, out in enumerate(results):
        assert out["rank"] == r and out["world"] == world_size
        assert out["sum"] == [float(total)] * 3
        assert out["avg"] == pytest.approx([total / world_size] * 3)
        assert out["bcast"] == 0.0
        assert out["gather"] == [10.0 * k for k in range(world_size)]
        assert out["obj"] == {"from": 0}
        assert out["objs"] == [2 * k for k in range(world_size)]
        assert out["bucketed"] == pytest.approx([mean_rank, mean_rank, mean_rank + 1])


def test_no_comm_is_world_size_one() -> None:
    comm = NoComm()
    t = torch.ones(3)
    comm.all_reduce(t)
    comm.all_reduce_tensors([t])
    assert comm.world_size == 1 and comm.rank == 0 and comm.is_main
    assert torch.equal(t, torch.ones(3))
    assert comm.all_gather_object("x") == ["x"]


def _rank_one_raises() -> None:
    comm = TorchComm()
    if comm.rank == 1:
        raise ValueError("bad shard on rank 1")
    comm.barrier()  # rank 0 would wait forever for rank 1


def test_a_raising_rank_fails_the_run_instead_of_hanging() -> None:
    with pytest.raises(RuntimeError, match="bad shard on rank 1"):
        run_on_ranks(_rank_one_raises, world_size=2, timeout_s=60)


def _hang_on_rank_zero() -> None:
    comm = TorchComm()
    if comm.rank == 0:
        comm.barrier()  # rank 1 never joins
    else:
        time.sleep(120)


def test_a_hung_collective_times_out() -> None:
    with pytest.raises(TimeoutError, match="did not finish"):
        run_on_ranks(_hang_on_rank_zero, world_size=2, timeout_s=8)


def test_every_communicator_counts_on_its_own() -> None:
    first, second = NoComm(), NoComm()
    first.stats.record("all_reduce", nbytes=1000)
    assert second.stats.totals["all_reduce"]["bytes"] == 0
    assert first.stats.totals["all_reduce"]["bytes"] == 1000
