"""ExactNewton, NewtonCG and GaussNewtonCG against explicit float64 Newton steps.

References are written here: Hessians from ``torch.func.hessian``, GGNs as ``Jᵀ H_L J`` with
``torch.func.jacrev``, least-squares minimisers from the normal equations, and hand-derived
gradients and Hessians of a two-parameter bilinear model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from float64_problems import DTYPE, Float64Closure, flat_params, tiny_batch, tiny_mlp
from torch import nn
from torch.func import functional_call, hessian, jacrev

from secondorder.distributed.testing import run_on_ranks
from secondorder.optim.closure import BatchClosure
from secondorder.optim.newton import ExactNewton
from secondorder.optim.newton_cg import GaussNewtonCG, NewtonCG

EXACT_CG = {"cg_max_iters": 200, "cg_tol": 1e-14, "cg_progress_eps": None}


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, **kw) -> BatchClosure:
    return Float64Closure(model=model, micro_batches=[(x, y)], loss_kind=kind, **kw)


def _explicit_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(θ, g, H, G) for softmax cross-entropy, as dense float64 tensors."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = flat_params(model)

    def unflat(w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = shape.numel()
            out[name] = w[i : i + n].reshape(shape)
            i += n
        return out

    def outputs(w: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(w), (x,))

    def ce(z: torch.Tensor) -> torch.Tensor:
        return -(z - torch.logsumexp(z, 1, keepdim=True)).gather(1, y[:, None]).mean()

    g = torch.func.grad(lambda w: ce(outputs(w)))(theta)
    h = hessian(lambda w: ce(outputs(w)))(theta)
    z = outputs(theta)
    jac = jacrev(outputs)(theta).reshape(z.numel(), -1)
    ggn = jac.T @ hessian(ce)(z).reshape(z.numel(), z.numel()) @ jac
    return theta, g, h, ggn


def test_exact_newton_and_newton_cg_take_the_explicit_step() -> None:
    x, y = tiny_batch("cross_entropy")
    lam = 1.0
    theta, g, h, ggn = _explicit_curvature(tiny_mlp(), x, y)
    eye = torch.eye(len(theta), dtype=DTYPE)
    assert torch.linalg.eigvalsh(h + lam * eye).min() > 0  # Cholesky path, CG well posed
    assert torch.linalg.eigvalsh(h).min() < 0  # ... though H itself is indefinite here
    newton_step = theta - torch.linalg.solve(h + lam * eye, g)
    for make in (
        lambda m: ExactNewton(m.parameters(), model=m, loss_kind="cross_entropy", damping=lam),
        lambda m: NewtonCG(
            m.parameters(),
            model=m,
            loss_kind="cross_entropy",
            damping=lam,
            line_search=False,
            adapt_damping=False,
            **EXACT_CG,
        ),
    ):
        model = tiny_mlp()
        opt = make(model)
        opt.step(_closure(model, x, y, "cross_entropy"))
        torch.testing.assert_close(flat_params(model), newton_step, atol=1e-9, rtol=0)
    model = tiny_mlp()
    opt = GaussNewtonCG(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        damping=lam,
        line_search=False,
        adapt_damping=False,
        **EXACT_CG,
    )
    opt.step(_closure(model, x, y, "cross_entropy"))
    gauss_newton_step = theta - torch.linalg.solve(ggn + lam * eye, g)
    torch.testing.assert_close(flat_params(model), gauss_newton_step, atol=1e-9, rtol=0)
    assert (gauss_newton_step - newton_step).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer", ["newton", "newton_cg", "ggn_cg"])
def test_one_undamped_step_minimises_a_convex_quadratic(optimizer: str) -> None:
    """Least squares: L(W) = mean((X Wᵀ − Y)²); its minimiser solves (XᵀX) Wᵀ = XᵀY."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(20, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(20, 2, generator=gen, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Linear(5, 2, bias=False).to(DTYPE)
    a, b = x.T @ x, x.T @ y
    minimiser = torch.linalg.solve(a, b).T
    common = {"lr": 1.0, "damping": 0.0}
    if optimizer != "newton":
        common |= {"line_search": False, "adapt_damping": False, "min_damping": 0.0, **EXACT_CG}
    cls = {"newton": ExactNewton, "newton_cg": NewtonCG, "ggn_cg": GaussNewtonCG}[optimizer]
    opt = cls(model.parameters(), model=model, loss_kind="mse", **common)
    opt.step(_closure(model, x, y, "mse"))
    torch.testing.assert_close(model.weight.detach(), minimiser, atol=1e-10, rtol=0)
    if optimizer != "newton":
        # The quadratic model is exact here, so ρ = 1 and Levenberg-Marquardt shrinks λ by 2/3.
        torch.manual_seed(0)
        model = nn.Linear(5, 2, bias=False).to(DTYPE)
        opt = cls(model.parameters(), model=model, loss_kind="mse", damping=0.3, cg_max_iters=3)
        opt.step(_closure(model, x, y, "mse"))
        assert opt.diagnostics["rho"] == pytest.approx(1.0, rel=1e-4)  # float32 evaluate()
        assert opt.param_groups[0]["damping"] == pytest.approx(0.2, rel=1e-12)


class Bilinear(nn.Module):
    """``z = a·b·x``: with MSE to 1, ``L = (ab − 1)²`` is indefinite near ``a = b = 0.1``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.1], dtype=DTYPE))
        self.b = nn.Parameter(torch.tensor([0.1], dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.b * x


def _bilinear_setup():
    model = Bilinear()
    x, y = torch.ones(4, 1, dtype=DTYPE), torch.ones(4, 1, dtype=DTYPE)
    a, b = 0.1, 0.1
    r = a * b - 1.0
    g = torch.tensor([2 * r * b, 2 * r * a], dtype=DTYPE)  # ∇(ab − 1)²
    h = torch.tensor([[2 * b * b, 2 * (a * b + r)], [2 * (a * b + r), 2 * a * a]], dtype=DTYPE)
    return model, x, y, g, h


def test_fallback_to_negative_gradient_on_negative_curvature() -> None:
    model, x, y, g, h = _bilinear_setup()
    assert float(g @ h @ g) < 0  # the first CG direction (−g) has negative curvature
    opt = NewtonCG(
        model.parameters(),
        model=model,
        loss_kind="mse",
        lr=0.1,
        damping=1e-3,
        line_search=False,
        adapt_damping=False,
    )
    opt.step(_closure(model, x, y, "mse"))
    assert opt.diagnostics["fallback"] == 1.0
    assert opt.diagnostics["cg_negative_curvature"] == 1.0
    torch.testing.assert_close(flat_params(model), torch.tensor([0.1, 0.1], dtype=DTYPE) - 0.1 * g)
    # The GGN (2·JᵀJ here) is PSD: no fallback.
    model2, *_ = _bilinear_setup()
    opt2 = GaussNewtonCG(
        model2.parameters(),
        model=model2,
        loss_kind="mse",
        lr=0.1,
        line_search=False,
        adapt_damping=False,
    )
    opt2.step(_closure(model2, x, y, "mse"))
    assert opt2.diagnostics["fallback"] == 0.0


def test_exact_newton_eigen_fallback_and_size_limit() -> None:
    for lam in (0.0, 0.05):  # H + λI indefinite: d = −(|H| + λI)⁻¹ g
        model, x, y, g, h = _bilinear_setup()
        opt = ExactNewton(model.parameters(), model=model, loss_kind="mse", damping=lam, lr=0.5)
        opt.step(_closure(model, x, y, "mse"))
        assert opt.diagnostics["cholesky_failed"] == 1.0
        w, q = torch.linalg.eigh(h)
        step = -(q @ torch.diag(1.0 / (w.abs() + lam).clamp_min(1e-6)) @ q.T @ g)
        expected = torch.tensor([0.1, 0.1], dtype=DTYPE) + 0.5 * step
        torch.testing.assert_close(flat_params(model), expected, atol=1e-14, rtol=1e-12)
    big = nn.Linear(200, 101)
    with pytest.raises(ValueError, match=r"20301 parameters, above max_params=20000"):
        ExactNewton(big.parameters(), model=big, loss_kind="mse")
    with pytest.raises(ValueError, match="damping"):
        ExactNewton(model.parameters(), model=model, loss_kind="mse", damping=-1.0)


class RecordingClosure(Float64Closure):
    """Keeps every line-search evaluation."""

    def evaluate(self) -> torch.Tensor:
        value = super().evaluate()
        self.trials.append(float(value))
        return value


def test_armijo_line_search_rejects_violating_steps() -> None:
    """Quadratic with the exact Newton d: L(θ + td) − L(θ) = gᵀd (t − t²/2), so t = 8, 4, 2
    violate Armijo (c₁ = 1e-4) and t = 1 is the first acceptable step."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(20, 5, generator=gen, dtype=DTYPE), torch.randn(20, 2, generator=gen)
    y = y.to(DTYPE)
    for max_tries in (20, 2):
        torch.manual_seed(0)
        model = nn.Linear(5, 2, bias=False).to(DTYPE)
        w0 = model.weight.detach().clone()
        loss0 = float(((x @ w0.T - y) ** 2).mean())
        g = 2 * (x @ w0.T - y).T @ x / y.numel()  # ∂L/∂W
        d = (torch.linalg.solve(x.T @ x, x.T @ y).T - w0).reshape(-1)
        gd = float(g.reshape(-1) @ d)
        damping = 0.0 if max_tries == 20 else 1e-3  # 0: d is the exact Newton step
        opt = NewtonCG(
            model.parameters(),
            model=model,
            loss_kind="mse",
            lr=8.0,
            damping=damping,
            min_damping=0.0,
            max_line_search=max_tries,
            **EXACT_CG,
        )
        closure = RecordingClosure(model=model, micro_batches=[(x, y)], loss_kind="mse")
        closure.trials = []
        opt.step(closure)
        steps = [8.0, 4.0, 2.0, 1.0][: len(closure.trials)]
        for t, value in zip(steps, closure.trials, strict=True):
            armijo = value <= loss0 + 1e-4 * t * gd
            assert armijo == (t == 1.0), (t, value, loss0)
        if max_tries == 20:
            assert opt.diagnostics["step_size"] == 1.0
            assert opt.diagnostics["line_search_tries"] == 4.0
            new_loss = float(((x @ model.weight.detach().T - y) ** 2).mean())
            assert new_loss == pytest.approx(closure.trials[-1], rel=1e-6)  # float32 evaluate()
        else:  # every try violated Armijo: no step, damping raised
            assert opt.diagnostics["step_size"] == 0.0
            assert torch.equal(model.weight.detach(), w0)
            assert opt.param_groups[0]["damping"] == pytest.approx(1.5e-3)


def _batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = tiny_batch("cross_entropy", n=8, seed=100 + step)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewtonCG])
def test_resume_is_bitwise_exact(cls: type[NewtonCG]) -> None:
    options = dict(
        loss_kind="cross_entropy",
        damping=1.0,
        cg_max_iters=5,
        cg_preconditioner=True,
        curvature_batch_fraction=0.5,
        cg_backtracking=True,
    )

    def run(model: nn.Module, opt: NewtonCG, steps: range) -> None:
        for s in steps:
            opt.step(
                Float64Closure(model=model, micro_batches=_batches(s), loss_kind="cross_entropy")
            )

    model = tiny_mlp()
    opt = cls(model.parameters(), model=model, **options)
    run(model, opt, range(3))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert "cg_warm_start" in opt.state[model[0].weight] and opt.global_state["step"] == 3
    assert opt.param_groups[0]["damping"] != options["damping"]  # adapted, and saved with it
    run(model, opt, range(3, 6))

    resumed = tiny_mlp(seed=7)
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), model=resumed, **options)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, range(3, 6))
    assert torch.equal(flat_params(resumed), flat_params(model))
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert opt2.global_state == opt.global_state

    fresh = tiny_mlp(seed=7)
    fresh.load_state_dict(saved_model)
    run(fresh, cls(fresh.parameters(), model=fresh, **options), range(3, 6))
    assert not torch.equal(flat_params(fresh), flat_params(model))  # the saved state mattered


def test_registry_and_validation() -> None:
    from secondorder.optim import OptimContext, build_optimizer

    model = tiny_mlp()
    context = OptimContext(model=model, loss_kind="cross_entropy")
    assert isinstance(build_optimizer("newton", model.parameters(), context), ExactNewton)
    opt = build_optimizer("newton_cg", model.parameters(), context, cg_mode="local")
    assert type(opt) is NewtonCG
    opt = build_optimizer("ggn_cg", model.parameters(), context, damping=0.1)
    assert type(opt) is GaussNewtonCG
    bad = [
        ("lr", -1.0),
        ("cg_mode", "ring"),
        ("hvp_mode", "fast"),
        ("damping", 1e9),
        ("curvature_batch_fraction", 0.0),
        ("cg_warm_start_decay", 2.0),
        ("line_search", 1),
        ("cg_max_iters", 0),
    ]
    for key, value in bad:
        with pytest.raises(ValueError, match=key):
            NewtonCG(model.parameters(), model=model, loss_kind="cross_entropy", **{key: value})
    with pytest.raises(ValueError, match="one parameter group"):
        NewtonCG(
            [{"params": [model[0].weight]}, {"params": [model[2].weight]}],
            model=model,
            loss_kind="cross_entropy",
        )


# -- data parallelism: 1 vs 2 vs 4 gloo ranks -----------------------------------------------------


def _train_case(world_size: int, rank: int, comm, cls_name: str, cg_mode: str):
    torch.set_default_dtype(DTYPE)  # the closure's loss accumulators, for float64 exactness
    model = tiny_mlp()
    cls = {"newton_cg": NewtonCG, "ggn_cg": GaussNewtonCG}[cls_name]
    opt = cls(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        comm=comm,
        damping=0.05,
        cg_max_iters=10,
        cg_mode=cg_mode,
    )
    per_rank = 8 // world_size
    micro = 2 if per_rank >= 4 else 1
    sent_before = comm.stats.bytes if comm is not None else 0
    for step in range(3):
        x, y = tiny_batch("cross_entropy", n=8, seed=200 + step)
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        size = per_rank // micro
        batches = [
            (x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(micro)
        ]
        opt.step(
            Float64Closure(model=model, micro_batches=batches, loss_kind="cross_entropy", comm=comm)
        )
    sent = (comm.stats.bytes if comm is not None else 0) - sent_before
    return flat_params(model), sent


def _ranks_main(world_size: int, cases: list[tuple[str, str]]):
    from secondorder.distributed.comm import TorchComm

    comm = TorchComm()
    return [_train_case(world_size, comm.rank, comm, *case) for case in cases]


GLOBAL_CASES = [("newton_cg", "global"), ("ggn_cg", "global")]


def _single_process(cases: list[tuple[str, str]]):
    default = torch.get_default_dtype()
    try:
        return [_train_case(1, 0, None, *case) for case in cases]
    finally:
        torch.set_default_dtype(default)


@pytest.mark.slow
def test_two_ranks_match_one_and_local_mode_runs() -> None:
    reference = _single_process(GLOBAL_CASES)
    cases = [*GLOBAL_CASES, ("ggn_cg", "local")]
    results = run_on_ranks(_ranks_main, world_size=2, args=(2, cases), timeout_s=180)
    for rank_results in results:
        for (params, sent), (ref_params, _) in zip(rank_results[:2], reference, strict=True):
            torch.testing.assert_close(params, ref_params, atol=1e-10, rtol=0)
            assert sent > 0  # counted by the communicator
    local = [r[2][0] for r in results]
    assert torch.equal(local[0], local[1]) and torch.isfinite(local[0]).all()
    assert not torch.allclose(local[0], reference[1][0], atol=1e-6)  # really a different solve


@pytest.mark.slow
def test_four_ranks_match_one() -> None:
    reference = _single_process(GLOBAL_CASES)
    results = run_on_ranks(_ranks_main, world_size=4, args=(4, GLOBAL_CASES), timeout_s=240)
    for rank_results in results:
        for (params, _), (ref_params, _) in zip(rank_results, reference, strict=True):
            torch.testing.assert_close(params, ref_params, atol=1e-10, rtol=0)
