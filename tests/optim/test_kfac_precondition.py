"""K-FAC preconditioning against explicit Kronecker solves (float64), doubly-factored layers,
and the LPT inversion assignment.

``vec`` is column-major: ``vec(∇W̄) = ∇W̄.T.reshape(-1)``, so ``A ⊗ G`` is ``torch.kron(A, G)``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac.assignment import build_assignment, lpt_assign
from secondorder.optim.kfac.layers import find_layers
from secondorder.optim.losses import loss_value

DTYPE = torch.float64


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its ``outputs.float()`` cast, which rounds float64 to float32."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)


def _one_step(model, x, y, **kw):
    """A single step with lr 1, no momentum/clipping: returns (optimizer, V per parameter)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        factor_update_every=1,
        inverse_update_every=1,
        fisher_type="empirical",
        **kw,
    )
    opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    return opt, [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def _vec(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    m = weight_grad.reshape(weight_grad.shape[0], -1)
    if bias_grad is not None:
        m = torch.cat([m, bias_grad.unsqueeze(1)], dim=1)
    return m.T.reshape(-1)


def _pi(a: torch.Tensor, g: torch.Tensor) -> float:
    return math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


def _data(n=10, d=3, classes=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=DTYPE), torch.randint(
        0, classes, (n,), generator=gen
    )


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_preconditioned_gradient_equals_the_explicit_kronecker_solve(method: str) -> None:
    model, (x, y), lam = _mlp(), _data(), 0.1
    opt, v = _one_step(model, x, y, damping=lam, inverse_method=method)
    for index, layer in enumerate([model[0], model[2]]):
        state = opt.state[layer.weight]
        a, g = state["A"], state["G"]
        grad = _vec(layer.weight.grad, layer.bias.grad)
        if method == "inverse":
            pi, root = _pi(a, g), math.sqrt(lam)
            damped = torch.kron(
                a + pi * root * torch.eye(len(a), dtype=DTYPE),
                g + root / pi * torch.eye(len(g), dtype=DTYPE),
            )
            expected = torch.linalg.solve(damped, grad)
        else:
            eye = torch.eye(len(a) * len(g), dtype=DTYPE)
            expected = torch.linalg.solve(torch.kron(a, g) + lam * eye, grad)
            # The same through the Kronecker eigenbasis written out explicitly.
            d_a, q_a = torch.linalg.eigh(a)
            d_g, q_g = torch.linalg.eigh(g)
            q = torch.kron(q_a, q_g)
            explicit = q @ torch.diag(1 / (torch.kron(d_a, d_g) + lam)) @ q.T @ grad
            torch.testing.assert_close(explicit, expected, rtol=1e-9, atol=1e-12)
        got = _vec(v[2 * index], v[2 * index + 1])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def _rank_one(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """√σ₁u₁ and √σ₁v₁ of every matrix, by an explicit SVD in a loop."""
    ks, psis = [], []
    for m in matrices:
        u, s, vh = torch.linalg.svd(m)
        ks.append(s[0].sqrt() * u[:, 0])
        psis.append(s[0].sqrt() * vh[0])
    return torch.stack(ks), torch.stack(psis)


def _second_moment(rows: torch.Tensor) -> torch.Tensor:
    return sum(torch.outer(r, r) for r in rows) / rows.shape[0]


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_doubly_factored_linear_equals_its_definition(method: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 3)).to(DTYPE)
    (x, y), lam = _data(n=7, d=12, classes=3), 0.05
    opt, v = _one_step(model, x, y, damping=lam, inverse_method=method, double_factor_threshold=8)
    state = opt.state[model[0].weight]
    assert "A" not in state and state["K"].shape == (4, 4) and state["Psi"].shape == (3, 3)
    k_rows, psi_rows = _rank_one(x.reshape(7, 4, 3))  # 12 = 4 x 3, row-major
    k, psi, g = _second_moment(k_rows), _second_moment(psi_rows), state["G"]
    torch.testing.assert_close(state["K"], k, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["Psi"], psi, rtol=1e-10, atol=1e-12)
    grad = _vec(model[0].weight.grad, model[0].bias.grad)
    # A ≈ blockdiag(K ⊗ Ψ, 1): the homogeneous coordinate's block kept, cross terms dropped.
    if method == "eigen":
        a = torch.block_diag(torch.kron(k, psi), torch.ones(1, 1, dtype=DTYPE))
        eye = torch.eye(13 * 3, dtype=DTYPE)
        expected = torch.linalg.solve(torch.kron(a, g) + lam * eye, grad)
    else:
        eye = lambda n: torch.eye(n, dtype=DTYPE)  # noqa: E731
        trace_a = torch.trace(k) * torch.trace(psi) + 1
        pi = math.sqrt((trace_a / 13) / (torch.trace(g) / 3))
        gamma = pi * math.sqrt(lam)
        pi2 = math.sqrt((torch.trace(k) / 4) / (torch.trace(psi) / 3))
        a_damped = torch.block_diag(
            torch.kron(k + pi2 * math.sqrt(gamma) * eye(4), psi + math.sqrt(gamma) / pi2 * eye(3)),
            torch.full((1, 1), 1 + gamma, dtype=DTYPE),
        )
        g_damped = g + math.sqrt(lam) / pi * eye(3)
        expected = torch.linalg.solve(torch.kron(a_damped, g_damped), grad)
    torch.testing.assert_close(_vec(v[0], v[1]), expected, rtol=1e-9, atol=1e-12)


def test_doubly_factored_conv_uses_channel_by_offset_patches() -> None:
    torch.manual_seed(3)
    conv = nn.Conv1d(4, 2, 3, bias=False).to(DTYPE)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 4, 3)).to(DTYPE)
    x, y = torch.randn(5, 4, 6, dtype=DTYPE), torch.randint(0, 3, (5,))
    opt, _ = _one_step(model, x, y, double_factor_threshold=9)
    patches = torch.stack([x[:, :, t : t + 3] for t in range(4)], dim=1).reshape(20, 4, 3)
    k_rows, psi_rows = _rank_one(patches)
    state = opt.state[conv.weight]
    torch.testing.assert_close(state["K"], _second_moment(k_rows), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["Psi"], _second_moment(psi_rows), rtol=1e-10, atol=1e-12)
    assert "A" in opt.state[model[2].weight]  # dim A = 8 inputs + bias = 9: not above it


def test_double_factor_threshold_compares_the_a_factor_dimension() -> None:
    # dim A = in_features + 1 with a bias (the homogeneous coordinate), in_features without.
    for bias, doubled in ((True, True), (False, False)):  # 8 + 1 > 8; 8 is not above 8
        model = nn.Linear(8, 3, bias=bias)
        (layer,) = find_layers(model, model.parameters(), double_factor_threshold=8)
        assert (layer.double_shape is not None) == doubled


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_large_layer_never_forms_a_full_input_factor(method, monkeypatch) -> None:
    """A stand-in for a 9216x4096 Linear: no square matrix above the threshold is decomposed
    or stored (in = 144 = 12 x 12, threshold 32, out = 32)."""
    seen: list[tuple[int, ...]] = []
    for name in ("eigh", "inv"):
        original = getattr(torch.linalg, name)

        def spy(matrix, *args, _original=original, **kwargs):
            seen.append(tuple(matrix.shape))
            return _original(matrix, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, spy)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(144, 32)).to(DTYPE)
    x, y = torch.randn(16, 144, dtype=DTYPE), torch.randint(0, 32, (16,))
    opt, v = _one_step(model, x, y, inverse_method=method, double_factor_threshold=32)
    state = opt.state[model[0].weight]
    shapes = {key: tuple(t.shape) for key, t in state.items()}
    assert shapes["K"] == (12, 12) and shapes["Psi"] == (12, 12) and shapes["G"] == (32, 32)
    assert "A" not in shapes
    assert all(t.numel() <= 32 * 32 for t in state.values())
    assert seen and all(max(shape[-2:]) <= 32 for shape in seen)
    assert all(torch.isfinite(t).all() for t in v)


def test_lpt_assignment_balances_cost() -> None:
    # The textbook LPT example: 8→r0, 7→r1, 6→r1, 5→r0, 4→r0 (tie, lower rank).
    assert lpt_assign([5.0, 8.0, 4.0, 7.0, 6.0], 2) == [0, 0, 0, 1, 1]
    gen = torch.Generator().manual_seed(0)
    for world in (2, 3):
        for _ in range(20):
            costs = [float(c) for c in torch.randint(1, 100, (7,), generator=gen)]
            owners = lpt_assign(costs, world)
            loads = [
                sum(c for c, r in zip(costs, owners, strict=True) if r == k) for k in range(world)
            ]
            best = min(
                max(
                    sum(c for c, r in zip(costs, assign, strict=True) if r == k)
                    for k in range(world)
                )
                for assign in itertools.product(range(world), repeat=7)
            )
            assert max(loads) <= (4 / 3 - 1 / (3 * world)) * best + 1e-9  # Graham's bound


def test_assignment_modes() -> None:
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10), nn.Linear(10, 5))
    layers = find_layers(model, model.parameters(), double_factor_threshold=4096)
    per_factor = build_assignment(layers, world_size=2, memory_optimal=False)
    assert per_factor.layer_owner is None
    assert per_factor.factor_owner[(0, "A")] != per_factor.factor_owner[(0, "G")]  # 31³ vs 21³
    assert max(per_factor.loads) == 31**3 and sum(per_factor.loads) == sum(
        n**3 for layer in layers for n in layer.factor_dims().values()
    )
    per_layer = build_assignment(layers, world_size=2, memory_optimal=True)
    assert per_layer.layer_owner is not None
    for (index, _), rank in per_layer.factor_owner.items():
        assert rank == per_layer.layer_owner[index]  # a layer's factors stay together
