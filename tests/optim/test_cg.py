"""Conjugate gradient against dense float64 linear algebra (``torch.linalg.solve``)."""

from __future__ import annotations

import math

import pytest
import torch

from secondorder.optim.cg import conjugate_gradient, martens_preconditioner

DTYPE = torch.float64


def _spd(n: int, *, cond: float = 100.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DTYPE)
    return q @ torch.diag(eig) @ q.T


def _rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _phi(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(0.5 * x @ a @ x - b @ x)


def test_solves_spd_system_like_linalg_solve() -> None:
    a, b = _spd(30), _rhs(30)
    result = conjugate_gradient(lambda v: a @ v, b, max_iters=200, tol=1e-12, progress_eps=None)
    torch.testing.assert_close(result.solution, torch.linalg.solve(a, b), atol=1e-9, rtol=0)
    assert result.reason == "tolerance"
    assert result.relative_residual <= 1e-12
    assert result.iterations <= 60
    # Model values are φ(x) = ½ xᵀAx − bᵀx, decreasing, ending at φ(x*) = −½ bᵀA⁻¹b.
    assert result.model_values[0] == 0.0
    phis = result.model_values
    assert all(x >= y - 1e-12 * abs(y) for x, y in zip(phis, phis[1:], strict=False))
    assert result.model_value == pytest.approx(_phi(a, b, torch.linalg.solve(a, b)), rel=1e-10)


def test_damping_and_preconditioner() -> None:
    a = _spd(25, cond=1e4)
    scale = torch.logspace(-2, 2, 25, dtype=DTYPE)
    a = scale[:, None] * a * scale[None, :]  # badly scaled: a diagonal preconditioner helps
    b, lam = _rhs(25), 0.3
    exact = torch.linalg.solve(a + lam * torch.eye(25, dtype=DTYPE), b)
    plain = conjugate_gradient(
        lambda v: a @ v, b, damping=lam, max_iters=500, tol=1e-11, progress_eps=None
    )
    pre = conjugate_gradient(
        lambda v: a @ v,
        b,
        damping=lam,
        max_iters=500,
        tol=1e-11,
        progress_eps=None,
        preconditioner=torch.diagonal(a) + lam,
    )
    torch.testing.assert_close(plain.solution, exact, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(pre.solution, exact, atol=1e-7, rtol=1e-7)
    assert pre.iterations < plain.iterations
    m = martens_preconditioner(torch.tensor([0.0, 3.0], dtype=DTYPE), 1.0)
    torch.testing.assert_close(m, torch.tensor([1.0, 4.0**0.75], dtype=DTYPE))


def test_warm_start_good_and_bad() -> None:
    a, b = _spd(20), _rhs(20)
    exact = torch.linalg.solve(a, b)
    good = conjugate_gradient(
        lambda v: a @ v, b, x0=exact * 0.95, max_iters=100, tol=1e-12, progress_eps=None
    )
    torch.testing.assert_close(good.solution, exact, atol=1e-9, rtol=0)
    assert good.model_values[0] == pytest.approx(_phi(a, b, exact * 0.95), rel=1e-12)
    assert good.products == good.iterations + 1  # the warm start's residual costs one product
    # φ(−x*) = +3/2 bᵀA⁻¹b > 0: worse than zero, so CG restarts from zero.
    bad = conjugate_gradient(
        lambda v: a @ v, b, x0=-exact, max_iters=100, tol=1e-12, progress_eps=None
    )
    assert bad.model_values[0] == 0.0
    torch.testing.assert_close(bad.solution, exact, atol=1e-9, rtol=0)


def test_negative_curvature_returns_last_good_iterate() -> None:
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0, -4.0], dtype=DTYPE))
    b = torch.tensor([1.0, 1.0, 1.0, 0.3], dtype=DTYPE)
    seen: list[torch.Tensor] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.clone())
        return a @ v

    result = conjugate_gradient(matvec, b, max_iters=50, tol=1e-14)
    assert result.reason == "negative_curvature"
    assert 1 <= result.iterations < 4
    assert torch.isfinite(result.solution).all()
    # The direction that met pᵀAp ≤ 0 is the last one multiplied; the iterate was not moved
    # along it, and the returned point still decreases the model.
    p_last = seen[-1]
    assert float(p_last @ a @ p_last) <= 0.0
    assert result.model_value == pytest.approx(_phi(a, b, result.solution), rel=1e-12)
    assert result.model_value < 0.0
    # Indefinite from the first direction: the zero vector, never a garbage step.
    first = conjugate_gradient(lambda v: a @ v, torch.tensor([0, 0, 0, 1.0], dtype=DTYPE))
    assert first.reason == "negative_curvature" and first.iterations == 0
    assert torch.equal(first.solution, torch.zeros(4, dtype=DTYPE))


def test_relative_progress_stop_and_stored_iterates() -> None:
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=DTYPE))
    a = q @ torch.diag(torch.linspace(1.0, 1e4, 300, dtype=DTYPE)) @ q.T  # slow, steady CG
    b = _rhs(300)
    result = conjugate_gradient(
        lambda v: a @ v, b, max_iters=300, tol=1e-14, progress_eps=5e-4, store_iterates=True
    )
    assert result.reason == "relative_progress"
    i, phis = result.iterations, result.model_values
    k = max(10, math.ceil(0.1 * i))
    assert (phis[i] - phis[i - k]) / phis[i] < k * 5e-4
    for j in range(11, i):  # it did not stop earlier than the criterion allowed
        kj = max(10, math.ceil(0.1 * j))
        assert not (j > kj and (phis[j] - phis[j - kj]) / phis[j] < kj * 5e-4)
    steps = [s for s, _ in result.iterates]
    expected = sorted({math.ceil(1.3**j) for j in range(40) if math.ceil(1.3**j) <= i} | {i})
    assert steps == expected
    for s, x in result.iterates:
        assert phis[s] == pytest.approx(_phi(a, b, x), rel=1e-8)
    assert result.iterates[-1][1] is result.final


def test_zero_rhs_and_validation() -> None:
    result = conjugate_gradient(lambda v: v, torch.zeros(3, dtype=DTYPE))
    assert result.reason == "zero_rhs" and result.iterations == 0
    with pytest.raises(ValueError, match="max_iters"):
        conjugate_gradient(lambda v: v, torch.ones(3), max_iters=0)
