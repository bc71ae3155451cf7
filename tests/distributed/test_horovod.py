"""The Horovod backend runs the same bodies as the torch backend and gives the same answers.

Each body builds its communicator with ``build_communicator("auto")``, so the identical function
runs on spawned gloo ranks (torch) and on ranks started by ``horovodrun --gloo`` (Horovod, built
by ``launch/install_horovod.sh``; ``make test`` installs it). Covered: every collective, the
gradient all-reduce against single-process gradients of the global batch, the parameter check,
a raising rank, a hung collective, and a 2-rank training run through the real entry point
launched by ``launch/horovodrun.sh`` equal to the 1-rank run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_run_overrides, train
from torch import nn

from secondorder.distributed.comm import ParameterDivergence, build_communicator, launcher_env
from secondorder.distributed.testing import horovodrun_path, run_on_horovod_ranks, run_on_ranks
from secondorder.optim.closure import BatchClosure


def _on(backend: str, fn, world_size: int, args: tuple = (), timeout_s: float = 90.0) -> list:
    if backend == "torch":
        return run_on_ranks(
            fn, world_size=world_size, args=args, timeout_s=timeout_s, init_group=False
        )
    return run_on_horovod_ranks(fn, world_size=world_size, args=args, timeout_s=timeout_s)


def test_horovod_is_installed() -> None:
    """The backend must be exercised in CI: a missing build is a failure, not a skip."""
    assert horovodrun_path() is not None, "horovodrun missing: run launch/install_horovod.sh"
    import horovod.torch  # noqa: F401


# -- every collective -----------------------------------------------------------------------


def _collectives() -> dict:
    comm = build_communicator("auto")
    r, w = comm.rank, comm.world_size
    out: dict = {"backend": comm.backend, "rank": r, "world": w}
    t = torch.full((3,), float(r + 1), dtype=torch.float64)
    comm.all_reduce(t, op="sum")
    out["sum"] = t.tolist()
    t = torch.full((2, 2), float(r + 1), dtype=torch.float32)
    comm.all_reduce(t, op="avg", async_op=True).wait()
    out["avg"] = t.tolist()
    b = torch.tensor([3.0, float(r)]) if r == 0 else torch.tensor([-1.0, -1.0])
    comm.broadcast(b, src=0)
    out["bcast"] = b.tolist()
    b = torch.full((2,), float(r))
    comm.broadcast(b, src=w - 1, async_op=True).wait()
    out["bcast_last"] = b.tolist()
    out["gather"] = [x.tolist() for x in comm.all_gather(torch.tensor([float(r * 10), 1.0]))]
    out["obj"] = comm.broadcast_object({"from": r, "list": [r]})
    out["objs"] = comm.all_gather_object(("rank", r))
    tensors = [
        torch.full((5, 7), float(r), dtype=torch.float64),
        torch.full((11,), float(r), dtype=torch.float32),
        torch.full((2, 3, 4), float(r + 1), dtype=torch.float64),
    ]
    comm.all_reduce_tensors(tensors, op="avg", bucket_mb=100 / 2**20)  # several buckets
    out["bucketed"] = [t.mean().item() for t in tensors]
    comm.barrier()
    out["counted"] = {k: v["bytes"] for k, v in comm.stats.totals.items()}
    comm.shutdown()
    return out


def _check_collectives(results: list[dict], world_size: int) -> None:
    total = sum(range(1, world_size + 1))
    mean_rank = (world_size - 1) / 2
    for r, out in enumerate(results):
        assert out["rank"] == r and out["world"] == world_size
        assert out["sum"] == [float(total)] * 3
        assert out["avg"] == [[total / world_size] * 2] * 2
        assert out["bcast"] == [3.0, 0.0]
        assert out["bcast_last"] == [float(world_size - 1)] * 2
        assert out["gather"] == [[10.0 * k, 1.0] for k in range(world_size)]
        assert out["obj"] == {"from": 0, "list": [0]}
        assert out["objs"] == [("rank", k) for k in range(world_size)]
        assert out["bucketed"] == pytest.approx([mean_rank, mean_rank, mean_rank + 1])


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_horovod_collectives(world_size: int) -> None:
    results = _on("horovod", _collectives, world_size)
    assert {out["backend"] for out in results} == {"horovod"}
    _check_collectives(results, world_size)


def test_both_backends_give_identical_results_and_byte_counts() -> None:
    torch_results = _on("torch", _collectives, 2)
    horovod_results = _on("horovod", _collectives, 2)
    assert [r["backend"] for r in torch_results] == ["torch", "torch"]
    for a, b in zip(torch_results, horovod_results, strict=True):
        a, b = dict(a), dict(b)
        assert a.pop("backend") == "torch" and b.pop("backend") == "horovod"
        counted_a, counted_b = a.pop("counted"), b.pop("counted")
        assert a == b
        # Tensor payloads are counted identically (object payloads are pickled sizes).
        for kind in ("all_reduce", "broadcast", "all_gather"):
            assert counted_a[kind] == counted_b[kind]
        # 3 + 4 floats reduced, 2 bucketed groups: 35 + 24 float64, 11 float32.
        assert counted_a["all_reduce"] == 3 * 8 + 4 * 4 + (35 + 24) * 8 + 11 * 4


# -- gradients, parameter check, failures ----------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (12,), generator=g
    )


def _shard_gradients() -> list[torch.Tensor]:
    comm = build_communicator("auto")
    model = _model()
    x, y = _global_batch()
    share = x.shape[0] // comm.world_size
    rows = slice(comm.rank * share, (comm.rank + 1) * share)
    # Two micro-batches per rank: gradient accumulation and the all-reduce together.
    half = share // 2
    micro = [(x[rows][:half], y[rows][:half]), (x[rows][half:], y[rows][half:])]
    closure = BatchClosure(model=model, micro_batches=micro, loss_kind="cross_entropy", comm=comm)
    loss = closure()
    comm.shutdown()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_gradient_all_reduce_equals_single_process_gradients(backend: str) -> None:
    model = _model()
    x, y = _global_batch()
    loss = nn.functional.cross_entropy(model(x), y)  # the mean over the whole global batch
    expected = [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]
    for got in _on(backend, _shard_gradients, 2):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-13)


def _verify() -> list[str]:
    comm = build_communicator("auto")
    model = _model()
    outcomes = []
    for perturb_rank in (-1, 1):  # identical replicas, then rank 1 one ulp-ish off
        if comm.rank == perturb_rank:
            with torch.no_grad():
                model[2].weight[1, 3] += 1e-9
        try:
            comm.verify_parameters(model.parameters(), step=7)
            outcomes.append("equal")
        except ParameterDivergence as err:
            outcomes.append(str(err))
    comm.shutdown()
    return outcomes


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_verify_parameters_finds_a_diverged_rank(backend: str) -> None:
    for equal, diverged in _on(backend, _verify, 2):
        assert equal == "equal"
        assert "rank 1 at step 7" in diverged


def _rank_one_raises() -> None:
    comm = build_communicator("auto")
    if comm.rank == 1:
        raise ValueError("bad shard on rank 1")
    comm.barrier()  # rank 0 would wait forever for rank 1


def test_a_raising_horovod_rank_fails_the_run_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="bad shard on rank 1"):
        _on("horovod", _rank_one_raises, 2, timeout_s=60)
    assert time.monotonic() - start < 60


def _hang_on_rank_zero() -> None:
    comm = build_communicator("auto")
    if comm.rank == 0:
        comm.barrier()  # rank 1 never joins
    else:
        time.sleep(120)


def test_a_hung_horovod_collective_is_stopped() -> None:
    start = time.monotonic()
    with pytest.raises((TimeoutError, RuntimeError)):
        _on("horovod", _hang_on_rank_zero, 2, timeout_s=12)
    assert time.monotonic() - start < 30


def test_launcher_env_picks_the_backend_of_the_launcher() -> None:
    horovod = {"HOROVOD_RANK": "3", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_SIZE": "4"}
    assert launcher_env(horovod) == {
        "launcher": "horovod",
        "rank": 3,
        "local_rank": 1,
        "world_size": 4,
    }
    mpi = {
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_SIZE": "8",
    }
    assert launcher_env(mpi)["launcher"] == "horovod" and launcher_env(mpi)["world_size"] == 8
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert launcher_env(torchrun) == {
        "launcher": "torch",
        "rank": 1,
        "local_rank": 1,
        "world_size": 2,
    }
    assert launcher_env({})["launcher"] == "none"
    with pytest.raises(ValueError, match="horovod"):
        build_communicator("mpi")  # type: ignore[arg-type]


# -- training through the entry point --------------------------------------------------------


@pytest.mark.slow
def test_two_horovod_ranks_train_like_one_rank(tmp_path: Path, data_root: Path) -> None:
    """``launch/horovodrun.sh -np 2 ... distributed=horovod`` ends with the weights of the
    single-process run on the same global batches."""
    extra = ("trainer.max_micro_batch=16",)
    _, single = train(
        [*small_run_overrides(tmp_path / "one", data_root, *extra), "distributed=none"]
    )
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        HOROVODRUN=horovodrun_path() or "horovodrun",
        OMP_NUM_THREADS="1",
        SECONDORDER_COMM_STATS=str(tmp_path / "stats"),
    )
    result = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "horovodrun.sh"),
            "-np",
            "2",
            *small_run_overrides(tmp_path / "two", data_root, *extra),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["accumulation_steps"] == 2
    double = torch.load(tmp_path / "two" / "final_model.pt", weights_only=True)
    for name, tensor in single.items():
        torch.testing.assert_close(double[name], tensor, rtol=1e-5, atol=1e-6)
    # Both ranks counted the same gradient traffic: every parameter once per step, in float32.
    n_params = sum(
        t.numel() for k, t in single.items() if "running" not in k and "num_batches" not in k
    )
    for rank in (0, 1):
        stats = json.loads((tmp_path / "stats" / f"comm_stats.rank{rank}.json").read_text())
        assert stats["backend"] == "horovod" and len(stats["intervals"]) == 12
        for step, interval in enumerate(stats["intervals"], start=1):
            if step % 6:  # not an evaluation step (small_run_overrides: eval_every=6)
                # gradients + the loss, plus the trainer's 4-byte stop flag of every step
                expected = 4 * n_params + 8
                assert interval["all_reduce"]["bytes"] == expected
