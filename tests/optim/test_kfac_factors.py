"""K-FAC factor statistics against explicit float64 references written here.

Conventions under test (see ``secondorder/optim/kfac/capture.py``): ``A = mean_{n,t} ā āᵀ``,
``G = (1/N) Σ_{n,t} g gᵀ`` with ``g = ∂ℓ_n/∂s`` the per-example loss gradient, column-major
``vec`` so that ``A ⊗ G`` is ``torch.kron(A, G)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac.layers import find_layers
from secondorder.optim.losses import loss_value

DTYPE = torch.float64


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its ``outputs.float()`` cast, which rounds float64 to float32."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)


def _factors(model, micro_batches, *, loss_kind="cross_entropy", fisher_type="empirical", **kw):
    """One optimizer step with lr 0: the factors are the batch statistics of this batch."""
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind=loss_kind,
        lr=0.0,
        fisher_type=fisher_type,
        factor_update_every=1,
        kl_clip=None,
        **kw,
    )
    closure = Float64Closure(model=model, micro_batches=micro_batches, loss_kind=loss_kind)
    opt.step(closure)
    return opt


def _homogeneous(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def _per_example_output_grads(forward, x, y, loss_kind="cross_entropy"):
    """g_n = ∂ℓ_n/∂s for every example, one autograd call per example (explicit loop)."""
    grads = []
    for n in range(x.shape[0]):
        s = forward.first(x[n : n + 1]).detach().requires_grad_(True)
        loss = loss_value(loss_kind, forward.rest(s), y[n : n + 1])
        grads.append(torch.autograd.grad(loss, s)[0][0])
    return torch.stack(grads)


class _MLPParts:
    def __init__(self, model):
        self.model = model

    def first(self, x):
        return self.model[0](x)

    def rest(self, s):
        return self.model[2](self.model[1](s))


def test_linear_factors_match_explicit_per_example_sums() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,))
    opt = _factors(model, [(x[:4], y[:4]), (x[4:], y[4:])])  # two micro-batches
    a1 = _homogeneous(x)
    a2 = _homogeneous(torch.tanh(model[0](x))).detach()
    g1 = _per_example_output_grads(_MLPParts(model), x, y)
    expected_a1 = sum(torch.outer(a, a) for a in a1) / 8
    expected_a2 = sum(torch.outer(a, a) for a in a2) / 8
    expected_g1 = sum(torch.outer(g, g) for g in g1) / 8
    state1, state2 = opt.state[model[0].weight], opt.state[model[2].weight]
    torch.testing.assert_close(state1["A"], expected_a1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state2["A"], expected_a2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state1["G"], expected_g1, rtol=1e-12, atol=1e-14)
    # The output layer: g = softmax − onehot, per example.
    p = torch.softmax(model(x), dim=1).detach()
    g2 = p - F.one_hot(y, 3).to(DTYPE)
    torch.testing.assert_close(state2["G"], g2.T @ g2 / 8, rtol=1e-12, atol=1e-14)


def test_empirical_fisher_of_one_example_is_exactly_a_kron_g() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 4).to(DTYPE)
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([2])
    opt = _factors(model, [(x, y)])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return loss_value("cross_entropy", out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    grad_bar = torch.cat([grads["weight"][0], grads["bias"][0].unsqueeze(1)], dim=1)
    vec = grad_bar.T.reshape(-1)  # column-major vec(∇W̄)
    fisher = torch.outer(vec, vec)
    state = opt.state[model.weight]
    torch.testing.assert_close(torch.kron(state["A"], state["G"]), fisher, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(2, 3, 3, stride=2, padding=1),
        nn.Conv1d(2, 3, 2, dilation=2, padding=2, bias=False),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
    ],
)
def test_conv_factors_match_explicit_patches(conv: nn.Module) -> None:
    torch.manual_seed(2)
    conv = conv.to(DTYPE)
    one_d = isinstance(conv, nn.Conv1d)
    x = torch.randn(3, 2, 7, dtype=DTYPE) if one_d else torch.randn(3, 2, 5, 4, dtype=DTYPE)
    with torch.no_grad():
        features = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 4)).to(DTYPE)
    y = torch.randint(0, 4, (3,))
    opt = _factors(model, [(x, y)])
    patches = _explicit_patches(conv, x)  # (N, T, C·k) by loops over positions
    if conv.bias is not None:
        patches = _homogeneous(patches)
    n, t = patches.shape[:2]
    expected_a = sum(torch.outer(p, p) for p in patches.reshape(n * t, -1)) / (n * t)

    class Parts:
        def first(self, xi):
            return conv(xi)

        def rest(self, s):
            return model[3](model[2](model[1](s)))

    g = _per_example_output_grads(Parts(), x, y)  # (N, C_out, *spatial)
    g_rows = g.reshape(n, conv.out_channels, -1).transpose(1, 2)  # (N, T, C_out)
    expected_g = sum(torch.outer(r, r) for r in g_rows.reshape(n * t, -1)) / n  # sum over t
    state = opt.state[conv.weight]
    torch.testing.assert_close(state["A"], expected_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["G"], expected_g, rtol=1e-12, atol=1e-14)


def _explicit_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches read position by position from the padded input (channel-major, like weight)."""
    one_d = isinstance(conv, nn.Conv1d)
    xs = x.unsqueeze(2) if one_d else x
    kh, kw = (1, conv.kernel_size[0]) if one_d else conv.kernel_size
    sh, sw = (1, conv.stride[0]) if one_d else conv.stride
    dh, dw = (1, conv.dilation[0]) if one_d else conv.dilation
    if conv.padding == "same":
        ph, pw = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
        mode = conv.padding_mode
    else:
        ph, pw = (0, conv.padding[0]) if one_d else conv.padding
        mode = "constant"
    xs = F.pad(xs, (pw, pw, ph, ph), mode=mode)
    rows = []
    out_h = (xs.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xs.shape[3] - dw * (kw - 1) - 1) // sw + 1
    for i in range(out_h):
        for j in range(out_w):
            window = xs[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(window.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv_patches_reproduce_the_module_output() -> None:
    torch.manual_seed(3)
    for conv in [
        nn.Conv1d(3, 4, 4, stride=3, dilation=2, padding=3, padding_mode="circular"),
        nn.Conv1d(3, 4, 4, padding="same"),
        nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(2, 1), padding=(1, 2)),
        nn.Conv2d(3, 4, 3, padding="valid", bias=False),
    ]:
        conv = conv.to(DTYPE)
        x = torch.randn(2, 3, 11, dtype=DTYPE)
        if isinstance(conv, nn.Conv2d):
            x = torch.randn(2, 3, 9, 8, dtype=DTYPE)
        (layer,) = find_layers(conv, conv.parameters(), double_factor_threshold=10**6)
        rows = layer.activation_rows(x)  # (N·T, C·k)
        out = rows @ conv.weight.reshape(4, -1).T
        if conv.bias is not None:
            out = out + conv.bias
        expected = layer.output_rows(conv(x))
        torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)


def _exact_ce_g(logits: torch.Tensor) -> torch.Tensor:
    """E_{y~softmax}[g gᵀ] enumerated over classes, averaged over examples."""
    p = torch.softmax(logits, dim=1)
    total = torch.zeros(p.shape[1], p.shape[1], dtype=DTYPE)
    for pn in p:
        for c in range(p.shape[1]):
            g = pn - F.one_hot(torch.tensor(c), p.shape[1]).to(DTYPE)
            total += pn[c] * torch.outer(g, g)
    return total / p.shape[0]


def test_true_fisher_g_converges_to_the_class_expectation() -> None:
    torch.manual_seed(4)
    model = nn.Linear(3, 4).to(DTYPE)
    base = torch.randn(2, 3, dtype=DTYPE)
    exact = _exact_ce_g(model(base).detach())
    errors = []
    for repeats in (25, 400, 20000):
        x = base.repeat(repeats, 1)
        y = torch.zeros(x.shape[0], dtype=torch.long)  # real targets are ignored
        opt = _factors(model, [(x, y)], fisher_type="true", seed=repeats)
        errors.append((opt.state[model.weight]["G"] - exact).abs().max().item())
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.01  # ~4 standard errors of a 40 000-sample mean of entries <= 0.25


def test_true_fisher_through_inplace_relu_matches_the_ggn() -> None:
    """G of a hidden layer followed by ReLU(inplace=True): the exact E[g gᵀ] = Jᵀ H J."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)).to(DTYPE)
    base = torch.randn(2, 3, dtype=DTYPE)
    exact = torch.zeros(5, 5, dtype=DTYPE)
    for xn in base:
        s = model[0](xn).detach()
        jac = torch.autograd.functional.jacobian(lambda v: model[2](torch.relu(v)), s)
        p = torch.softmax(model(xn.unsqueeze(0))[0], 0).detach()
        exact += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / 2
    x = base.repeat(20000, 1)
    opt = _factors(model, [(x, torch.zeros(40000, dtype=torch.long))], fisher_type="true")
    torch.testing.assert_close(opt.state[model[0].weight]["G"], exact, rtol=0, atol=0.01)


@pytest.mark.parametrize("loss_kind", ["mse", "bernoulli"])
def test_true_fisher_g_matches_the_output_hessian(loss_kind: str) -> None:
    """Sampled G of the output layer → ∂²ℓ/∂f²: (2/D) I for mse, diag(σ(1−σ))/D for bernoulli."""
    torch.manual_seed(6)
    model = nn.Linear(3, 4).to(DTYPE)
    base = torch.randn(2, 3, dtype=DTYPE)
    f = model(base).detach()
    if loss_kind == "mse":
        exact = torch.eye(4, dtype=DTYPE) * 2 / 4
    else:
        s = torch.sigmoid(f)
        exact = torch.diag((s * (1 - s)).mean(0)) / 4
    x = base.repeat(20000, 1)
    opt = _factors(
        model, [(x, torch.zeros(40000, 4, dtype=DTYPE))], loss_kind=loss_kind, fisher_type="true"
    )
    torch.testing.assert_close(opt.state[model.weight]["G"], exact, rtol=0, atol=0.01)
