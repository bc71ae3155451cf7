"""Neumann optimizer (Krishnan, Xiao & Saurous 2018) against explicit float64 references.

The references are written here: the truncated Neumann series with ``torch.linalg.matrix_power``,
the regularised objective ``ĝ`` of Section 3.1 differentiated by autograd, and Algorithm 2 as a
loop over flat vectors.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from float64_problems import DTYPE, Float64Closure, flat_params, tiny_mlp, unflat_params
from torch import nn
from torch.func import functional_call, grad

from secondorder.distributed.testing import run_on_ranks
from secondorder.optim import build_optimizer
from secondorder.optim.neumann import (
    Neumann,
    idealized_neumann_step,
    neumann_momentum,
    regularizer_coefficient,
)


def _batches(
    n_steps: int, batch: int = 8, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fresh mini-batch per step (Algorithm 2's stochastic inner loop)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 4, generator=gen, dtype=DTYPE),
            torch.randn(batch, 3, generator=gen, dtype=DTYPE),
        )
        for _ in range(n_steps)
    ]


def _run(opt: torch.optim.Optimizer, model: nn.Module, batches, comm=None) -> list[torch.Tensor]:
    history = []
    for x, y in batches:
        opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="mse", comm=comm))
        history.append(flat_params(model))
    return history


# ------------------------------------------------------------------------------ Algorithm 1


def test_idealized_iteration_is_the_truncated_neumann_series_and_tends_to_newton() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DTYPE))
    hessian = q @ torch.diag(torch.tensor([0.5, 0.7, 1.0, 2.0, 3.0, 4.0], dtype=DTYPE)) @ q.T
    b = torch.randn(6, generator=gen, dtype=DTYPE)
    w = torch.randn(6, generator=gen, dtype=DTYPE)

    def gradient_at(u: torch.Tensor) -> torch.Tensor:  # f(u) = ½ uᵀHu - bᵀu: one fixed batch
        return hessian @ u - b

    g = gradient_at(w)
    eta = 0.2  # < 1 / λ_max = 0.25
    # Equation 4 with A = ηH, b = -∇f: m_K = -Σ_{i=0}^{K} (I - ηH)^i ∇f.
    k = 5
    richardson = torch.eye(6, dtype=DTYPE) - eta * hessian
    series = sum(torch.linalg.matrix_power(richardson, i) for i in range(k + 1))
    step = idealized_neumann_step(gradient_at, w, inner_lr=eta, outer_lr=1.0, inner_steps=k) - w
    torch.testing.assert_close(step, -series @ g, rtol=1e-12, atol=1e-12)
    # K → ∞ with η_out = η_in: the Newton step -H^{-1} ∇f (error ~ 0.9^K).
    newton = -torch.linalg.solve(hessian, g)
    w_next = idealized_neumann_step(gradient_at, w, inner_lr=eta, outer_lr=eta, inner_steps=300)
    torch.testing.assert_close(w_next - w, newton, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(-eta * g, newton, atol=1e-3)  # the test can tell SGD from Newton


# ------------------------------------------------------------------------------ equation 8


def test_regularizer_gradient_matches_autograd_of_the_regularised_objective() -> None:
    gen = torch.Generator().manual_seed(3)
    w, v = torch.randn(7, generator=gen, dtype=DTYPE), torch.randn(7, generator=gen, dtype=DTYPE)
    alpha, beta = 0.7, 0.05

    def regulariser(u: torch.Tensor) -> torch.Tensor:  # ĝ - f̂, Section 3.1
        r = torch.linalg.vector_norm(u - v)
        return alpha / 3 * r**3 + beta / r

    coefficient = regularizer_coefficient(((w - v) ** 2).sum(), alpha=alpha, beta=beta)
    torch.testing.assert_close(coefficient * (w - v), grad(regulariser)(w), rtol=1e-12, atol=0)
    zero = regularizer_coefficient(torch.zeros((), dtype=DTYPE), alpha=alpha, beta=beta)
    assert zero.item() == 0.0  # undefined at w = v: no regulariser force


def test_momentum_schedule_table1() -> None:
    mus = [neumann_momentum(s, steps_per_epoch=10, mu_min=0.5, mu_max=0.9) for s in range(120)]
    assert mus[0] == 0.5
    assert mus[10] == pytest.approx(1 - 1 / 3)  # t = 2 epochs
    assert mus[80] == pytest.approx(0.9) and max(mus) == pytest.approx(0.9)
    assert all(a <= b for a, b in zip(mus, mus[1:], strict=False))


# ------------------------------------------------------------------------------ Algorithm 2


def _reference_algorithm2(model, batches, *, lr, alpha, beta, gamma, warmup, reset, spe):
    """Algorithm 2 on flat vectors, ∇ĝ by autograd; returns weights per step and w - μm."""

    def loss(u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((functional_call(model, unflat_params(model, u), (x,)) - y) ** 2).mean()

    w = flat_params(model).clone()
    v, m = w.clone(), torch.zeros_like(w)
    interval, next_reset, mu = reset, 0, 0.0
    history = []
    for k, (x, y) in enumerate(batches):
        if k < warmup:
            w = w - lr * grad(loss)(w, x, y)
            history.append(w)
            continue
        s = k - warmup
        mu = min(0.9, max(0.5, 1 - 1 / (2 + s / spe)))
        if s == next_reset:
            d = grad(loss)(w, x, y)
            m = -lr * d
            next_reset, interval = next_reset + interval, 2 * interval
        else:
            v_now = v.clone()

            def regularised(u: torch.Tensor, x=x, y=y, v_now=v_now) -> torch.Tensor:
                r = torch.linalg.vector_norm(u - v_now)
                return loss(u, x, y) + alpha / 3 * r**3 + beta / r

            d = grad(regularised)(w)
            m = mu * m - lr * d
        w = w + mu * m - lr * d
        v = w + gamma * (v - w)
        history.append(w)
    return history, w - mu * m


def test_algorithm2_matches_explicit_reference_through_warmup_resets_and_doubling() -> None:
    model = tiny_mlp()
    n = sum(p.numel() for p in model.parameters())
    batches = _batches(14)
    hyper = dict(lr=0.05, alpha=0.3, gamma=0.9)
    expected, returned = _reference_algorithm2(
        tiny_mlp(), batches, beta=1e-3 * n, warmup=2, reset=2, spe=3, **hyper
    )
    opt = Neumann(
        model.parameters(),
        beta_per_variable=1e-3,
        warmup_steps=2,
        reset_steps=2,
        steps_per_epoch=3,
        **hyper,
    )
    history = _run(opt, model, batches)
    for got, want in zip(history, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    # Resets at Neumann steps 0, 2, 6 (K = 2, 4, 8): the regulariser is active in between.
    assert opt.state_dict()["global_state"]["next_reset"] == 14
    assert opt.global_state["reset_interval"] == 16
    before = flat_params(model)
    with opt.evaluation_weights():
        torch.testing.assert_close(flat_params(model), returned, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(flat_params(model), before)
    assert torch.equal(flat_params(model), before)  # the displaced iterate is restored bitwise


def test_reduces_to_sgd_without_regularisers_and_momentum() -> None:
    batches = _batches(9)
    model, ref_model = tiny_mlp(), tiny_mlp()
    opt = Neumann(
        model.parameters(),
        lr=0.1,
        alpha=0.0,
        beta_per_variable=0.0,
        momentum=0.0,
        warmup_steps=2,
        reset_steps=3,
    )
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for got, want in zip(_run(opt, model, batches), _run(sgd, ref_model, batches), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


def test_resume_is_bitwise() -> None:
    batches = _batches(12)
    kwargs = dict(lr=0.05, alpha=0.01, beta_per_variable=1e-4, warmup_steps=2, reset_steps=2)
    model = tiny_mlp()
    opt = Neumann(model.parameters(), **kwargs)
    _run(opt, model, batches[:3])
    with opt.evaluation_weights():  # an evaluation in between must not perturb training
        pass
    _run(opt, model, batches[3:6])
    checkpoint = _save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    straight = _run(opt, model, batches[6:])

    resumed_model = tiny_mlp(seed=5)
    resumed = Neumann(resumed_model.parameters(), **kwargs)
    payload = _load(checkpoint)
    resumed_model.load_state_dict(payload["model"])
    resumed.load_state_dict(payload["optimizer"])
    for got, want in zip(_run(resumed, resumed_model, batches[6:]), straight, strict=True):
        assert torch.equal(got, want)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        for key in ("neumann_iterate", "moving_average"):
            assert torch.equal(opt.state[p][key], resumed.state[q][key])
    assert resumed.global_state == opt.global_state


DISTRIBUTED_HYPER = dict(lr=0.05, alpha=0.01, beta_per_variable=1e-4, warmup_steps=1, reset_steps=2)


def _ranks_body(batches, world_size: int) -> torch.Tensor:
    from secondorder.distributed.comm import TorchComm

    comm = TorchComm()
    share = batches[0][0].shape[0] // world_size
    local = [
        (
            x[comm.rank * share : (comm.rank + 1) * share],
            y[comm.rank * share : (comm.rank + 1) * share],
        )
        for x, y in batches
    ]
    model = tiny_mlp()
    opt = Neumann(model.parameters(), **DISTRIBUTED_HYPER)
    return _run(opt, model, local, comm=comm)[-1]


def test_one_and_two_ranks_take_the_same_steps() -> None:
    batches = _batches(6)
    model = tiny_mlp()
    opt = Neumann(model.parameters(), **DISTRIBUTED_HYPER)
    single = _run(opt, model, batches)[-1]
    results = run_on_ranks(_ranks_body, world_size=2, args=(batches, 2), timeout_s=240)
    for result in results:
        torch.testing.assert_close(result, single, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"gamma": 1.0}, "gamma"),
        ({"alpha": -1.0}, "alpha"),
        ({"mu_min": 0.9, "mu_max": 0.5}, "mu_min"),
        ({"reset_steps": 0}, "reset_steps"),
        ({"warmup_steps": -2}, "warmup_steps"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Neumann(tiny_mlp().parameters(), **{"lr": 0.1, **kwargs})


def test_registry_converts_epochs_to_steps() -> None:
    context = SimpleNamespace(model=None, loss_kind="mse", comm=None, steps_per_epoch=10)
    opt = build_optimizer(
        "neumann", tiny_mlp().parameters(), context, lr=0.05, warmup_epochs=0.5, reset_epochs=2.0
    )
    assert (opt.warmup_steps, opt.reset_steps, opt.steps_per_epoch) == (5, 20, 10)
    opt = build_optimizer(
        "neumann", tiny_mlp().parameters(), context, lr=0.05, warmup_steps=3, reset_steps=7
    )
    assert (opt.warmup_steps, opt.reset_steps) == (3, 7)
    n = sum(p.numel() for p in tiny_mlp().parameters())
    assert opt.param_groups[0]["beta_per_variable"] * n == pytest.approx(1e-5 * n)
