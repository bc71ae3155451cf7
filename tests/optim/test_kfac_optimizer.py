"""The KFAC optimizer: resume, safety, options, schedules, damping adaptation, training."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from secondorder.optim import OptimContext, build_optimizer
from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac.damping import adapted_damping, quadratic_model, reduction_ratio
from secondorder.optim.losses import loss_value

DTYPE = torch.float64


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its ``outputs.float()`` cast, which rounds float64 to float32."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)


class _Net(nn.Module):
    """Conv1d + LayerNorm (not covered by K-FAC) + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, stride=2)
        self.norm = nn.LayerNorm(3 * 4)
        self.fc = nn.Linear(3 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


def _batches(steps: int, n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 10, generator=gen), torch.randint(0, 4, (n,), generator=gen))
        for _ in range(steps)
    ]


def _net(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().to(dtype)


RESUME_KW = dict(
    lr=0.05,
    momentum=0.9,
    weight_decay=1e-3,
    factor_update_every=2,
    inverse_update_every=3,
    levenberg_marquardt=True,
    damping_adapt_every=2,
    other_preconditioner="adam",
    kl_clip=1e-2,
    damping=1e-3,
)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_resume_is_bitwise_exact(method: str) -> None:
    batches = _batches(9)

    def run(model, opt, part):
        for x, y in part:
            opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))

    model = _net()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        inverse_method=method,
        **RESUME_KW,
    )
    run(model, opt, batches[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, batches[4:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as the trainer loads checkpoints
    resumed = _net(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = KFAC(
        resumed.parameters(),
        model=resumed,
        loss_kind="cross_entropy",
        inverse_method=method,
        **RESUME_KW,
    )
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.damping == opt2.damping and opt.damping != RESUME_KW["damping"]


def test_nan_factor_never_reaches_the_parameters() -> None:
    model = _net()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.05,
        factor_update_every=1,
        inverse_update_every=1,
    )
    (x, y), (x2, y2) = _batches(2)
    opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    opt.state[model.fc.weight]["A"].fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(BatchClosure(model=model, micro_batches=[(x2, y2)], loss_kind="cross_entropy"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.diagnostics["inverse_retries"] >= 2 and opt.diagnostics["inverse_failures"] >= 1


def test_nonfinite_gradient_skips_the_step() -> None:
    model = _net()
    opt = KFAC(model.parameters(), model=model, loss_kind="cross_entropy", lr=0.05)
    batches = _batches(3)
    opt.step(BatchClosure(model=model, micro_batches=[batches[0]], loss_kind="cross_entropy"))
    before = copy.deepcopy(model.state_dict())
    buffers = {
        k: v["momentum_buffer"].clone()
        for k, v in enumerate(opt.state.values())
        if "momentum_buffer" in v
    }
    inner = BatchClosure(model=model, micro_batches=[batches[1]], loss_kind="cross_entropy")

    def poisoned() -> torch.Tensor:
        loss = inner()
        model.conv.weight.grad[0, 0, 0] = float("nan")
        return loss

    opt.step(poisoned)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for k, v in enumerate(opt.state.values()):
        if k in buffers:
            assert torch.equal(v["momentum_buffer"], buffers[k])
    assert int(opt.diagnostics["skipped_steps"]) == 1
    opt.step(BatchClosure(model=model, micro_batches=[batches[2]], loss_kind="cross_entropy"))
    assert int(opt.diagnostics["skipped_steps"]) == 1
    assert not torch.equal(model.fc.weight, before["fc.weight"])


def test_unsupported_loss_with_true_fisher_raises() -> None:
    model = _net()
    with pytest.raises(ValueError, match="'huber'"):
        KFAC(model.parameters(), model=model, loss_kind="huber", lr=0.1)
    KFAC(model.parameters(), model=model, loss_kind="huber", lr=0.1, fisher_type="empirical")


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"lr": -0.1}, "-0.1"),
        ({"momentum": 1.0}, "1.0"),
        ({"damping": 0.0}, "damping value: 0.0"),
        ({"factor_decay": 1.0}, "factor_decay value: 1.0"),
        ({"factor_update_every": 0}, "factor_update_every value: 0"),
        ({"inverse_method": "cholesky"}, "'cholesky'"),
        ({"fisher_type": "exact"}, "'exact'"),
        ({"kl_clip": 0.0}, "kl_clip value: 0.0"),
        ({"other_preconditioner": "shampoo"}, "'shampoo'"),
        ({"grad_worker_fraction": 0.0}, "grad_worker_fraction value: 0.0"),
        ({"exclude": "fc"}, "'fc'"),
    ],
)
def test_invalid_arguments(kwargs: dict, bad: str) -> None:
    model = _net()
    args = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        KFAC(model.parameters(), model=model, loss_kind="cross_entropy", **args)


def test_closure_is_required() -> None:
    model = _net()
    opt = KFAC(model.parameters(), model=model, loss_kind="cross_entropy", lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    lm = KFAC(
        model.parameters(), model=model, loss_kind="cross_entropy", lr=0.1, levenberg_marquardt=True
    )
    with pytest.raises(ValueError, match="evaluate"):
        lm.step(lambda: torch.zeros(()))


@pytest.mark.parametrize("other", ["none", "adam"])
def test_uncovered_and_excluded_layers_get_the_other_preconditioner(other: str) -> None:
    model = _net(dtype=DTYPE)
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.1,
        momentum=0.0,
        kl_clip=None,
        exclude=["f*"],
        other_preconditioner=other,
    )
    assert [layer.name for layer in opt.layers] == ["conv"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = (t.to(DTYPE) if t.is_floating_point() else t for t in _batches(1)[0])
    opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    for name in ("norm.weight", "norm.bias", "fc.weight", "fc.bias"):
        p = dict(model.named_parameters())[name]
        g = p.grad
        expected = g if other == "none" else g / ((g * g).sqrt() + 1e-8)
        torch.testing.assert_close(
            before[name] - p.detach(), 0.1 * expected, rtol=1e-10, atol=1e-14
        )


def _one_update(kl_clip, lr=0.5):
    model = _net(dtype=DTYPE)
    x, y = (t.to(DTYPE) if t.is_floating_point() else t for t in _batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=lr,
        momentum=0.0,
        kl_clip=kl_clip,
        fisher_type="empirical",
    )
    opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    grads = [p.grad.clone() for p in model.parameters()]
    return opt, [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], grads


def test_kl_clip_scales_the_preconditioned_gradient() -> None:
    lr = 0.5
    _, free, grads = _one_update(None, lr)
    v = [d / lr for d in free]  # the unclipped preconditioned gradient
    vg = sum(float((a * b).sum()) for a, b in zip(v, grads, strict=True))
    kappa = 1e-4
    nu = min(1.0, math.sqrt(kappa / (lr**2 * vg)))
    assert nu < 0.5  # the clip is active
    opt, clipped, _ = _one_update(kappa, lr)
    assert float(opt.diagnostics["kl_clip_scale"]) == pytest.approx(nu, rel=1e-10)
    for a, b in zip(clipped, free, strict=True):
        torch.testing.assert_close(a, nu * b, rtol=1e-9, atol=1e-15)


class _L2Closure(Float64Closure):
    """The closure's loss plus (η/2)‖θ‖²: what coupled weight decay η minimises."""

    eta = 0.0

    def loss_of(self, inputs, targets):
        l2 = sum((p * p).sum() for p in self.model.parameters())
        return super().loss_of(inputs, targets) + 0.5 * self.eta * l2


def test_weight_decay_is_the_gradient_of_an_l2_term() -> None:
    eta, results = 0.05, []
    for wd, closure_eta in ((eta, 0.0), (0.0, eta)):
        model = _net(dtype=DTYPE)
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.1,
            weight_decay=wd,
            fisher_type="empirical",
            factor_update_every=1,
            inverse_update_every=2,
        )
        for x, y in _batches(4):
            closure = _L2Closure(
                model=model, micro_batches=[(x.to(DTYPE), y)], loss_kind="cross_entropy"
            )
            closure.eta = closure_eta
            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_micro_batches_match_one_batch() -> None:
    results = []
    for split in (1, 4):
        model = _net(dtype=DTYPE)
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.1,
            fisher_type="empirical",
            factor_update_every=1,
            inverse_update_every=2,
        )
        for x, y in _batches(3):
            x = x.to(DTYPE)
            micro = list(zip(x.chunk(split), y.chunk(split), strict=True))
            opt.step(Float64Closure(model=model, micro_batches=micro, loss_kind="cross_entropy"))
        results.append((opt.state[model.conv.weight]["A"].clone(), list(model.parameters())))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_factor_and_inverse_schedules() -> None:
    model = _net()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.05,
        factor_update_every=lambda k: 2 if k < 4 else 3,
        inverse_update_every=4,
    )
    factor_steps, inverse_steps = [], []
    for k, (x, y) in enumerate(_batches(9)):
        state = opt.state[model.conv.weight]
        a, q = state.get("A", torch.empty(0)).clone(), state.get("Q_A", torch.empty(0)).clone()
        opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
        if not torch.equal(a, state["A"]):
            factor_steps.append(k)
        if not torch.equal(q, state["Q_A"]):
            inverse_steps.append(k)
    assert factor_steps == [0, 2, 6]
    assert inverse_steps == [0, 4, 8]
    assert set(opt.diagnostics) >= {
        "damping",
        "kl_clip_scale",
        "time_factors_s",
        "time_inverse_s",
        "time_precondition_s",
        "inverse_retries",
        "skipped_steps",
    }


def test_levenberg_marquardt_rule() -> None:
    omega = (19 / 20) ** 5
    assert adapted_damping(1.0, 0.9, 5) == pytest.approx(omega)
    assert adapted_damping(1.0, 0.1, 5) == pytest.approx(1 / omega)
    assert adapted_damping(1.0, 0.5, 5) == 1.0
    assert reduction_ratio(-1.0, 0.5) == -math.inf  # no predicted decrease
    assert reduction_ratio(-1.0, -2.0) == 0.5


def test_quadratic_model_of_a_linear_least_squares_layer() -> None:
    """For mse on a Linear layer A ⊗ G with G = (2/D) I is the exact Hessian, so the K-FAC
    quadratic model must equal the explicit ∇ᵀδ + ½δᵀ(H + λ + η)δ (torch.func.hessian)."""
    torch.manual_seed(7)
    model = nn.Linear(3, 2).to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    lam, eta = 0.3, 0.02
    opt = KFAC(model.parameters(), model=model, loss_kind="mse", lr=0.1, weight_decay=eta)
    a_bar = torch.cat([x, torch.ones(6, 1, dtype=DTYPE)], 1)
    opt.state[model.weight]["A"] = a_bar.T @ a_bar / 6
    opt.state[model.weight]["G"] = torch.eye(2, dtype=DTYPE) * 2 / 2

    def h(flat):
        w, b = flat[:6].reshape(2, 3), flat[6:]
        return loss_value("mse", x @ w.T + b, y)

    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    delta = torch.randn(8, dtype=DTYPE) * 0.1
    grad = torch.func.grad(h)(theta) + eta * theta
    hess = torch.func.hessian(h)(theta)
    with torch.no_grad():
        model.weight += delta[:6].reshape(2, 3)
        model.bias += delta[6:]
    grads = {id(model.weight): grad[:6].reshape(2, 3), id(model.bias): grad[6:]}
    deltas = {id(model.weight): delta[:6].reshape(2, 3), id(model.bias): delta[6:]}
    change, predicted = quadratic_model(
        opt.layers,
        opt.state,
        opt.param_groups,
        grads,
        deltas,
        loss_before=h(theta),
        loss_after=h(theta + delta),
        damping=lam,
    )
    new = theta + delta
    exact_change = h(new) - h(theta) + 0.5 * eta * (new @ new - theta @ theta)
    exact_model = (
        grad @ delta + 0.5 * delta @ (hess + (lam + eta) * torch.eye(8, dtype=DTYPE)) @ delta
    )
    assert change == pytest.approx(float(exact_change), rel=1e-10)
    assert predicted == pytest.approx(float(exact_model), rel=1e-10)


def test_damping_adapts_during_training() -> None:
    model = _net()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.05,
        damping=1e-3,
        levenberg_marquardt=True,
        damping_adapt_every=2,
        factor_update_every=1,
    )
    for x, y in _batches(8):
        opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    assert opt.damping != 1e-3 and 1e-8 <= opt.damping <= 1e4
    assert "rho" in opt.diagnostics


def test_registry_builds_kfac_with_either_inverse_method() -> None:
    model = _net()
    context = OptimContext(model=model, loss_kind="cross_entropy")
    assert build_optimizer("kfac", model.parameters(), context, lr=0.2).inverse_method == "eigen"
    opt = build_optimizer(
        "kfac", model.parameters(), context, lr=0.1, inverse_method="inverse", exclude=["fc"]
    )
    assert opt.inverse_method == "inverse" and [layer.name for layer in opt.layers] == ["conv"]


@pytest.mark.slow
def test_kfac_trains_cnn1d_on_mnist1d(data_root) -> None:
    from secondorder.data import build_data
    from secondorder.models import build_model

    torch.manual_seed(0)
    data = build_data("mnist1d", num_samples=1200, root=data_root, progress=False)
    model = build_model("cnn1d")
    opt = KFAC(model.parameters(), model=model, loss_kind="cross_entropy", lr=0.3, damping=0.01)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        idx = torch.randint(0, len(data.train), (256,), generator=gen)
        x, y = data.train.get_batch(idx)
        closure = BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy")
        losses.append(float(opt.step(closure)))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:3]) / 3  # about 2.3 -> 0.25
