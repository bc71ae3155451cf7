"""Shampoo, SOAP and Muon from pytorch-optimizer: one Shampoo step against the paper's algorithm in
float64, a few training steps of each through the real entry point, 2 ranks equal 1 process,
checkpoint state, and the one-line error when the package is missing."""

from __future__ import annotations

import copy as copy_module
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_config, small_run_overrides, train
from torch import nn

from secondorder.config import ConfigError, validate
from secondorder.distributed.testing import run_on_ranks
from secondorder.optim import OptimContext, build_optimizer
from secondorder.optim import library_optimizers as library
from secondorder.optim.closure import BatchClosure

needs_library = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_optimizer") is None,
    reason="pytorch-optimizer is not installed (pip install '.[baselines]')",
)
NAMES = ["shampoo", "soap", "muon"]
# SOAP refreshes its eigenbasis a few times within the 12 steps of a small run.
SMALL_RUN = {"shampoo": (), "soap": ("optimizer.precondition_frequency=3",), "muon": ()}


def _power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
    """A symmetric positive definite matrix to a real power, by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values**exponent) @ vectors.T


@needs_library
def test_shampoo_steps_are_the_papers_algorithm() -> None:
    """Gupta et al. 2018, Algorithm 1 (a matrix W): L += G Gᵀ, R += Gᵀ G from ε I,
    W -= η L^{-1/4} G R^{-1/4}; for a vector b (order 1): H += g gᵀ, b -= η H^{-1/2} g."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    lr, eps = 0.1, 1e-3
    context = OptimContext(model=model, loss_kind="mse")
    optimizer = build_optimizer("shampoo", model.parameters(), context, lr=lr, matrix_eps=eps)
    stats = {"L": eps * torch.eye(2), "R": eps * torch.eye(3), "H": eps * torch.eye(2)}
    stats = {k: v.double() for k, v in stats.items()}
    for _ in range(3):
        x = torch.randn(5, 3, dtype=torch.float64)
        y = torch.randn(5, 2, dtype=torch.float64)
        optimizer.step(BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="mse"))
        weight = reference["weight"].requires_grad_()
        bias = reference["bias"].requires_grad_()
        loss = ((x @ weight.T + bias - y) ** 2).mean()
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        stats["L"] += grad_w @ grad_w.T
        stats["R"] += grad_w.T @ grad_w
        stats["H"] += torch.outer(grad_b, grad_b)
        with torch.no_grad():
            update_w = _power(stats["L"], -0.25) @ grad_w @ _power(stats["R"], -0.25)
            reference = {
                "weight": weight - lr * update_w,
                "bias": bias - lr * _power(stats["H"], -0.5) @ grad_b,
            }
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-9)


@needs_library
def test_muon_gets_the_hidden_matrices_adamw_the_rest() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    context = OptimContext(model=model, loss_kind="mse")
    optimizer = build_optimizer("muon", model.parameters(), context, lr=0.05, adamw_lr=0.001)
    muon, adamw = optimizer.param_groups
    assert muon["use_muon"] and not adamw["use_muon"]
    assert [tuple(p.shape) for p in muon["params"]] == [(8, 4), (8, 8)]
    assert [tuple(p.shape) for p in adamw["params"]] == [(8,), (8,), (3, 8), (3,)]
    assert (muon["lr"], adamw["lr"]) == (0.05, 0.001)


@needs_library
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_exactly(name: str) -> None:
    """The wrapper's state_dict is the library's: a copy loaded into a fresh optimizer continues
    bitwise like the original."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(6)]

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        model.append(nn.Linear(8, 3))
        hyper = {"precondition_frequency": 2} if name == "soap" else {}
        context = OptimContext(model=model, loss_kind="cross_entropy")
        return model, build_optimizer(name, model.parameters(), context, **hyper)

    def steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
        for batch in batches:
            closure = BatchClosure(model=model, micro_batches=[batch], loss_kind="cross_entropy")
            assert torch.isfinite(optimizer.step(closure))

    model, optimizer = make()
    steps(model, optimizer, data[:3])
    copy, copy_optimizer = make()
    copy.load_state_dict(model.state_dict())
    copy_optimizer.load_state_dict(copy_module.deepcopy(optimizer.state_dict()))  # as if saved
    steps(model, optimizer, data[3:])
    steps(copy, copy_optimizer, data[3:])
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, copy.state_dict()[key]), key
    assert not torch.equal(model[0].weight, make()[0][0].weight)  # it trained


def _float64_steps(world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each optimizer's weights after 8 steps of a float64 MLP on fixed global batches of 32:
    on one process as two micro-batches of 16, on two ranks one half each."""
    comm = None
    if world_size > 1:
        from secondorder.distributed.comm import TorchComm

        comm = TorchComm()
    rank = comm.rank if comm is not None else 0
    weights = {}
    for name in NAMES:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        model = model.append(nn.Linear(8, 3)).double()
        context = OptimContext(model=model, loss_kind="cross_entropy", comm=comm)
        hyper = {"precondition_frequency": 3} if name == "soap" else {}
        optimizer = build_optimizer(name, model.parameters(), context, **hyper)
        for _ in range(8):
            x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
            halves = [(x[:16], y[:16]), (x[16:], y[16:])]
            closure = BatchClosure(
                model=model,
                micro_batches=halves if comm is None else [halves[rank]],
                loss_kind="cross_entropy",
                comm=comm,
            )
            optimizer.step(closure)
        weights[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


@needs_library
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process_in_float64() -> None:
    """The closure all-reduces gradients before the library's update: 2 ranks take one process's
    steps. In float64, since SOAP's eigenbases and Muon's bfloat16 Newton-Schulz iterations blow
    float32 rounding up to visible differences (on one process too: 1 vs 4 micro-batches)."""
    single = _float64_steps(1)
    first, second = run_on_ranks(_float64_steps, world_size=2, args=(2,), timeout_s=150)
    for name in NAMES:
        for key, tensor in single[name].items():
            assert torch.equal(first[name][key], second[name][key]), (name, key)
            torch.testing.assert_close(first[name][key], tensor, rtol=1e-9, atol=1e-12)
            assert not torch.equal(tensor, _float64_init()[key]), (name, key)  # it moved


def _float64_init() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    return model.append(nn.Linear(8, 3)).double().state_dict()


def _train_on_rank(overrides: list[str]) -> dict[str, torch.Tensor] | None:
    from secondorder.train import run

    summary = run(compose_config(overrides))
    assert summary["status"] == "completed", summary
    if int(os.environ["RANK"]) != 0:
        return None
    return torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)


@needs_library
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_training_through_the_entry_point(tmp_path: Path, data_root: Path, name: str) -> None:
    """A few training steps of each through the entry point. Shampoo's float32 steps on 2 ranks
    also equal one process's (SOAP's and Muon's only in float64: the test above)."""
    extra = (f"optimizer={name}", "trainer.max_micro_batch=16", *SMALL_RUN[name])
    summary, single = train([*small_run_overrides(tmp_path / "one", data_root, *extra)])
    assert summary["status"] == "completed" and math.isfinite(summary["final_train_loss"])
    if name != "shampoo":
        return
    overrides = small_run_overrides(tmp_path / "two", data_root, *extra, "distributed=torch")
    double = run_on_ranks(_train_on_rank, world_size=2, args=(overrides,), timeout_s=240)[0]
    for key, tensor in single.items():
        torch.testing.assert_close(double[key], tensor, rtol=1e-5, atol=1e-6)


def test_missing_package_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library, "PACKAGE", "no_such_package_here")
    for name in NAMES:
        with pytest.raises(ConfigError) as err:
            validate(compose_config([f"optimizer={name}"]))
        assert str(err.value) == (
            f"optimizer={name} needs the pytorch-optimizer package (pip install '.[baselines]')"
        )
    with pytest.raises(ModuleNotFoundError, match="SOAP needs the pytorch-optimizer package"):
        library.SOAP(nn.Linear(2, 2).parameters())


def test_missing_package_exits_2_with_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; import secondorder.optim.library_optimizers as library; "
        "library.PACKAGE = 'no_such_package_here'; "
        "sys.argv = ['train', 'optimizer=soap', 'logger=none']; "
        "from secondorder.train import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert lines == [
        "error: optimizer=soap needs the pytorch-optimizer package (pip install '.[baselines]')"
    ]


@needs_library
@pytest.mark.parametrize(
    ("name", "override", "key"),
    [
        ("shampoo", "momentum=1.0", "momentum"),
        ("shampoo", "preconditioning_compute_steps=0", "preconditioning_compute_steps"),
        ("soap", "beta2=1.5", "beta2"),
        ("soap", "shampoo_beta=-0.5", "shampoo_beta"),
        ("muon", "adamw_lr=-1", "adamw_lr"),
        ("muon", "ns_steps=0", "ns_steps"),
    ],
)
def test_range_error_names_the_key(name: str, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config([f"optimizer={name}", f"optimizer.{override}"]))
    assert str(err.value).startswith(f"optimizer.{key}: Invalid {key} value"), str(err.value)
