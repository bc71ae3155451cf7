"""Curvature-vector products against explicit float64 matrices built in the test.

References: the full Hessian from ``torch.func.hessian`` of a hand-written loss of the flattened
parameters; the GGN as ``Jᵀ H_L J`` with ``J`` from ``torch.func.jacrev`` and ``H_L`` from
``torch.func.hessian`` of the hand-written loss w.r.t. the outputs; the empirical Fisher from
per-example gradients (``vmap(grad)``).
"""

from __future__ import annotations

import pytest
import torch
from float64_problems import DTYPE, KINDS, loss_by_hand, tiny_batch, tiny_mlp
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from secondorder.distributed.comm import NoComm
from secondorder.distributed.testing import run_on_ranks
from secondorder.optim.curvature import (
    CURVATURE_KINDS,
    HVP_MODES,
    CurvatureOperator,
    curvature_batches,
    dot,
    empirical_fisher_diagonal,
    empirical_fisher_vector_product,
    fisher_vector_product,
    flatten,
    ggn_vector_product,
    hessian_vector_product,
    params_by_name,
    unflatten,
)
from secondorder.optim.losses import loss_value


def _random_vector(params: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}


def _explicit(model: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor):
    """(H, G, F_emp) as dense matrices of the flattened parameters."""
    params = params_by_name(model)
    flat = flatten(params)

    def outputs(w: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(w, params), (x,))

    hess = hessian(lambda w: loss_by_hand(kind, outputs(w), y))(flat)
    z = outputs(flat)
    jac = jacrev(outputs)(flat).reshape(z.numel(), -1)
    h_out = hessian(lambda zz: loss_by_hand(kind, zz, y))(z).reshape(z.numel(), z.numel())
    ggn = jac.T @ h_out @ jac

    def example_loss(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        zi = functional_call(model, unflatten(w, params), (xi.unsqueeze(0),))
        return loss_by_hand(kind, zi, yi.unsqueeze(0))

    g = vmap(grad(example_loss), in_dims=(None, 0, 0))(flat, x, y)  # per-example gradients
    emp = g.T @ g / x.shape[0]
    return hess, ggn, emp


@pytest.mark.parametrize("kind", KINDS)
def test_products_match_explicit_matrices(kind: str) -> None:
    model = tiny_mlp()
    x, y = tiny_batch(kind, n=6)
    assert torch.allclose(
        loss_by_hand(kind, model(x), y), loss_value(kind, model(x), y), atol=1e-14
    )
    params = params_by_name(model)
    v = _random_vector(params)
    hess, ggn, emp = _explicit(model, kind, x, y)
    fv = flatten(v)
    for mode in HVP_MODES:
        hv = hessian_vector_product(model, params, (x, y), kind, v, mode=mode)
        torch.testing.assert_close(flatten(hv), hess @ fv, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(
        flatten(ggn_vector_product(model, params, (x, y), kind, v)), ggn @ fv, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        flatten(fisher_vector_product(model, params, (x, y), kind, v)), ggn @ fv, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        flatten(empirical_fisher_vector_product(model, params, (x, y), kind, v)),
        emp @ fv,
        atol=1e-12,
        rtol=0,
    )
    # The GGN and the Hessian differ (a test that could not tell them apart would prove nothing).
    assert (hess - ggn).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("curvature", CURVATURE_KINDS)
def test_operator_averages_micro_batches(kind: str, curvature: str) -> None:
    """Two micro-batches of 3 give the product on the union batch of 6, cached or not."""
    model = tiny_mlp()
    x, y = tiny_batch(kind, n=6)
    hess, ggn, emp = _explicit(model, kind, x, y)
    reference = {"hessian": hess, "ggn": ggn, "fisher": ggn, "empirical_fisher": emp}[curvature]
    params = params_by_name(model)
    v = _random_vector(params, seed=5)
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]
    variants = [
        {"cache": True},
        {"cache": False},
        {"hvp_mode": "forward_over_reverse"},
        {"jvp_mode": "linearize"} if curvature != "hessian" else {"cache": True},
    ]
    for options in variants:
        comm = NoComm()
        op = CurvatureOperator(
            model=model,
            params=params,
            batches=micro,
            loss_kind=kind,
            curvature=curvature,
            comm=comm,
            **options,
        )
        out = op(v)
        torch.testing.assert_close(flatten(out), reference @ flatten(v), atol=1e-12, rtol=0)
        assert op.products == 1 and comm.stats.bytes == 0


def test_cross_entropy_with_spatial_outputs() -> None:
    """Classes on dim 1 and positions after it: H_L averages over N × positions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).to(DTYPE)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 4, (3, 5), generator=gen)
    params = params_by_name(model)
    flat = flatten(params)

    def outputs(w: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(w, params), (x,))

    def loss(z: torch.Tensor) -> torch.Tensor:
        logp = z - torch.logsumexp(z, dim=1, keepdim=True)
        return -logp.gather(1, y.unsqueeze(1)).mean()

    z = outputs(flat)
    jac = jacrev(outputs)(flat).reshape(z.numel(), -1)
    ggn = jac.T @ hessian(loss)(z).reshape(z.numel(), z.numel()) @ jac
    v = _random_vector(params)
    got = ggn_vector_product(model, params, (x, y), "cross_entropy", v)
    torch.testing.assert_close(flatten(got), ggn @ flatten(v), atol=1e-12, rtol=0)


def test_helpers_and_subset_of_parameters() -> None:
    model = tiny_mlp()
    params = params_by_name(model)
    v = _random_vector(params)
    assert torch.equal(flatten(unflatten(flatten(v), params)), flatten(v))
    assert torch.allclose(dot(v, v), flatten(v).pow(2).sum())
    with pytest.raises(ValueError, match="elements"):
        unflatten(torch.zeros(3, dtype=DTYPE), params)
    with pytest.raises(ValueError, match="not parameters of the model"):
        params_by_name(model, [nn.Parameter(torch.zeros(2))])
    # Only the last layer optimised: the product is the last layer's block of the Hessian.
    x, y = tiny_batch("mse", n=6)
    hess, _, _ = _explicit(model, "mse", x, y)
    last = params_by_name(model, model[2].parameters())
    assert list(last) == ["2.weight", "2.bias"]
    w = _random_vector(last)
    block = hess[-18:, -18:]  # 5*3 + 3 parameters of the last Linear
    got = hessian_vector_product(model, last, (x, y), "mse", w)
    torch.testing.assert_close(flatten(got), block @ flatten(w), atol=1e-12, rtol=0)
    # The cached Hessian operator's by-products: L and ∇L of its batch.
    op = CurvatureOperator(
        model=model, params=params, batches=[(x, y)], loss_kind="mse", curvature="hessian"
    )
    model.zero_grad()
    reference_loss = loss_by_hand("mse", model(x), y)
    reference_loss.backward()
    torch.testing.assert_close(op.losses[0], reference_loss.detach())
    reference_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flatten(op.gradients[0]), reference_grad, atol=1e-14, rtol=0)
    x6, y6 = torch.zeros(6, 4), torch.zeros(6)
    sub = curvature_batches([(x6, y6), (x6, y6)], 0.34)
    assert [b[0].shape[0] for b in sub] == [3, 3]
    with pytest.raises(ValueError, match="curvature_batch_fraction"):
        curvature_batches([(x6, y6)], 0.0)
    with pytest.raises(ValueError, match="curvature"):
        CurvatureOperator(
            model=model, params=params, batches=[(x, y)], loss_kind="mse", curvature="newton"
        )


@pytest.mark.parametrize("kind", KINDS)
def test_empirical_fisher_diagonal_from_a_loop(kind: str) -> None:
    """(1/N) Σ_n g_n ⊙ g_n with g_n from one backward pass per example."""
    model = tiny_mlp()
    x, y = tiny_batch(kind, n=6)
    expected = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    for n in range(x.shape[0]):
        model.zero_grad()
        loss_by_hand(kind, model(x[n : n + 1]), y[n : n + 1]).backward()
        expected += torch.cat([p.grad.reshape(-1) for p in model.parameters()]) ** 2
    expected /= x.shape[0]
    params = params_by_name(model)
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]
    got = empirical_fisher_diagonal(model, params, micro, kind, chunk_size=2)
    torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-12)


def test_batch_norm_running_statistics_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).to(DTYPE).train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 2, (5,))
    params = params_by_name(model)
    v = _random_vector(params)
    for curvature in CURVATURE_KINDS:
        CurvatureOperator(
            model=model,
            params=params,
            batches=[(x, y)],
            loss_kind="cross_entropy",
            curvature=curvature,
        )(v)
    diag = empirical_fisher_diagonal(model, params, [(x, y)], "cross_entropy")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[1].track_running_stats
    # Batch norm: per-example gradients do not exist; the squared batch gradient stands in.
    model.eval()
    torch.nn.functional.cross_entropy(_functional_train_mode(model, x), y).backward()
    batch_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(diag, batch_grad**2, atol=1e-14, rtol=1e-12)


def _functional_train_mode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Train-mode forward (batch statistics) without touching the running statistics."""
    h = model[0](x)
    h = torch.nn.functional.batch_norm(
        h, None, None, model[1].weight, model[1].bias, training=True, eps=model[1].eps
    )
    return model[2](h)


def _rank_products(kind: str) -> list[torch.Tensor]:
    from secondorder.distributed.comm import TorchComm

    comm = TorchComm()
    model = tiny_mlp()
    x, y = tiny_batch(kind, n=8)
    shard = slice(comm.rank * 4, comm.rank * 4 + 4)
    params = params_by_name(model)
    out = []
    for curvature in ("hessian", "ggn"):
        op = CurvatureOperator(
            model=model,
            params=params,
            batches=[(x[shard][:2], y[shard][:2]), (x[shard][2:], y[shard][2:])],
            loss_kind=kind,
            curvature=curvature,
            comm=comm,
        )
        before = dict(comm.stats.totals["all_reduce"])
        out.append(op.matvec(flatten(_random_vector(params))))
        after = comm.stats.totals["all_reduce"]
        # One product is one all-reduce of the flat float64 product vector.
        assert after["calls"] - before["calls"] == 1
        assert after["bytes"] - before["bytes"] == out[-1].numel() * 8
        assert comm.stats.bytes == after["bytes"]  # nothing else was sent
    return out


@pytest.mark.slow
def test_operator_all_reduces_over_ranks() -> None:
    """Two ranks with two micro-batches of 2 each: the product on the global batch of 8."""
    model = tiny_mlp()
    x, y = tiny_batch("cross_entropy", n=8)
    hess, ggn, _ = _explicit(model, "cross_entropy", x, y)
    v = flatten(_random_vector(params_by_name(model)))
    results = run_on_ranks(_rank_products, world_size=2, args=("cross_entropy",), timeout_s=120)
    for hv, gv in results:
        torch.testing.assert_close(hv, hess @ v, atol=1e-12, rtol=0)
        torch.testing.assert_close(gv, ggn @ v, atol=1e-12, rtol=0)
