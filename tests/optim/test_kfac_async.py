"""K-FAC with curvature workers: sync mode and max_staleness=0 equal synchronous
K-FAC bitwise; stale inverses still train; a killed worker is restarted; SIGTERM of the trainer
leaves no process and no shared-memory segment behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from secondorder.optim.closure import BatchClosure
from secondorder.optim.kfac import KFAC
from secondorder.optim.kfac.worker_settings import InversionSettings, WorkersSettings


class _Net(nn.Module):
    """Conv1d + a doubly-factored Linear (threshold 8 < 12 inputs) + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3, stride=2)
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.unsqueeze(1))).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _batches(steps: int, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, 10, generator=gen), torch.randint(0, 4, (n,), generator=gen))
        for _ in range(steps)
    ]


def _train(
    method: str,
    settings: WorkersSettings | None,
    steps: int = 9,
    kill_at: int = -1,
    one_batch: bool = False,
    damping: float = 1e-3,
):
    torch.manual_seed(0)
    model = _Net()
    opt = KFAC(
        model.parameters(),
        model=model,
        loss_kind="cross_entropy",
        lr=0.1,
        factor_update_every=2,
        inverse_update_every=3,
        inverse_method=method,
        double_factor_threshold=8,
        kl_clip=1e-2,
        damping=damping,
    )
    assert any(layer.double_shape is not None for layer in opt.layers)
    handle = opt.attach_workers(settings) if settings is not None else None
    diagnostics, losses = [], []
    try:
        batches = _batches(1) * steps if one_batch else _batches(steps)
        for k, (x, y) in enumerate(batches):
            if k == kill_at:
                os.kill(handle.pool.pids[0], signal.SIGKILL)
                time.sleep(0.5)
            closure = BatchClosure(model=model, micro_batches=[(x, y)], loss_kind="cross_entropy")
            losses.append(float(opt.step(closure)))
            diagnostics.append(dict(opt.diagnostics))
    finally:
        if handle is not None:
            handle.close()
    assert opt.curvature_workers is None  # closed: back to in-process decompositions
    return model, opt, diagnostics, losses


def _assert_same(a: tuple, b: tuple) -> None:
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q)
    for layer_a, layer_b in zip(a[1].layers, b[1].layers, strict=True):
        sa, sb = a[1].state[layer_a.weight], b[1].state[layer_b.weight]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_sync_mode_equals_synchronous_kfac_bitwise(method: str) -> None:
    reference = _train(method, None)
    synced = _train(method, WorkersSettings(mode="sync", max_staleness=5))
    _assert_same(reference, synced)
    assert all(d["inverse_staleness"] == 0 for d in synced[2])
    assert synced[2][-1]["inverse_waits"] == 0  # computed at publish: nothing to wait for


def test_async_with_max_staleness_zero_equals_sync_bitwise() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: same LAPACK paths
    try:
        settings = WorkersSettings(
            mode="async",
            max_staleness=0,
            heartbeat_s=60.0,
            inversion=InversionSettings(num_processes=2),
        )
        _assert_same(_train("inverse", None), _train("inverse", settings))
    finally:
        torch.set_num_threads(threads)


def test_stale_inverses_train_and_a_killed_worker_is_restarted() -> None:
    settings = WorkersSettings(mode="async", max_staleness=2, heartbeat_s=60.0, max_restarts=1)
    # λ = 0.1: with λ = 1e-3 even synchronous K-FAC spikes on this 16-example batch (sampled
    # true-Fisher G from 16 draws), so the loss would say more about the draw than the workers.
    _, _, diagnostics, losses = _train(
        "eigen", settings, steps=40, kill_at=20, one_batch=True, damping=0.1
    )
    assert max(d["inverse_staleness"] for d in diagnostics) <= 2
    assert diagnostics[-1]["worker_restarts"] == 1
    assert diagnostics[-1]["inverse_fallbacks"] == 0
    assert max(losses[-5:]) < 0.5 * losses[0], losses  # fits the one batch despite staleness


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="workers.mode"):
        WorkersSettings(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers.max_staleness: -1"):
        WorkersSettings(mode="async", max_staleness=-1)


def _pids_of_children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_of_the_trainer_leaves_no_process_and_no_shared_memory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "secondorder.train",
        "optimizer=kfac",
        "workers=async",
        "workers.stats.num_processes=1",
        "workers.stats.batch_size=32",
        "optimizer.inverse_update_every=2",
        "optimizer.factor_update_every=1",
        "logger=none",
        "trainer.max_steps=100000",
        "trainer.log_every=1",
        "trainer.progress=false",
        "trainer.eval_every=0",
        "trainer.checkpoint_every=0",
        f"trainer.run_dir={run_dir}",
        "data.num_samples=1000",
        f"data.root={tmp_path / 'data'}",
        "data.batch_size=64",
    ]
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    workers: set[int] = set()
    deadline = time.time() + 240
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:  # running, with its worker spawned and some steps done
        workers |= _pids_of_children(proc.pid)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5 and workers:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.2)
    assert len(_worker_children(proc.pid)) == 2, "an inversion and a statistics worker"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert "stopped by signal" in out
    deadline = time.time() + 10  # the resource tracker exits once the trainer's pipe closes
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    for pid in workers:
        if os.path.exists(f"/proc/{pid}"):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            raise AssertionError(f"child {pid} outlived the trainer: {cmdline}")
    leaked = [name for name in set(os.listdir("/dev/shm")) - shm_before if str(proc.pid) in name]
    assert not leaked
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert "worker_utilisation" in last


def _worker_children(pid: int) -> set[int]:
    """The trainer's spawned workers (not multiprocessing's resource tracker)."""
    found = set()
    for child in _pids_of_children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.add(child)
    return found


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_run_through_the_trainer(tmp_path: Path, data_root: Path) -> None:
    """The run finishes, the restart is logged, and the final accuracy is within 1 point of an
    undisturbed run (inverses never stale here, so the restarted worker recomputes the same
    decomposition and the two runs agree)."""
    common = [
        "optimizer=kfac",
        "workers=async",
        "workers.max_staleness=0",
        "optimizer.factor_update_every=1",
        "optimizer.inverse_update_every=2",
        "logger=none",
        "trainer.max_steps=100",
        "trainer.log_every=1",
        "trainer.progress=false",
        "trainer.eval_every=0",
        "trainer.threads=1",
        f"data.root={data_root}",
        "data.num_samples=1200",
        "data.progress=false",
        "data.batch_size=64",
    ]

    def launch(run_dir: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "secondorder.train", *common, f"trainer.run_dir={run_dir}"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    quiet = launch(tmp_path / "quiet")
    out_quiet = quiet.communicate(timeout=240)[0].decode()
    assert quiet.returncode == 0, out_quiet[-3000:]

    proc = launch(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    killed = None
    while killed is None and time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        workers = _worker_children(proc.pid)
        if len(lines) >= 20 and workers:
            killed = min(workers)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    out = proc.communicate(timeout=240)[0].decode()
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, out[-3000:]
    assert "restart 1 of 3" in out
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["step"] == 100
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r.get("worker_restarts", 0) for r in records) == 1
    summaries = [
        json.loads((tmp_path / name / "summary.json").read_text()) for name in ("quiet", "killed")
    ]
    accuracies = [s["final_eval_accuracy"] for s in summaries]
    assert accuracies[0] > 0.5, accuracies  # it learned something worth comparing
    assert abs(accuracies[0] - accuracies[1]) <= 0.01, accuracies
