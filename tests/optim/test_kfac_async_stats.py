"""K-FAC statistics workers: the worker's sums are the K-FAC statistics of its own mini-batch
(explicit per-example mathematics in float64), the rank folds them exactly like synchronous
K-FAC folds its own, the training step does no factor work, and asynchronous workers train and
survive a SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac.async_stats import factor_statistics, stream_seed
from secondorder.optim.kfac.capture import FactorCapture
from secondorder.optim.kfac.worker_settings import StatsSettings, WorkersSettings
from secondorder.trainer.stats_source import StatsSource

N_DATA = 40


class _Source:
    """An in-process recipe (sync mode does not pickle it): a float64 MLP and 40 examples."""

    def build(self):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(N_DATA, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 2, (N_DATA,), generator=gen)
        return model, (lambda idx: (x[idx], y[idx])), N_DATA


def _kfac(model: nn.Module, fisher: str = "empirical", **kw) -> KFAC:
    return KFAC(
        model.parameters(), model=model, loss_kind="cross_entropy", lr=0.1, fisher_type=fisher, **kw
    )


def _settings(**stats) -> WorkersSettings:
    return WorkersSettings(mode="sync", stats=StatsSettings(num_processes=1, **stats))


def _one_result(fisher: str, batch_size: int = 8):
    model, batch, _ = _Source().build()
    opt = _kfac(model, fisher)
    handle = opt.attach_workers(_settings(batch_size=batch_size), source=_Source())
    try:
        job = handle.stats.pool.jobs[0]
        inputs = {f"P.{n}": p.detach().clone() for n, p in model.named_parameters()}
        out = factor_statistics(inputs, {**job.options, "iteration": 4, "version": 9})
    finally:
        handle.close()
    seed = stream_seed(0, 0, 0, 4)  # the worker's stream: seed 0, rank 0, worker 0, iteration 4
    return model, batch, out, seed


def test_worker_statistics_are_the_explicit_per_example_sums() -> None:
    """Empirical Fisher, float64: ``Σ ā āᵀ`` and ``Σ_n g_n g_nᵀ`` with ``g_n = ∂ℓ_n/∂s``
    written out by hand for Linear → tanh → Linear with cross-entropy."""
    model, batch, out, seed = _one_result("empirical")
    gen = torch.Generator().manual_seed(seed)
    x, y = batch(torch.randint(N_DATA, (8,), generator=gen))
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    s1 = x @ w1.T + b1
    h = torch.tanh(s1)
    s2 = h @ w2.T + b2
    g2 = torch.softmax(s2, dim=1) - torch.nn.functional.one_hot(y, 2).double()  # ∂ℓ_n/∂s2
    g1 = (g2 @ w2) * (1 - h**2)  # ∂ℓ_n/∂s1
    ones = torch.ones(8, 1, dtype=torch.float64)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([h, ones], 1)
    torch.testing.assert_close(out["L0.A"], a1.T @ a1)
    torch.testing.assert_close(out["L1.A"], a2.T @ a2)
    torch.testing.assert_close(out["L0.G"], g1.T @ g1)
    torch.testing.assert_close(out["L1.G"], g2.T @ g2)
    assert out["counts"].tolist() == [[8.0, 8.0], [8.0, 8.0]]
    assert float(out["version"]) == 9.0


def test_worker_true_fisher_statistics_equal_the_training_steps_capture() -> None:
    """True Fisher: the same sums as the training step's hooks on the same batch and draws."""
    model, batch, out, seed = _one_result("true")
    gen = torch.Generator().manual_seed(seed)
    x, _ = batch(torch.randint(N_DATA, (8,), generator=gen))
    opt = _kfac(model, "true")
    capture = FactorCapture(
        opt.layers, model, fisher_type="true", loss_kind="cross_entropy", generator=gen
    )
    with capture, torch.enable_grad():
        model(x)
    capture.finish()
    for i in range(2):
        for name in ("A", "G"):
            assert torch.equal(out[f"L{i}.{name}"], capture.sums[i][name]), (i, name)


def test_sync_stats_workers_fold_their_statistics_and_the_step_does_no_factor_work() -> None:
    """Factors after 6 steps (factor steps 0, 2, 4; parameters refreshed at 0 and 3) equal the
    running average of the worker's results recomputed from the recorded snapshots; the model
    runs one forward per step (the closure's): no capture, no sampled backward."""
    model, batch, _ = _Source().build()
    opt = _kfac(model, "true", factor_update_every=2, inverse_update_every=2, factor_decay=0.9)
    handle = opt.attach_workers(_settings(batch_size=6, refresh_every=3), source=_Source())
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    snapshots = []
    try:
        job = handle.stats.pool.jobs[0]
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            snapshots.append({f"P.{n}": p.detach().clone() for n, p in model.named_parameters()})
            x, y = batch(torch.randint(N_DATA, (10,), generator=gen))
            opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
        assert opt.diagnostics["stats_results"] == 3
    finally:
        handle.close()
    assert len(forwards) == 6
    expected: dict[str, torch.Tensor] = {}
    for iteration, (k, refreshed) in enumerate([(0, 0), (2, 0), (4, 3)]):
        out = factor_statistics(
            snapshots[refreshed], {**job.options, "iteration": iteration, "version": refreshed}
        )
        assert int(out["version"]) == refreshed and k >= refreshed
        for i in range(2):
            for name, col in (("A", 0), ("G", 1)):
                batch_value = out[f"L{i}.{name}"] / out["counts"][i, col]
                key = f"{i}.{name}"
                old = expected.get(key)
                expected[key] = batch_value if old is None else 0.9 * old + 0.1 * batch_value
    for i, layer in enumerate(opt.layers):
        for name in ("A", "G"):
            torch.testing.assert_close(opt.state[layer.weight][name], expected[f"{i}.{name}"])


def test_stats_workers_need_the_runs_recipe() -> None:
    model, _, _ = _Source().build()
    with pytest.raises(ValueError, match="rebuild the model and data"):
        _kfac(model).attach_workers(_settings())


def test_a_failing_recipe_is_a_clear_error_not_a_hang() -> None:
    class Broken:
        def build(self):
            raise OSError("no such data file: /nowhere.npz")

    model, batch, _ = _Source().build()
    opt = _kfac(model)
    handle = opt.attach_workers(_settings(), source=Broken())
    try:
        x, y = batch(torch.arange(8))
        with pytest.raises(OSError, match="no such data file"):
            opt.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy"))
    finally:
        handle.close()


@pytest.mark.slow
def test_async_stats_workers_train_and_a_killed_one_is_restarted(data_root: Path) -> None:
    """Spawned statistics and inversion workers on MNIST-1D (the trainer's recipe): the model
    fits a batch, a SIGKILLed statistics worker is restarted and statistics keep arriving."""
    source = StatsSource(
        model="cnn1d",
        data="mnist1d",
        data_kwargs={"root": str(data_root), "num_samples": 1200, "progress": False},
    )
    model, batch, size = source.build()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.1,
        factor_update_every=1,
        inverse_update_every=2,
        damping=0.1,
    )
    settings = WorkersSettings(
        mode="async",
        max_staleness=2,
        heartbeat_s=60.0,
        max_restarts=1,
        stats=StatsSettings(num_processes=1, refresh_every=2, batch_size=64),
    )
    handle = opt.attach_workers(settings, source=source)
    x, y = batch(torch.arange(64))
    losses, diagnostics = [], []
    deadline = time.time() + 120
    try:  # 40 steps, and on until the restarted worker (a fresh interpreter) delivered
        while (
            len(losses) < 40 or diagnostics[-1]["stats_results"] <= diagnostics[16]["stats_results"]
        ):
            assert time.time() < deadline, "no statistics after the restart"
            if len(losses) == 15:
                os.kill(handle.stats.pool.pids[0], signal.SIGKILL)
                time.sleep(0.5)
            closure = BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy")
            losses.append(float(opt.step(closure)))
            diagnostics.append(dict(opt.diagnostics))
            time.sleep(0.02)  # give the workers a share of the two cores
    finally:
        handle.close()
    last = diagnostics[-1]
    assert last["worker_restarts"] == 1 and last["stats_errors"] == 0
    assert diagnostics[14]["stats_results"] >= 2
    assert max(d["inverse_staleness"] for d in diagnostics) <= 2
    assert max(losses[-5:]) < 0.5 * losses[0], losses
