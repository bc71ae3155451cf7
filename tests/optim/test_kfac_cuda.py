"""K-FAC on a CUDA device (skipped without one): the CPU tests' bodies on the GPU.

Checks what only a device exercises: generator, counts and buffers on the right device, mixed
precision (bf16 autocast: statistics still in float32), CPU/GPU agreement in float64 and an
exact resume with a CUDA generator.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.losses import loss_value

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Float64Closure(BatchClosure):
    """``BatchClosure`` without its ``outputs.float()`` cast, which rounds float64 to float32."""

    def loss_of(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_value(self.loss_kind, self.model(inputs), targets)


def _model(device: str, dtype=torch.float32, norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8) if norm else nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    ).to(device=device, dtype=dtype)


def _batches(steps: int, device: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(32, 3, 16, 16, generator=gen).to(device, dtype)
        out.append((x, torch.randint(0, 10, (32,), generator=gen).to(device)))
    return out


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_cuda(method: str, fisher: str, bf16: bool) -> None:
    model = _model("cuda")
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.1,
        damping=0.01,
        inverse_method=method,
        fisher_type=fisher,
        factor_update_every=2,
        inverse_update_every=4,
        levenberg_marquardt=True,
        damping_adapt_every=3,
        other_preconditioner="adam",
        double_factor_threshold=64,
    )
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    batch = _batches(1, "cuda")[0]
    losses = []
    for _ in range(12):
        closure = BatchClosure(
            model=model, micro_batches=[batch], loss_kind="cross_entropy", autocast=autocast
        )
        losses.append(float(opt.step(closure)))
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    conv = opt.state[model[0].weight]
    assert conv["A"].device.type == "cuda" and conv["A"].dtype == torch.float32
    assert "K" in opt.state[model[6].weight]  # 392 inputs > 64: doubly factored
    assert int(opt.diagnostics["skipped_steps"]) == 0


def test_cuda_matches_cpu_in_float64() -> None:
    results = []
    for device in ("cpu", "cuda"):
        model = _model(device, torch.float64)
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.1,
            fisher_type="empirical",
            factor_update_every=1,
            inverse_update_every=2,
        )
        for x, y in _batches(3, device, torch.float64):
            opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_resume_on_cuda_is_bitwise_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # cuDNN's default convolution backward is not deterministic run to run.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    batches = _batches(6, "cuda")

    def run(model, opt, part):
        for x, y in part:
            opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))

    def make(model):
        return KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.05,
            factor_update_every=1,
            inverse_update_every=2,
        )

    model = _model("cuda", norm=False)
    opt = make(model)
    run(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, batches[3:])
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    resumed = _model("cuda", norm=False)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_async_workers_on_cuda_hand_over_pinned_results() -> None:
    """Inversion workers (CPU processes) for a CUDA model: results come back in page-locked
    memory, are installed on the device, and training matches in-process K-FAC (decompositions
    from CPU LAPACK vs the GPU solver: close, not bitwise)."""
    from secondorder.optim.kfac.worker_settings import WorkersSettings

    params = {}
    for workers in (False, True):
        model = _model("cuda")
        opt = KFAC(
            model.parameters(),
            model=model,
            loss_kind="cross_entropy",
            lr=0.1,
            factor_update_every=1,
            inverse_update_every=2,
            damping=0.1,
        )
        settings = WorkersSettings(mode="async", max_staleness=0, heartbeat_s=60.0)
        handle = opt.attach_workers(settings) if workers else None
        try:
            for x, y in _batches(6, "cuda"):
                closure = BatchClosure(
                    model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"
                )
                opt.step(closure)
            if handle is not None:
                assert handle.pool.pin_memory
                newest = handle.pool.newest(0)
                assert newest is not None and all(t.is_pinned() for t in newest[1].values())
                assert opt.state[opt.layers[0].weight]["Q_A"].is_cuda
                assert opt.diagnostics["inverse_fallbacks"] == 0
        finally:
            if handle is not None:
                handle.close()
        params[workers] = [p.detach().cpu() for p in model.parameters()]
    for a, b in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
