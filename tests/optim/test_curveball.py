"""CurveBall (Henriques et al. 2019) against explicit float64 mathematics written here.

References: the damped Gauss-Newton matrix ``Ĥ = Jᵀ H_L J + λI`` formed densely with
``torch.func.jacrev`` and ``torch.func.hessian`` of hand-written losses, the minimiser of the
quadratic model over ``z' = ρz - βΔz`` solved from those matrices, ``torch.optim.SGD`` for the
momentum equivalence, and a one-parameter model whose Levenberg-Marquardt ratio is known in
closed form.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from float64_problems import (
    DTYPE,
    KINDS,
    flat_params,
    loss_by_hand,
    tiny_batch,
    tiny_mlp,
    unflat_params,
)
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import secondorder.optim.functional as functional_module
from secondorder.distributed.testing import run_on_ranks
from secondorder.optim.closure import BatchClosure
from secondorder.optim.curveball import CurveBall, adapt_damping, solve_step_sizes


def _state_z(opt: CurveBall, model: nn.Module) -> torch.Tensor:
    return torch.cat([opt.state[p]["z"].reshape(-1) for p in model.parameters()])


def _step(opt: CurveBall, model: nn.Module, batches, kind: str = "cross_entropy", comm=None):
    closure = BatchClosure(model=model, micro_batches=batches, loss_kind=kind, comm=comm)
    return opt.step(closure)


def _explicit_quadratic(model, kind, x, y, damping):
    """(Ĥ, J) as a dense damped GGN and the gradient of the flattened parameters."""
    w = flat_params(model)

    def outputs(u: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat_params(model, u), (x,))

    f = outputs(w)
    jac = jacrev(outputs)(w).reshape(f.numel(), -1)
    h_out = hessian(lambda o: loss_by_hand(kind, o, y))(f).reshape(f.numel(), f.numel())
    ggn = jac.T @ h_out @ jac
    gradient = grad(lambda u: loss_by_hand(kind, outputs(u), y))(w)
    return ggn + damping * torch.eye(w.numel(), dtype=DTYPE), gradient


# ------------------------------------------------------------------------- the 2x2 system


@pytest.mark.parametrize("kind", KINDS)
def test_automatic_rho_beta_minimise_the_explicit_quadratic_model(kind: str) -> None:
    model, damping = tiny_mlp(), 0.7
    x, y = tiny_batch(kind)
    opt = CurveBall(model.parameters(), damping=damping, auto_lambda=False)
    gen = torch.Generator().manual_seed(4)
    for p in model.parameters():
        opt.state[p]["z"] = torch.randn(p.shape, generator=gen, dtype=DTYPE)
    z, w = _state_z(opt, model), flat_params(model)
    h_hat, gradient = _explicit_quadratic(model, kind, x, y, damping)

    _step(opt, model, [(x, y)], kind)

    delta = h_hat @ z + gradient  # Algorithm 1, line 3
    basis = torch.stack([z, -delta], dim=1)  # z' = basis @ [ρ, β]
    rho, beta = -torch.linalg.solve(basis.T @ h_hat @ basis, basis.T @ gradient)
    new_z = rho * z - beta * delta
    torch.testing.assert_close(opt.diagnostics["curveball_rho"], rho, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.diagnostics["curveball_beta"], beta, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_state_z(opt, model), new_z, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat_params(model), w + new_z, rtol=1e-9, atol=1e-12)

    def model_value(coefficients: torch.Tensor) -> torch.Tensor:  # q over the 2-D subspace
        step = basis @ coefficients
        return 0.5 * step @ h_hat @ step + gradient @ step

    solution = torch.stack([rho, beta])
    assert grad(model_value)(solution).abs().max() < 1e-10
    for direction in torch.eye(2, dtype=DTYPE):
        assert model_value(solution) < model_value(solution + 1e-3 * direction)


def test_first_step_with_zero_buffer_is_the_one_dimensional_minimiser() -> None:
    model, damping = tiny_mlp(), 1.0
    x, y = tiny_batch("cross_entropy")
    w = flat_params(model)
    h_hat, gradient = _explicit_quadratic(model, "cross_entropy", x, y, damping)
    opt = CurveBall(model.parameters(), damping=damping, auto_lambda=False)
    _step(opt, model, [(x, y)])
    beta = (gradient @ gradient) / (gradient @ h_hat @ gradient)  # z = 0, so Δz = J
    torch.testing.assert_close(opt.diagnostics["curveball_beta"], beta, rtol=1e-10, atol=0)
    torch.testing.assert_close(flat_params(model), w - beta * gradient, rtol=1e-10, atol=1e-14)


def test_explicit_two_by_two_solve_matches_a_least_squares_minimiser() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.randn(2, 2, generator=gen, dtype=DTYPE)
        m, c = a @ a.T, torch.randn(2, generator=gen, dtype=DTYPE)
        torch.testing.assert_close(solve_step_sizes(m, c, rtol=1e-12), -torch.linalg.solve(m, c))
    u = torch.tensor([0.5, -2.0], dtype=DTYPE)  # z ∥ Δz: rank one, c in its range
    m, c = 3.0 * torch.outer(u, u), 0.7 * u
    x = solve_step_sizes(m, c)
    torch.testing.assert_close(m @ x + c, torch.zeros(2, dtype=DTYPE), rtol=0, atol=1e-12)
    zero = solve_step_sizes(torch.zeros(2, 2, dtype=DTYPE), c)
    assert torch.equal(zero, torch.zeros(2, dtype=DTYPE))


# ------------------------------------------------------------------------- momentum SGD


def test_without_curvature_it_is_exactly_momentum_sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [tiny_batch("cross_entropy", seed=s) for s in range(6)]
    fixed = dict(lr=0.1, momentum=0.9, damping=0.0, auto_params=False, auto_lambda=False)
    curved = tiny_mlp()  # control: with the curvature term, CurveBall is not SGD
    opt = CurveBall(curved.parameters(), **fixed)
    for x, y in batches[:2]:
        _step(opt, curved, [(x, y)])

    model, reference = tiny_mlp(), tiny_mlp()
    opt = CurveBall(model.parameters(), **fixed)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    # Remove G: H_L ↦ 0, so Δz = J and z ← ρz - βJ, w ← w + z (SGD's buffer is -z/β).
    monkeypatch.setattr(functional_module, "output_hessian", lambda kind, f: torch.zeros_like)
    for i, (x, y) in enumerate(batches):
        _step(opt, model, [(x, y)])
        sgd.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        sgd.step()
        torch.testing.assert_close(
            flat_params(model), flat_params(reference), rtol=1e-13, atol=1e-15
        )
        if i == 1:
            assert not torch.allclose(flat_params(curved), flat_params(reference), atol=1e-6)


# ------------------------------------------------------------------------- damping λ


class _Exponential(nn.Module):
    """``f(x) = e^w`` for every example, so ``L = (e^w - y)²`` and ``G = 2e^{2w}``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.w) * torch.ones_like(x)


@pytest.mark.parametrize(
    ("target", "damping", "grows"),
    [(-10.0, 0.01, True), (0.0, 100.0, False)],
    ids=["model-over-promises", "model-too-cautious"],
)
def test_damping_follows_the_levenberg_marquardt_ratio(target, damping, grows) -> None:
    model = _Exponential()
    x = torch.zeros(4, 1, dtype=DTYPE)
    opt = CurveBall(model.parameters(), damping=damping, lambda_every=5)
    _step(opt, model, [(x, torch.full_like(x, target))], "mse")
    # At w = 0 with z = 0: J = 2(1 - y), G = 2, so β = 1/(2 + λ), z' = -J/(2 + λ),
    # predicted q(z') = -J²/(2(2 + λ)), actual L(z') - L(0).
    gradient = 2.0 * (1.0 - target)
    step = -gradient / (2.0 + damping)
    predicted = -(gradient**2) / (2.0 * (2.0 + damping))
    actual = (math.exp(step) - target) ** 2 - (1.0 - target) ** 2
    ratio = actual / predicted
    assert float(opt.diagnostics["curveball_ratio"]) == pytest.approx(ratio, rel=1e-10)
    assert (ratio < 0.5) if grows else (ratio > 1.5)
    omega = 0.999**5
    expected = damping / omega if grows else damping * omega
    assert float(opt.diagnostics["curveball_lambda"]) == pytest.approx(expected, rel=1e-12)


def test_adapt_damping_rule() -> None:
    lam = torch.tensor(2.0, dtype=DTYPE)

    def new(actual: float, predicted: float) -> float:
        out = adapt_damping(
            lam,
            actual=torch.tensor(actual, dtype=DTYPE),
            predicted=torch.tensor(predicted, dtype=DTYPE),
            low=0.5,
            high=1.5,
            factor=0.5,
        )
        return float(out)

    assert new(-0.1, -1.0) == 4.0  # r = 0.1: λ grows
    assert new(-2.0, -1.0) == 1.0  # r = 2: λ shrinks
    assert new(-1.0, -1.0) == 2.0  # r = 1: unchanged
    assert new(0.0, 0.0) == 2.0  # no prediction: unchanged


# ------------------------------------------------------------------------- data parallel


def _trajectory(batches, comm=None, micro: int = 1) -> torch.Tensor:
    model = tiny_mlp()
    opt = CurveBall(model.parameters(), lambda_every=2)
    for x, y in batches:
        shards = list(zip(x.chunk(micro), y.chunk(micro), strict=True))
        _step(opt, model, shards, comm=comm)
    damping = opt.param_groups[0]["damping"].reshape(1)
    return torch.cat([flat_params(model), _state_z(opt, model), damping])


def _ranks_body(batches, world_size: int) -> torch.Tensor:
    from secondorder.distributed.comm import TorchComm

    comm = TorchComm()
    share = batches[0][0].shape[0] // world_size
    rows = slice(comm.rank * share, (comm.rank + 1) * share)
    return _trajectory([(x[rows], y[rows]) for x, y in batches], comm=comm)


def test_micro_batches_accumulate_like_one_batch() -> None:
    batches = [tiny_batch("cross_entropy", n=8, seed=s) for s in range(4)]
    torch.testing.assert_close(
        _trajectory(batches, micro=2), _trajectory(batches), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_take_the_same_steps_as_one_process(world_size: int) -> None:
    batches = [tiny_batch("cross_entropy", n=8, seed=s) for s in range(4)]
    single = _trajectory(batches)
    results = run_on_ranks(
        _ranks_body, world_size=world_size, args=(batches, world_size), timeout_s=240
    )
    for result in results:
        torch.testing.assert_close(result, single, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- state


def test_resume_is_bitwise() -> None:
    batches = [tiny_batch("cross_entropy", seed=s) for s in range(6)]
    model = tiny_mlp()
    opt = CurveBall(model.parameters(), lambda_every=2)
    for x, y in batches[:3]:
        _step(opt, model, [(x, y)])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    for x, y in batches[3:]:
        _step(opt, model, [(x, y)])

    resumed_model = tiny_mlp(seed=9)
    resumed = CurveBall(resumed_model.parameters(), lambda_every=2)
    payload = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_model.load_state_dict(payload["model"])
    resumed.load_state_dict(payload["optimizer"])
    for x, y in batches[3:]:
        _step(resumed, resumed_model, [(x, y)])
    assert torch.equal(flat_params(resumed_model), flat_params(model))
    assert torch.equal(_state_z(resumed, resumed_model), _state_z(opt, model))
    damping = resumed.param_groups[0]["damping"]
    assert torch.equal(damping, opt.param_groups[0]["damping"]) and damping.dtype == torch.float64
    assert resumed.global_state["step"] == 6


def test_batch_norm_running_statistics_update_once_per_micro_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = model.to(DTYPE)
    x, y = tiny_batch("cross_entropy", n=8)
    expected = nn.BatchNorm1d(6).to(DTYPE)
    expected.load_state_dict(model[1].state_dict())
    with torch.no_grad():
        for half in x.chunk(2):
            expected(model[0](half))  # what two micro-batch forwards do at the same weights
    opt = CurveBall(model.parameters())
    _step(opt, model, list(zip(x.chunk(2), y.chunk(2), strict=True)))
    assert int(model[1].num_batches_tracked) == 2
    torch.testing.assert_close(model[1].running_mean, expected.running_mean)
    torch.testing.assert_close(model[1].running_var, expected.running_var)


# ------------------------------------------------------------------------- training


@pytest.mark.slow
def test_trains_cnn1d_on_mnist1d_with_default_settings(data_root) -> None:
    from secondorder.data import build_data
    from secondorder.models import build_model

    data = build_data("mnist1d", num_samples=1200, root=data_root, progress=False)
    torch.manual_seed(0)
    model = build_model("cnn1d")
    opt = CurveBall(model.parameters())
    gen = torch.Generator().manual_seed(0)
    probe = data.train.get_batch(torch.arange(512))

    def probe_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(probe[0]), probe[1]))

    before = probe_loss()
    for _ in range(40):
        x, y = data.train.get_batch(torch.randint(0, len(data.train), (128,), generator=gen))
        loss = _step(opt, model, [(x, y)])
        assert torch.isfinite(loss)
    after = probe_loss()
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "learning rate"),
        ({"damping": -1.0}, "damping"),
        ({"lambda_every": 0}, "lambda_every"),
        ({"lambda_factor": 1.5}, "lambda_factor"),
        ({"auto_params": "yes"}, "auto_params"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CurveBall(tiny_mlp().parameters(), **kwargs)


def test_needs_a_batch_closure() -> None:
    opt = CurveBall(tiny_mlp().parameters())
    with pytest.raises(TypeError, match="BatchClosure"):
        opt.step(lambda: torch.zeros(()))
