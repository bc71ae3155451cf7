"""The gradient noise scale meter against closed forms on float64 linear regression, on one process
(micro-batches) and on 2 ranks, and its wiring into the trainer (metrics, config, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, small_run_overrides, train
from torch import nn

from secondorder.config import ConfigError, validate
from secondorder.distributed.testing import run_on_horovod_ranks, run_on_ranks
from secondorder.optim.closure import BatchClosure
from secondorder.trainer.noise_scale import NoiseScaleMeter, estimates

# Linear regression y = w*·x + ε, x ~ N(0, I_d), ε ~ N(0, σ²), per-example loss (w·x - y)² at a
# fixed parameter w = w* + δ. The per-example gradient is g = 2(δ·x - ε)x, so G = 2δ and (Isserlis)
# Σ = E[g gᵀ] - G Gᵀ = 4(|δ|² I + δ δᵀ + σ² I): tr(Σ) = 4((d + 1)|δ|² + d σ²), |G|² = 4|δ|².
DIM, SIGMA = 4, 1.0
W_STAR = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
DELTA = torch.tensor([0.6, -0.8, 0.0, 0.0], dtype=torch.float64)  # |δ|² = 1
GRAD_SQ = 4 * float(DELTA @ DELTA)
TRACE = 4 * ((DIM + 1) * float(DELTA @ DELTA) + DIM * SIGMA**2)
B_SIMPLE = TRACE / GRAD_SQ  # 9


def _batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, dtype=torch.float64, generator=generator)
    noise = SIGMA * torch.randn(n, dtype=torch.float64, generator=generator)
    return x, (x @ W_STAR + noise).unsqueeze(1)


def _model() -> nn.Linear:
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((W_STAR + DELTA).unsqueeze(0))
    return model


def test_estimates_invert_the_expected_norms() -> None:
    """E|g_B|² = |G|² + tr(Σ)/B at both sizes gives back |G|² and tr(Σ) exactly."""
    small, big = 8, 64
    grad_sq, trace = estimates(
        GRAD_SQ + TRACE / small, GRAD_SQ + TRACE / big, small_batch=small, big_batch=big
    )
    assert grad_sq == pytest.approx(GRAD_SQ, rel=1e-12)
    assert trace == pytest.approx(TRACE, rel=1e-12)
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        estimates(1.0, 1.0, small_batch=8, big_batch=8)


def test_estimates_are_unbiased() -> None:
    """The mean of many single-step estimates (no smoothing) is |G|² and tr(Σ), within 4 standard
    errors; the plain ratio of one step's estimates is not what is averaged."""
    generator = torch.Generator().manual_seed(0)
    small, ranks, draws = 4, 4, 20000
    x = torch.randn(draws, ranks, small, DIM, dtype=torch.float64, generator=generator)
    noise = SIGMA * torch.randn(draws, ranks, small, dtype=torch.float64, generator=generator)
    per_example = 2 * ((x @ DELTA) - noise).unsqueeze(-1) * x  # (draws, ranks, small, DIM)
    g_small = per_example.mean(2)
    g_big = g_small.mean(1)
    s = (g_small**2).sum(-1).mean(1)
    b = (g_big**2).sum(-1)
    grad_sq, trace = estimates(s, b, small_batch=small, big_batch=small * ranks)
    for values, expected in ((grad_sq, GRAD_SQ), (trace, TRACE)):
        error = values.std().item() / math.sqrt(draws)
        assert abs(values.mean().item() - expected) < 4 * error, (values.mean(), expected)
        assert error < 0.05 * expected  # the check has teeth


def test_closure_measures_what_the_meter_reads() -> None:
    """Per-micro-batch and local squared norms equal those of gradients computed one by one."""
    generator = torch.Generator().manual_seed(1)
    micro = [_batch(5, generator) for _ in range(3)]
    model = _model()
    closure = BatchClosure(
        model=model,
        micro_batches=micro,
        loss_kind="mse",
        measure_local_grad=True,
        measure_micro_grads=True,
    )
    closure()
    expected = []
    for x, y in micro:
        (grad,) = torch.autograd.grad(((model(x) - y) ** 2).mean(), model.weight)
        expected.append(grad)
    torch.testing.assert_close(
        closure.micro_grad_sq_norms, torch.stack([(g**2).sum() for g in expected])
    )
    mean = torch.stack(expected).mean(0)
    torch.testing.assert_close(closure.local_grad_sq_norm, (mean**2).sum())
    torch.testing.assert_close(closure.global_grad_sq_norm, (mean**2).sum())
    plain = BatchClosure(model=model, micro_batches=micro, loss_kind="mse")
    plain()
    assert plain.local_grad_sq_norm is None and plain.micro_grad_sq_norms is None


def _measure(meter: NoiseScaleMeter, steps: int, micro: int, count: int, seed: int, comm=None):
    """``steps`` closures at the fixed parameter (lr = 0), each on fresh data."""
    generator = torch.Generator().manual_seed(seed)
    model = _model()
    for _ in range(steps):
        closure = BatchClosure(
            model=model,
            micro_batches=[_batch(micro, generator) for _ in range(count)],
            loss_kind="mse",
            comm=comm,
            **meter.closure_options(),
        )
        closure()
        meter.update_from_closure(closure, comm)
    return meter.record()


def test_meter_converges_on_one_process_with_micro_batches() -> None:
    meter = NoiseScaleMeter(small_batch=4, big_batch=16, smoothing=0.999, source="micro_batch")
    record = _measure(meter, steps=3000, micro=4, count=4, seed=2)
    assert record["noise_scale"] == pytest.approx(B_SIMPLE, rel=0.08)
    assert record["noise_scale_grad_sq"] == pytest.approx(GRAD_SQ, rel=0.08)
    assert record["noise_scale_trace"] == pytest.approx(TRACE, rel=0.05)


def _meter_on_rank(steps: int) -> dict[str, float]:
    from secondorder.distributed.comm import build_communicator

    comm = build_communicator("auto")
    meter = NoiseScaleMeter(small_batch=8, big_batch=16, smoothing=0.999, source="rank")
    # Each rank draws its own examples: the two halves of every global batch are independent.
    record = _measure(meter, steps=steps, micro=8, count=1, seed=10 + comm.rank, comm=comm)
    comm.shutdown()
    return record


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_meter_converges_on_two_ranks() -> None:
    first, second = run_on_ranks(
        _meter_on_rank, world_size=2, args=(3000,), timeout_s=150, init_group=False
    )
    assert first == second  # every rank holds the same estimate
    assert first["noise_scale"] == pytest.approx(B_SIMPLE, rel=0.08)
    assert first["noise_scale_grad_sq"] == pytest.approx(GRAD_SQ, rel=0.08)
    assert first["noise_scale_trace"] == pytest.approx(TRACE, rel=0.05)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_horovod_ranks_measure_what_torch_ranks_do() -> None:
    torch_ranks = run_on_ranks(
        _meter_on_rank, world_size=2, args=(100,), timeout_s=120, init_group=False
    )
    horovod_ranks = run_on_horovod_ranks(_meter_on_rank, world_size=2, args=(100,), timeout_s=120)
    assert horovod_ranks[0] == horovod_ranks[1]
    for key, value in torch_ranks[0].items():
        assert horovod_ranks[0][key] == pytest.approx(value, rel=1e-12), key


def test_meter_state_round_trips() -> None:
    meter = NoiseScaleMeter(small_batch=4, big_batch=16, smoothing=0.5)
    for s, b in ((3.0, 1.0), (5.0, 2.0), (4.0, 1.5)):
        meter.update(s, b)
    again = NoiseScaleMeter(small_batch=4, big_batch=16, smoothing=0.5)
    again.load_state_dict(meter.state_dict())
    assert again.record() == meter.record()
    assert NoiseScaleMeter(small_batch=4, big_batch=16).record() == {}
    # Bias correction: after one measurement the average is that measurement.
    one = NoiseScaleMeter(small_batch=4, big_batch=16, smoothing=0.9)
    one.update(3.0, 1.0)
    grad_sq, trace = estimates(3.0, 1.0, small_batch=4, big_batch=16)
    assert one.record()["noise_scale"] == pytest.approx(trace / grad_sq)


def test_trainer_logs_noise_scale_and_resumes_it(tmp_path: Path, data_root: Path) -> None:
    """One process, 4 micro-batches of 16: records at log steps carry the meter's values, and a
    run resumed from a checkpoint logs exactly what the uninterrupted run does."""
    extra = (
        "optimizer=sgd",
        "trainer.max_micro_batch=16",
        "trainer.noise_scale_every=2",
        "trainer.checkpoint_every=6",
    )
    train(small_run_overrides(tmp_path / "straight", data_root, *extra))
    train(small_run_overrides(tmp_path / "split", data_root, *extra, "trainer.max_steps=6"))
    train(small_run_overrides(tmp_path / "split", data_root, *extra, "trainer.resume=auto"))
    runs = {}
    for run in ("straight", "split"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        runs[run] = [
            {k: v for k, v in json.loads(line).items() if k.startswith("noise_scale")}
            | {"step": json.loads(line)["step"]}
            for line in lines
            if "train_loss" in json.loads(line)
        ]
    straight = runs["straight"]
    assert [r["step"] for r in straight] == [3, 6, 9, 12]
    for r in straight:
        assert set(r) == {"step", "noise_scale", "noise_scale_grad_sq", "noise_scale_trace"}
        assert r["noise_scale"] == pytest.approx(r["noise_scale_trace"] / r["noise_scale_grad_sq"])
    assert runs["split"] == straight


def _train_on_rank(overrides: list[str]) -> None:
    from secondorder.train import run

    run(compose_config(overrides))


def _noise_records(run_dir: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "noise_scale" in r]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_measure_what_one_process_does(tmp_path: Path, data_root: Path) -> None:
    """Rank r's share of a global batch is the r-th micro-batch of one process with the same
    split, so the per-rank estimate on 2 ranks equals the micro-batch estimate on one; the
    measurement costs 2 ranks one float64 scalar all-reduce per step beyond gradients and loss."""
    extra = ("optimizer=sgd", "trainer.max_micro_batch=32", "trainer.noise_scale_every=1")
    _, weights = train(small_run_overrides(tmp_path / "one", data_root, *extra))
    overrides = small_run_overrides(tmp_path / "two", data_root, *extra, "distributed=torch")
    run_on_ranks(_train_on_rank, world_size=2, args=(overrides,), timeout_s=150)
    one, two = _noise_records(tmp_path / "one"), _noise_records(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 6, 9, 12]
    for a, b in zip(one, two, strict=True):
        for key in ("noise_scale", "noise_scale_grad_sq", "noise_scale_trace"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    gradient_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    assert [r["comm_bytes"] for r in two] == [float(gradient_bytes + 4 + 8)] * 4


def test_noise_scale_without_a_small_batch_is_a_config_error() -> None:
    one_micro_batch = ["trainer.noise_scale_every=5", "data.batch_size=64"]
    with pytest.raises(ConfigError, match=r"^trainer.noise_scale_every: .* one micro-batch"):
        validate(compose_config([*one_micro_batch, "trainer.max_micro_batch=64"]))
    # Two ranks or two micro-batches give the small batch.
    assert validate(compose_config(one_micro_batch), world_size=2).trainer.noise_scale_every == 5
    validate(compose_config([*one_micro_batch, "trainer.max_micro_batch=32"]))
    with pytest.raises(ConfigError, match="trainer.noise_scale_every: must be zero or positive"):
        validate(compose_config(["trainer.noise_scale_every=-1"]))
    with pytest.raises(ConfigError, match="trainer.noise_scale_smoothing: must be in"):
        validate(compose_config(["trainer.noise_scale_smoothing=1.0"]))
