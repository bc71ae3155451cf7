"""``exclude_norm_and_bias_from_weight_decay``: no decay for biases and norm weights, explicit
update math for SGD, and K-FAC's preconditioner untouched (only its decay term changes)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from torch import nn

from secondorder.build import build_model, build_optimizer
from secondorder.config import ConfigError, validate
from secondorder.optim import SGD, BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.losses import loss_value
from secondorder.optim.weight_decay import decay_groups

DTYPE = torch.float64
FLAG = "exclude_norm_and_bias_from_weight_decay"


class _Net(nn.Module):
    """Linear (with bias) + LayerNorm + BatchNorm + Linear: every kind of excluded parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.norm(self.fc1(x)))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net().to(DTYPE)
    with torch.no_grad():  # norm parameters away from their 1/0 init, so decay would show
        for p in (*net.norm.parameters(), *net.bn.parameters()):
            p.add_(torch.randn_like(p))
    return net


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (16,), generator=gen)


class _Closure(BatchClosure):
    """Float64 loss plus ``0.5 η Σ‖θ‖²`` over the ``decayed`` parameters only."""

    eta = 0.0
    decayed: tuple[nn.Parameter, ...] = ()

    def loss_of(self, inputs, targets):
        l2 = sum((p * p).sum() for p in self.decayed)
        return loss_value(self.loss_kind, self.model(inputs), targets) + 0.5 * self.eta * l2


def test_split_decays_only_matrices_and_kernels() -> None:
    net = _net()
    groups = decay_groups(net.parameters(), exclude=True)
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]
    assert groups[0]["params"] == [net.fc1.weight, net.fc2.weight]
    plain = [net.fc1.bias, *net.norm.parameters(), *net.bn.parameters(), net.fc2.bias]
    assert groups[1]["params"] == plain
    # Without the option the parameters are handed on unchanged.
    assert decay_groups(net.parameters(), exclude=False) == list(net.parameters())


def _grad_at(theta: dict[str, torch.Tensor], x, y) -> dict[str, torch.Tensor]:
    net = _net()
    net.load_state_dict(theta, strict=False)
    BatchClosure(model=net, micro_batches=[(x, y)], loss_kind="cross_entropy")()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters()}


def test_sgd_update_is_the_explicit_formula() -> None:
    lr, wd, mu = 0.1, 0.05, 0.9
    net = _net()
    x, y = _batch()
    opt = SGD(net.parameters(), lr=lr, momentum=mu, weight_decay=wd, **{FLAG: True})
    closure = BatchClosure(model=net, micro_batches=[(x, y)], loss_kind="cross_entropy")
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    buf: dict[str, torch.Tensor] = {}
    for _ in range(2):  # d = g + η_p θ (η_p = 0 for biases and norms); b = μ b + d; θ -= lr b
        opt.step(closure)
        grads = _grad_at(theta, x, y)
        for n in theta:
            eta = wd if n in ("fc1.weight", "fc2.weight") else 0.0
            d = grads[n] + eta * theta[n]
            buf[n] = d if n not in buf else mu * buf[n] + d
            theta[n] = theta[n] - lr * buf[n]
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n], rtol=0, atol=1e-13)


def _kfac_run(model: nn.Module, *, wd: float, exclude: bool, l2: float) -> list[torch.Tensor]:
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.1,
        momentum=0.9,
        weight_decay=wd,
        fisher_type="empirical",
        factor_update_every=1,
        inverse_update_every=2,
        **{FLAG: exclude},
    )
    for seed in range(4):
        closure = _Closure(model=model, micro_batches=[_batch(seed)], loss_kind="cross_entropy")
        closure.eta = l2
        closure.decayed = (model.fc1.weight, model.fc2.weight)
        opt.step(closure)
    factors = [opt.state[layer.weight][key] for layer in opt.layers for key in ("A", "G")]
    return [*(p.detach().clone() for p in model.parameters()), *factors]


def test_kfac_decay_only_on_weights_and_preconditioner_unchanged() -> None:
    """K-FAC with the option equals K-FAC without decay whose loss carries ``η/2 ‖W‖²`` on the
    weights only: the decay term moved, the factors and preconditioning did not."""
    eta = 0.05
    excluded = _kfac_run(_net(), wd=eta, exclude=True, l2=0.0)
    explicit = _kfac_run(_net(), wd=0.0, exclude=False, l2=eta)
    for a, b in zip(excluded, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ... and it is a different run from decaying everything.
    everything = _kfac_run(_net(), wd=eta, exclude=False, l2=0.0)
    assert not torch.allclose(everything[1], excluded[1])  # fc1.bias


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb", "kfac"])
def test_every_optimizer_with_weight_decay_takes_the_option(name: str) -> None:
    overrides = [f"optimizer={name}", "model=resnet20", "data=synthetic"]
    assert compose_config(overrides).optimizer[FLAG] is False  # presets unchanged
    run = validate(
        compose_config([*overrides, "optimizer.weight_decay=0.01", f"optimizer.{FLAG}=true"])
    )
    model = build_model(run, torch.device("cpu"))
    opt = build_optimizer(run, model)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            expected = 0.01 if isinstance(module, (nn.Conv2d, nn.Linear)) and p.ndim > 1 else 0.0
            assert decays[id(p)] == expected, module_name


def test_optimizers_without_weight_decay_do_not_have_it() -> None:
    with pytest.raises(ConfigError, match=f"optimizer.{FLAG}"):
        validate(compose_config(["optimizer=newton_cg", f"+optimizer.{FLAG}=true"]))
