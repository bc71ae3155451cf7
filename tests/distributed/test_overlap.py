"""Gradient all-reduce overlapped with backward (``distributed.overlap``).

Single-process checks use a communicator that claims two ranks and records every collective
(identity reduction: both "ranks" hold the same values): the buckets, their order, that they
are launched while backward is still running, that only the closure's gradient pass launches
them (not K-FAC's sampled-target backward, not Hessian-vector products, not a backward after
the closure), unused parameters, float16 loss scaling. Multi-rank checks train every optimizer
preset with overlap on and off on 2 ranks (torch and Horovod) and on 4, bitwise equal.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch
from conftest import compose_config, small_run_overrides
from torch import nn

from secondorder.build import build_model, build_optimizer
from secondorder.config import validate
from secondorder.distributed.comm import build_communicator
from secondorder.distributed.communicator import Communicator, Done
from secondorder.distributed.overlap import GradientReducer, _reverse_buckets
from secondorder.distributed.testing import run_on_horovod_ranks, run_on_ranks
from secondorder.optim import KFAC, BatchClosure, LossScaler, NewtonCG

PRESETS = [
    "sgd",
    "adamw",
    "lamb",
    "lars",
    "kfac",
    "kfac_eigen",
    "kfac_inverse",
    "newton",
    "newton_cg",
    "ggn_cg",
    "curveball",
    "neumann",
]
SMALL_BUCKETS_MB = 2048 / 2**20  # 2 KiB: the MLP's gradient spans several buckets


class RecordingComm(Communicator):
    """Two ranks holding identical values: the average is the identity; records each call."""

    backend = "recording"
    _world = 2

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.calls: list[dict] = []

    def all_reduce(self, tensor: torch.Tensor, *, op: str = "avg", async_op: bool = False):
        caller = sys._getframe(1).f_code.co_name
        if caller == "all_reduce_tensors":  # the non-overlapped path's bucketing
            caller = sys._getframe(2).f_code.co_name
        pending = None
        if self.model is not None:
            pending = [p.grad is None for p in self.model.parameters()]
        self.calls.append({"caller": caller, "numel": tensor.numel(), "grad_missing": pending})
        return Done() if async_op else None

    def gradient_calls(self) -> list[dict]:
        return [c for c in self.calls if c["caller"] in ("_launch", "all_reduce_gradients")]


def _mlp(*sizes: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


class _WithUnused(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.unused = nn.Linear(2, 2).double()  # registered last: first in reverse order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batches(count: int, features: int = 6, classes: int = 3) -> list:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(8, features, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (8,), generator=g),
        )
        for _ in range(count)
    ]


# -- single process -----------------------------------------------------------------------


def test_buckets_follow_reverse_parameter_order_and_cut_at_size_and_dtype() -> None:
    params = [
        torch.zeros(10),  # 40 bytes
        torch.zeros(5),  # 20
        torch.zeros(3, dtype=torch.float64),  # 24
        torch.zeros(4),  # 16
        torch.zeros(30),  # 120: larger than a bucket, alone
    ]
    buckets = _reverse_buckets(params, bucket_bytes=64)
    ids = [[next(i for i, p in enumerate(params) if p is q) for q in b] for b in buckets]
    assert ids == [[4], [3], [2], [1, 0]]


def test_buckets_are_launched_during_the_last_backward_in_reverse_order() -> None:
    model = _mlp(6, 5, 4, 3)  # weights and biases of three layers
    comm = RecordingComm(model)
    closure = BatchClosure(
        model=model,
        micro_batches=_batches(3),
        loss_kind="cross_entropy",
        comm=comm,
        bucket_mb=1e-9,  # one parameter per bucket
    )
    closure()
    grads = comm.gradient_calls()
    # Accumulation is local: one launch per parameter, all from the last micro-batch.
    sizes = [p.numel() for p in model.parameters()]
    assert [c["numel"] for c in grads] == sizes[::-1]
    assert all(c["caller"] == "_launch" for c in grads)
    assert comm.calls[-1]["caller"] == "__call__"  # then the loss, from the closure
    assert len(comm.calls) == len(sizes) + 1


def test_first_bucket_leaves_before_backward_reaches_the_first_layer() -> None:
    model = _mlp(6, 5, 4, 3)
    comm = RecordingComm(model)
    closure = BatchClosure(
        model=model,
        micro_batches=_batches(1),
        loss_kind="cross_entropy",
        comm=comm,
        bucket_mb=1e-9,
    )
    closure()
    first = comm.gradient_calls()[0]
    # Parameters 0, 1 (first layer) had no gradient yet when the last bias was launched.
    assert first["grad_missing"][:2] == [True, True]
    assert first["grad_missing"][-1] is False


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_equals_the_old_path_and_one_process(overlap: bool) -> None:
    reference = _mlp(6, 5, 3)
    BatchClosure(model=reference, micro_batches=_batches(2), loss_kind="cross_entropy")()
    model = _mlp(6, 5, 3)
    comm = RecordingComm()
    closure = BatchClosure(
        model=model,
        micro_batches=_batches(2),
        loss_kind="cross_entropy",
        comm=comm,
        overlap=overlap,
        measure_local_grad=True,
    )
    closure()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    expected = sum(q.grad.pow(2).sum() for q in reference.parameters())
    torch.testing.assert_close(closure.local_grad_sq_norm, expected, rtol=1e-12, atol=0)
    assert closure.comm_wait_s >= 0.0
    caller = "_launch" if overlap else "all_reduce_gradients"
    assert [c["caller"] for c in comm.gradient_calls()] == [caller]  # one 25 MB bucket


def test_unused_parameter_is_flushed_after_backward_and_keeps_no_gradient() -> None:
    model = _WithUnused(_mlp(6, 5, 3))
    unused = model.unused
    comm = RecordingComm(model)
    closure = BatchClosure(
        model=model, micro_batches=_batches(2), loss_kind="cross_entropy", comm=comm, bucket_mb=1e-9
    )
    closure()
    assert unused.weight.grad is None and unused.bias.grad is None
    grads = comm.gradient_calls()
    assert len(grads) == 6  # every bucket once, the unused ones as zeros
    # Strict bucket order: nothing left before backward finished (the unused bucket is first).
    assert all(c["grad_missing"][:4] == [False] * 4 for c in grads)


def test_float16_loss_scaling_unscales_after_the_reduce() -> None:
    reference = _mlp(6, 5, 3)
    BatchClosure(model=reference, micro_batches=_batches(2), loss_kind="cross_entropy")()
    model = _mlp(6, 5, 3)
    closure = BatchClosure(
        model=model,
        micro_batches=_batches(2),
        loss_kind="cross_entropy",
        comm=RecordingComm(),
        loss_scaler=LossScaler(init_scale=1024.0),
        bucket_mb=1e-9,
        measure_local_grad=True,
    )
    closure()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=0)
    expected = sum(q.grad.pow(2).sum() for q in reference.parameters())
    torch.testing.assert_close(closure.local_grad_sq_norm, expected, rtol=1e-12, atol=0)


def test_a_backward_after_the_closure_launches_nothing() -> None:
    model = _mlp(6, 5, 3)
    comm = RecordingComm(model)
    closure = BatchClosure(
        model=model, micro_batches=_batches(1), loss_kind="cross_entropy", comm=comm
    )
    closure()
    before = len(comm.calls)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert len(comm.calls) == before


def test_hooks_are_gone_after_the_gradient_pass() -> None:
    """The armed hooks hold the reducer; once disarmed nothing refers to it any more."""
    model = _mlp(6, 5, 3)
    reducer = GradientReducer(RecordingComm(), list(model.parameters()))
    x, y = _batches(1)[0]
    with reducer.armed():
        nn.functional.cross_entropy(model(x), y).backward()
    reducer.finish()
    alive = weakref.ref(reducer)
    del reducer
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("method", ["kfac_sampled", "newton_cg"])
def test_curvature_passes_launch_no_gradient_all_reduce(method: str) -> None:
    """K-FAC's sampled-target backward and Newton-CG's Hessian-vector products communicate
    their own results, but never a gradient bucket: exactly one gradient all-reduce per
    closure call, however many backward passes a step runs."""
    model = _mlp(6, 5, 3)
    comm = RecordingComm()
    if method == "kfac_sampled":
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.1,
            fisher_type="true",
            factor_update_every=1,
            inverse_update_every=1,
            comm=comm,
        )
    else:
        opt = NewtonCG(model.parameters(), model=model, loss_kind="cross_entropy", comm=comm)
    steps, calls = 3, 0
    for _ in range(steps):
        closure = BatchClosure(
            model=model, micro_batches=_batches(2), loss_kind="cross_entropy", comm=comm
        )
        opt.step(closure)
        calls += closure.evaluations
    buckets = len(GradientReducer(comm, list(model.parameters())).buckets)
    grads = comm.gradient_calls()
    assert [c["caller"] for c in grads] == ["_launch"] * (buckets * calls)
    assert calls == steps
    assert len(comm.calls) > len(grads) + calls  # the method's own collectives did happen


# -- several ranks: every preset, overlap on == off ---------------------------------------


def _micro_batches(step: int, rank: int, world: int) -> list:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 40, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    share = 32 // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    half = share // 2
    return [(x[:half], y[:half]), (x[half:], y[half:])]


def _preset_weights(presets: list[str], steps: int) -> dict:
    """Per preset, the weights after ``steps`` steps with overlap on and with it off."""
    comm = build_communicator("auto")
    out: dict = {}
    for name in presets:
        overrides = [f"optimizer={name}", "model=mlp", "model.hidden=[24,24]"]
        run = validate(compose_config(overrides), world_size=comm.world_size)
        for overlap in (True, False):
            model = build_model(run, torch.device("cpu"), comm)
            opt = build_optimizer(run, model, comm=comm, steps_per_epoch=10)
            local = []
            for step in range(steps):
                closure = BatchClosure(
                    model=model,
                    micro_batches=_micro_batches(step, comm.rank, comm.world_size),
                    loss_kind=run.model.loss,
                    comm=comm,
                    bucket_mb=SMALL_BUCKETS_MB,
                    overlap=overlap,
                    measure_local_grad=True,
                )
                opt.step(closure)
                local.append(closure.local_grad_sq_norm)
            out[(name, overlap)] = [p.detach().clone() for p in model.parameters()]
            out[(name, overlap, "local")] = local
    comm.shutdown()
    return out


def _assert_overlap_equals(results: list[dict], presets: list[str], *, bitwise: bool) -> None:
    for rank_result in results:
        for name in presets:
            on, off = rank_result[(name, True)], rank_result[(name, False)]
            for a, b in zip(on, off, strict=True):
                if bitwise:
                    assert torch.equal(a, b), name
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # Every rank ends with the same weights.
    for name in presets:
        for a, b in zip(results[0][(name, True)], results[-1][(name, True)], strict=True):
            assert torch.equal(a, b), name


def test_one_process_overlap_changes_nothing() -> None:
    results = [_preset_weights(["sgd", "kfac"], steps=2)]
    _assert_overlap_equals(results, ["sgd", "kfac"], bitwise=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_two_ranks_every_preset_overlap_on_equals_off_bitwise(backend: str) -> None:
    """Two ranks: each element is ``a + b`` whichever bucket it travels in, so bitwise."""
    launch = run_on_ranks if backend == "torch" else run_on_horovod_ranks
    kwargs = {"init_group": False} if backend == "torch" else {}
    results = launch(_preset_weights, world_size=2, args=(PRESETS, 3), timeout_s=500, **kwargs)
    _assert_overlap_equals(results, PRESETS, bitwise=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_ranks_every_preset_overlap_on_equals_off() -> None:
    """Four ranks, every preset, bitwise: both paths reduce the same buckets (reverse parameter
    order), so each element is summed in the same place of the same collective. (Rounding
    differences would not do here: GGN-CG's truncated CG turns a change in the gradient's last
    bit into weights 1e-3 apart after one step, 0.1 after three.)"""
    results = run_on_ranks(
        _preset_weights, world_size=4, args=(PRESETS, 3), timeout_s=550, init_group=False
    )
    _assert_overlap_equals(results, PRESETS, bitwise=True)


def _local_norms() -> list:
    """This rank's gradient squared norm before the average, overlap on and off, and by hand."""
    comm = build_communicator("auto")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    micro = [(x.double(), y) for x, y in _micro_batches(0, comm.rank, comm.world_size)]
    out = []
    for overlap in (True, False):
        closure = BatchClosure(
            model=model,
            micro_batches=micro,
            loss_kind="cross_entropy",
            comm=comm,
            bucket_mb=SMALL_BUCKETS_MB,
            overlap=overlap,
            measure_local_grad=True,
        )
        closure()
        out.append(closure.local_grad_sq_norm)
    comm.shutdown()
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_gradient_norm_before_the_average_on_two_ranks() -> None:
    results = run_on_ranks(_local_norms, world_size=2, timeout_s=100, init_group=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    for rank, (on, off) in enumerate(results):
        micro = [(x.double(), y) for x, y in _micro_batches(0, rank, 2)]
        x = torch.cat([m[0] for m in micro])
        y = torch.cat([m[1] for m in micro])
        loss = nn.functional.cross_entropy(model(x), y)  # mean over the rank's whole share
        expected = sum(g.pow(2).sum() for g in torch.autograd.grad(loss, list(model.parameters())))
        torch.testing.assert_close(on, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(off, expected, rtol=1e-12, atol=0)
    assert not torch.equal(results[0][0], results[1][0])  # really each rank's own


# -- through the trainer ----------------------------------------------------------------


def _train_twice(overrides: list[str]) -> dict | None:
    from secondorder.train import run

    weights = {}
    for overlap in ("true", "false"):
        summary = run(compose_config([*overrides[overlap], f"distributed.overlap={overlap}"]))
        if int(os.environ["RANK"]) == 0:
            weights[overlap] = torch.load(
                Path(summary["run_dir"]) / "final_model.pt", weights_only=True
            )
    return weights or None


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_trainer_overlap_option_and_comm_wait_record(tmp_path: Path, data_root: Path) -> None:
    extra = ("optimizer=kfac", "trainer.max_micro_batch=16", "distributed=torch")
    overrides = {
        flag: small_run_overrides(tmp_path / flag, data_root, *extra) for flag in ("true", "false")
    }
    weights = run_on_ranks(_train_twice, world_size=2, args=(overrides,), timeout_s=180)[0]
    for name, tensor in weights["true"].items():
        assert torch.equal(weights["false"][name], tensor), name
    for flag in ("true", "false"):
        lines = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line) for line in lines if "train_loss" in line]
        assert steps and all(r["comm_wait_s"] > 0.0 for r in steps), flag
