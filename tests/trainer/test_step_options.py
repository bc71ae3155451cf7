"""Options of the training step: label smoothing, precision ``auto``, ``torch.compile`` (and
the optimizers that refuse it), the GPU settings' composition on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config, small_run_overrides, train
from torch import nn

from secondorder.config import ConfigError, validate
from secondorder.optim import OPTIMIZERS, BatchClosure
from secondorder.optim.losses import loss_value
from secondorder.trainer.gpu_step import apply_gpu_step, to_channels_last
from secondorder.trainer.settings import COMPILE_REFUSED, resolve_precision


def _smoothed_cross_entropy(z: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """``-Σ_k q_k log softmax(z)_k`` with ``q = (1 - ε) onehot(y) + ε / K``, batch mean."""
    k = z.shape[1]
    q = torch.full_like(z, eps / k)
    q[torch.arange(len(y)), y] += 1 - eps
    return -(q * torch.log_softmax(z, dim=1)).sum(1).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothing_is_the_explicit_formula(eps: float) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    expected = _smoothed_cross_entropy(z, y, eps)
    torch.testing.assert_close(
        loss_value("cross_entropy", z, y, label_smoothing=eps), expected, rtol=1e-13, atol=0
    )
    # The training closure uses it; a float64 model keeps float64 logits.
    torch.manual_seed(0)
    model = nn.Linear(3, 5).double()
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    closure = BatchClosure(
        model=model, micro_batches=[(x, y)], loss_kind="cross_entropy", label_smoothing=eps
    )
    torch.testing.assert_close(closure(), _smoothed_cross_entropy(model(x), y, eps))


def test_label_smoothing_needs_cross_entropy() -> None:
    with pytest.raises(ValueError, match="label_smoothing needs the cross_entropy loss"):
        loss_value("mse", torch.zeros(2, 3), torch.zeros(2, 3), label_smoothing=0.1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.label_smoothing=1.0"], r"trainer.label_smoothing: must be in \[0, 1\), got 1.0"),
        (["trainer.label_smoothing=-0.1"], r"trainer.label_smoothing: must be in \[0, 1\)"),
        (
            ["model=autoencoder", "trainer.label_smoothing=0.1"],
            "trainer.label_smoothing: needs the cross_entropy loss, model autoencoder",
        ),
    ],
)
def test_label_smoothing_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides))


def test_precision_auto_resolves_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compose_config([]).trainer.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    for value in ("32", "bf16", "fp16"):
        assert resolve_precision(value, torch.device("cpu")) == value
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "32"


@pytest.mark.parametrize("name", sorted(COMPILE_REFUSED))
def test_compile_refused_for_curvature_optimizers(name: str) -> None:
    cfg = compose_config([f"optimizer={name}", "model=mlp", "trainer.compile=true"])
    with pytest.raises(ConfigError, match=rf"^trainer.compile=true: not supported with .*{name}"):
        validate(cfg)


def test_compile_accepted_for_first_order_optimizers() -> None:
    accepted = sorted(set(OPTIMIZERS) - set(COMPILE_REFUSED))
    # the library baselines read only the loss and gradients too
    assert accepted == ["adamw", "lamb", "lars", "muon", "neumann", "sgd", "shampoo", "soap"]
    for name in accepted:
        assert validate(
            compose_config([f"optimizer={name}", "trainer.compile=true"])
        ).trainer.compile


def test_gpu_settings_on_cpu_leave_the_model_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    assert apply_gpu_step(model, torch.device("cpu"), cudnn_benchmark=True, compile=False) == []
    assert model[0].weight.is_contiguous()
    x = torch.randn(2, 3, 5, 5)
    assert to_channels_last(x) is x  # CPU tensors stay as they are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_settings_on_cuda() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).cuda()
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    applied = apply_gpu_step(model, torch.device("cuda"), cudnn_benchmark=True, compile=False)
    assert applied == ["channels_last", "cudnn.benchmark"]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 5, 5, device="cuda"))
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compiled_sgd_trains_like_the_plain_model(tmp_path: Path, data_root: Path) -> None:
    extra = ("model=mlp", "optimizer=sgd", "trainer.max_steps=3", "trainer.eval_every=3")
    _, plain = train(small_run_overrides(tmp_path / "plain", data_root, *extra))
    summary, compiled = train(
        small_run_overrides(tmp_path / "compiled", data_root, *extra, "trainer.compile=true")
    )
    assert summary["status"] == "completed" and summary["precision"] == "32"
    assert set(compiled) == set(plain)  # in-place compile keeps the parameter names
    for key, value in plain.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-5, atol=1e-6)
    on_disk = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert on_disk["precision"] == "32"
