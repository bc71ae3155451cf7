"""Tests for the LARS and LAMB optimizers against hand-written float64 references."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from secondorder.optim.lamb import LAMB
from secondorder.optim.lars import LARS

DTYPE = torch.float64


def _model(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(5, 3, bias=True).to(DTYPE)


def _grads(n_steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Fixed random gradients for (weight, bias) of a Linear(5, 3), one pair per step."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(3, 5, generator=gen, dtype=DTYPE),
            torch.randn(3, generator=gen, dtype=DTYPE),
        ]
        for _ in range(n_steps)
    ]


def _norm(x: list[float]) -> float:
    return math.sqrt(sum(v * v for v in x))


def _flat(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().reshape(-1)]


def _run(opt: torch.optim.Optimizer, model: nn.Module, grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _train_on_quadratic(opt: torch.optim.Optimizer, model: nn.Module, *, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        _quadratic_loss(model).backward()
        opt.step()


def _quadratic_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return torch.randn(8, 5, generator=gen, dtype=DTYPE), torch.randn(
        8, 3, generator=gen, dtype=DTYPE
    )


def _quadratic_loss(model: nn.Linear) -> torch.Tensor:
    x, y = _quadratic_data()
    return ((model(x) - y) ** 2).mean()


# ----------------------------------------------------------------------------- references


GradFn = Callable[[int, list[list[float]]], list[list[float]]]


def _reference(ref: Callable[..., list[list[float]]], model: nn.Module, *args, **kwargs):
    """``ref`` (a hand-written algorithm on lists) from the model's initial parameters."""
    params = list(model.parameters())
    return ref([_flat(p) for p in params], [p.ndim for p in params], *args, **kwargs)


def _fixed(grads: list[list[torch.Tensor]]) -> tuple[GradFn, int]:
    """Reference gradient function returning pre-drawn gradients, and the number of steps."""
    flat = [[_flat(g) for g in sg] for sg in grads]
    return (lambda t, w: flat[t]), len(flat)


def _quadratic_grad(w: list[list[float]]) -> list[list[float]]:
    """Gradient of ``mean((x W^T + b - y)^2)`` written out with explicit loops."""
    x, y = _quadratic_data()
    xs, ys = x.tolist(), y.tolist()
    n, n_out, n_in = len(xs), 3, 5
    weight, bias = w
    g_w, g_b = [0.0] * (n_out * n_in), [0.0] * n_out
    for s in range(n):
        for o in range(n_out):
            pred = bias[o] + sum(weight[o * n_in + k] * xs[s][k] for k in range(n_in))
            e = 2.0 * (pred - ys[s][o]) / (n * n_out)
            g_b[o] += e
            for k in range(n_in):
                g_w[o * n_in + k] += e * xs[s][k]
    return [g_w, g_b]


def _ref_lars(
    params: list[list[float]],
    ndims: list[int],
    grad_fn: GradFn,
    n_steps: int,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust: float,
    eps: float,
    nesterov: bool,
    exclude_1d: bool,
) -> list[list[float]]:
    """Scalar-loop reference for You, Gitman & Ginsburg 2017, Algorithm 1."""
    w = [list(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    for t in range(n_steps):
        for i, g in enumerate(grad_fn(t, w)):
            if exclude_1d and ndims[i] <= 1:
                local, wd = 1.0, 0.0
            else:
                wd = weight_decay
                wn, gn = _norm(w[i]), _norm(g)
                local = trust * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
            for j in range(len(w[i])):
                d = lr * local * (g[j] + wd * w[i][j])
                v[i][j] = momentum * v[i][j] + d
                w[i][j] -= momentum * v[i][j] + d if nesterov else v[i][j]
    return w


def _ref_lamb(
    params: list[list[float]],
    ndims: list[int],
    grad_fn: GradFn,
    n_steps: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    max_trust_ratio: float | None,
    exclude_1d: bool,
) -> list[list[float]]:
    """Scalar-loop reference for You et al. 2020, Algorithm 2."""
    b1, b2 = betas
    w = [list(p) for p in params]
    m = [[0.0] * len(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    for t in range(1, n_steps + 1):
        for i, g in enumerate(grad_fn(t - 1, w)):
            excluded = exclude_1d and ndims[i] <= 1
            wd = 0.0 if excluded else weight_decay
            r = []
            for j in range(len(w[i])):
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[j]
                v[i][j] = b2 * v[i][j] + (1 - b2) * g[j] ** 2
                mh = m[i][j] / (1 - b1**t) if bias_correction else m[i][j]
                vh = v[i][j] / (1 - b2**t) if bias_correction else v[i][j]
                r.append(mh / (math.sqrt(vh) + eps) + wd * w[i][j])
            if excluded:
                ratio = 1.0
            else:
                wn, rn = _norm(w[i]), _norm(r)
                ratio = wn / rn if wn > 0 and rn > 0 else 1.0
                if max_trust_ratio is not None:
                    ratio = min(ratio, max_trust_ratio)
            for j in range(len(w[i])):
                w[i][j] -= lr * ratio * r[j]
    return w


def _check_against_ref(model: nn.Module, expected: list[list[float]]) -> None:
    for p, exp in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(
            p.detach().reshape(-1), torch.tensor(exp, dtype=DTYPE), rtol=0, atol=1e-12
        )


# ----------------------------------------------------------------------------- LARS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "exclude_1d": True},
        {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": False, "exclude_1d": True},
        {"lr": 0.3, "momentum": 0.8, "weight_decay": 5e-2, "nesterov": True, "exclude_1d": False},
        {"lr": 0.2, "momentum": 0.0, "weight_decay": 1e-3, "nesterov": False, "exclude_1d": False},
    ],
)
def test_lars_matches_reference(kwargs: dict) -> None:
    model = _model()
    grads = _grads(5)
    trust, eps = 0.02, 1e-9
    expected = _reference(
        _ref_lars,
        model,
        *_fixed(grads),
        trust=trust,
        eps=eps,
        **kwargs,
    )
    opt = LARS(model.parameters(), trust_coefficient=trust, eps=eps, **kwargs)
    _run(opt, model, grads)
    _check_against_ref(model, expected)


def test_lars_quadratic_loss_matches_reference() -> None:
    model = _model(3)
    kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": False}
    expected = _reference(
        _ref_lars,
        model,
        lambda t, w: _quadratic_grad(w),
        4,
        trust=0.01,
        eps=1e-9,
        exclude_1d=True,
        **kwargs,
    )
    opt = LARS(model.parameters(), trust_coefficient=0.01, eps=1e-9, **kwargs)
    _train_on_quadratic(opt, model, steps=4)
    _check_against_ref(model, expected)


def test_lars_exclude_1d() -> None:
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(4, dtype=DTYPE))
    weight = nn.Parameter(torch.randn(4, 3, dtype=DTYPE))
    g_b = torch.randn(4, dtype=DTYPE)
    g_w = torch.randn(4, 3, dtype=DTYPE)
    b0, w0 = bias.detach().clone(), weight.detach().clone()
    opt = LARS([weight, bias], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.01)
    bias.grad, weight.grad = g_b.clone(), g_w.clone()
    opt.step()
    # Bias: plain SGD, no weight decay, no adaptation.
    torch.testing.assert_close(bias.detach(), b0 - 0.1 * g_b, rtol=0, atol=1e-15)
    # Weight: adapted with decay.
    wn, gn = w0.norm().item(), g_w.norm().item()
    local = 0.01 * wn / (gn + 0.5 * wn + 1e-9)
    torch.testing.assert_close(
        weight.detach(), w0 - 0.1 * local * (g_w + 0.5 * w0), rtol=0, atol=1e-15
    )

    # Disabled: the bias is adapted and decayed too.
    bias2 = nn.Parameter(b0.clone())
    opt2 = LARS(
        [bias2], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.01, exclude_1d=False
    )
    bias2.grad = g_b.clone()
    opt2.step()
    bn, gbn = b0.norm().item(), g_b.norm().item()
    local_b = 0.01 * bn / (gbn + 0.5 * bn + 1e-9)
    torch.testing.assert_close(
        bias2.detach(), b0 - 0.1 * local_b * (g_b + 0.5 * b0), rtol=0, atol=1e-15
    )


def test_lars_per_group_override() -> None:
    torch.manual_seed(0)
    b_a = nn.Parameter(torch.randn(4, dtype=DTYPE))
    b_b = nn.Parameter(b_a.detach().clone())
    g = torch.randn(4, dtype=DTYPE)
    opt = LARS(
        [{"params": [b_a]}, {"params": [b_b], "exclude_1d": False, "weight_decay": 0.25}],
        lr=0.1,
        momentum=0.0,
        trust_coefficient=0.01,
    )
    b0 = b_a.detach().clone()
    b_a.grad, b_b.grad = g.clone(), g.clone()
    opt.step()
    torch.testing.assert_close(b_a.detach(), b0 - 0.1 * g, rtol=0, atol=1e-15)
    bn, gn = b0.norm().item(), g.norm().item()
    local = 0.01 * bn / (gn + 0.25 * bn + 1e-9)
    torch.testing.assert_close(b_b.detach(), b0 - 0.1 * local * (g + 0.25 * b0), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="-0.5"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": -0.5})


@pytest.mark.parametrize("zero", ["weight", "grad"])
def test_lars_zero_norm_ratio_one(zero: str) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(
        torch.zeros(3, 4, dtype=DTYPE) if zero == "weight" else torch.randn(3, 4, dtype=DTYPE)
    )
    g = torch.zeros(3, 4, dtype=DTYPE) if zero == "grad" else torch.randn(3, 4, dtype=DTYPE)
    w0 = w.detach().clone()
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.001, eps=0.0)
    w.grad = g.clone()
    opt.step()
    assert torch.isfinite(w).all()
    # Ratio 1: w -= lr * (g + wd w).
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (g + 0.1 * w0), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"lr": -0.1}, "-0.1"),
        ({"lr": 0.1, "momentum": 1.0}, "1.0"),
        ({"lr": 0.1, "momentum": -0.2}, "-0.2"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "-0.0001"),
        ({"lr": 0.1, "trust_coefficient": 0.0}, "0.0"),
        ({"lr": 0.1, "eps": -1.0}, "-1.0"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "momentum=0.0"),
    ],
)
def test_lars_invalid_args(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        LARS(_model().parameters(), **kwargs)


# ----------------------------------------------------------------------------- LAMB


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_decay": 0.0, "bias_correction": True, "max_trust_ratio": 10.0, "exclude_1d": True},
        {
            "weight_decay": 0.01,
            "bias_correction": True,
            "max_trust_ratio": None,
            "exclude_1d": True,
        },
        {
            "weight_decay": 0.1,
            "bias_correction": False,
            "max_trust_ratio": 10.0,
            "exclude_1d": False,
        },
        # Tight cap so the clip is active.
        {
            "weight_decay": 0.01,
            "bias_correction": True,
            "max_trust_ratio": 0.3,
            "exclude_1d": False,
        },
    ],
)
def test_lamb_matches_reference(kwargs: dict) -> None:
    model = _model()
    grads = _grads(5)
    lr, betas, eps = 0.05, (0.8, 0.95), 1e-6
    expected = _reference(
        _ref_lamb,
        model,
        *_fixed(grads),
        lr=lr,
        betas=betas,
        eps=eps,
        **kwargs,
    )
    opt = LAMB(model.parameters(), lr=lr, betas=betas, eps=eps, **kwargs)
    _run(opt, model, grads)
    _check_against_ref(model, expected)
    assert all(float(opt.state[p]["step"]) == 5 for p in model.parameters())


def test_lamb_quadratic_loss_matches_reference() -> None:
    model = _model(3)
    kwargs = {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    expected = _reference(
        _ref_lamb,
        model,
        lambda t, w: _quadratic_grad(w),
        4,
        bias_correction=True,
        max_trust_ratio=10.0,
        exclude_1d=True,
        **kwargs,
    )
    opt = LAMB(model.parameters(), **kwargs)
    _train_on_quadratic(opt, model, steps=4)
    _check_against_ref(model, expected)


def test_lamb_exclude_1d() -> None:
    torch.manual_seed(0)
    bias = nn.Parameter(torch.randn(4, dtype=DTYPE))
    g = torch.randn(4, dtype=DTYPE)
    b0 = bias.detach().clone()
    opt = LAMB([bias], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    bias.grad = g.clone()
    opt.step()
    # First bias-corrected Adam step is g / (|g| + eps): no decay, ratio 1.
    torch.testing.assert_close(bias.detach(), b0 - 0.1 * g / (g.abs() + 1e-8), rtol=0, atol=1e-14)


@pytest.mark.parametrize("zero", ["weight", "grad"])
def test_lamb_zero_norm_ratio_one(zero: str) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(
        torch.zeros(3, 4, dtype=DTYPE) if zero == "weight" else torch.randn(3, 4, dtype=DTYPE)
    )
    g = torch.zeros(3, 4, dtype=DTYPE) if zero == "grad" else torch.randn(3, 4, dtype=DTYPE)
    w0 = w.detach().clone()
    opt = LAMB([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    w.grad = g.clone()
    opt.step()
    assert torch.isfinite(w).all()
    # weight zero -> ratio 1, Adam step; grad zero (no decay) -> r == 0 -> unchanged.
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g / (g.abs() + 1e-8), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"lr": -1.0}, "-1.0"),
        ({"lr": 0.1, "betas": (1.0, 0.999)}, "1.0"),
        ({"lr": 0.1, "betas": (0.9, -0.1)}, "-0.1"),
        ({"lr": 0.1, "weight_decay": -0.01}, "-0.01"),
        ({"lr": 0.1, "eps": -1e-6}, "-1e-06"),
        ({"lr": 0.1, "max_trust_ratio": 0.0}, "0.0"),
    ],
)
def test_lamb_invalid_args(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        LAMB(_model().parameters(), **kwargs)


# ----------------------------------------------------------------------------- shared


def _make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "lars":
        return LARS(model.parameters(), lr=0.2, weight_decay=1e-3, trust_coefficient=0.01)
    return LAMB(model.parameters(), lr=0.01, weight_decay=1e-2)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_state_dict_round_trip_bitwise(name: str) -> None:
    grads = _grads(6, seed=7)
    model = _model()
    opt = _make(name, model)
    _run(opt, model, grads[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _run(opt, model, grads[3:])

    resumed = _model(seed=99)  # different init, overwritten by the load
    resumed.load_state_dict(saved_model)
    opt2 = _make(name, resumed)
    opt2.load_state_dict(saved_opt)
    _run(opt2, resumed, grads[3:])

    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, val in opt.state[p].items():
            assert torch.equal(val, opt2.state[q][key]), key
            assert val.dtype == opt2.state[q][key].dtype


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_step_closure_returns_loss(name: str) -> None:
    model = _model()
    opt = _make(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    seen_grad_enabled = []

    def closure() -> torch.Tensor:
        seen_grad_enabled.append(torch.is_grad_enabled())
        # Parameters must be untouched when the closure runs.
        for p, b in zip(model.parameters(), before, strict=True):
            assert torch.equal(p, b)
        opt.zero_grad()
        loss = _quadratic_loss(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen_grad_enabled == [True]
    assert isinstance(loss, torch.Tensor)
    torch.testing.assert_close(loss, _quadratic_loss(_model()))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.step() is None


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_params_without_grad_are_skipped(name: str) -> None:
    model = _model()
    opt = _make(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert len(opt.state) == 0
