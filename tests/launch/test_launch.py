"""The launch scripts: dry-run commands per node, argument errors, the SLURM templates under a
fake srun, and an elastic torchrun restart that resumes from the checkpoint after a rank is
killed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NODE_RANK"))}
    for key in ("NPROC", "NNODES", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "MAX_RESTARTS"):
        env.pop(key, None)
    for key in ("NP", "HOSTS", "HOSTFILE", "DRY_RUN", "TORCHRUN", "HOROVODRUN", "PYTHON"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_torchrun_single_node_dry_run() -> None:
    out = _lines(_run("torchrun.sh", "--dry-run", "experiment=demo", "optimizer.lr=0.2", NPROC="2"))
    assert out == [
        "torchrun --nproc-per-node=2 --standalone --nnodes=1 --max-restarts=0 "
        "-m secondorder.train distributed=torch experiment=demo optimizer.lr=0.2"
    ]


def test_torchrun_overrides_are_quoted_and_kept_verbatim() -> None:
    out = _lines(_run("torchrun.sh", "--dry-run", "--", "name=a b", "distributed=none", NPROC="1"))
    argv = shlex.split(out[0])
    # The user's distributed choice wins; the space survives shell quoting.
    assert argv[-2:] == ["name=a b", "distributed=none"]
    assert "distributed=torch" not in argv


def test_torchrun_multi_node_prints_one_command_per_node() -> None:
    out = _lines(
        _run(
            "torchrun.sh",
            "--dry-run",
            "model=resnet50",
            NPROC="8",
            NNODES="3",
            MASTER_ADDR="node0",
            MASTER_PORT="29400",
            RDZV_ID="job7",
        )
    )
    assert len(out) == 3
    for node, line in enumerate(out):
        argv = shlex.split(line)
        assert argv[0] == f"NODE_RANK={node}"
        assert argv[1:9] == [
            "torchrun",
            "--nproc-per-node=8",
            "--nnodes=3",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=node0:29400",
            "--rdzv-id=job7",
            "--max-restarts=0",
        ]
        assert argv[-3:] == ["secondorder.train", "distributed=torch", "model=resnet50"]


def test_torchrun_elastic_adds_resume_and_a_fixed_run_dir() -> None:
    out = _lines(_run("torchrun.sh", "--dry-run", "--max-restarts", "2", NPROC="2", RDZV_ID="j9"))
    argv = shlex.split(out[0])
    assert "--max-restarts=2" in argv
    assert argv[-2:] == ["trainer.run_dir=runs/j9", "trainer.resume=auto"]
    # A run dir the user chose is kept.
    out = _lines(_run("torchrun.sh", "--dry-run", "--max-restarts", "1", "trainer.run_dir=/x"))
    argv = shlex.split(out[0])
    assert "trainer.run_dir=/x" in argv and not any(
        a.startswith("trainer.run_dir=runs/") for a in argv
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dry-run"], {"NNODES": "2"}, "needs MASTER_ADDR"),
        (["--dry-run"], {"NNODES": "2", "MASTER_ADDR": "n0"}, "needs RDZV_ID"),
        (["--dry-run", "--nproc", "0"], {}, "NPROC must be a positive integer"),
        (
            ["--dry-run"],
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a", "RDZV_ID": "b"},
            "below",
        ),
        (["--bogus"], {}, "unknown option --bogus"),
    ],
)
def test_torchrun_rejects_bad_arguments(args: list[str], env: dict, message: str) -> None:
    result = _run("torchrun.sh", *args, **env)
    assert result.returncode == 2 and message in result.stderr


def test_horovodrun_dry_run_single_and_multi_node(tmp_path: Path) -> None:
    out = _lines(_run("horovodrun.sh", "--dry-run", "-np", "2", "experiment=demo"))
    assert out[0].startswith("# node 0 (localhost, ranks 0-1)")
    assert shlex.split(out[1]) == [
        "horovodrun",
        "--gloo",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "python",
        "-m",
        "secondorder.train",
        "distributed=horovod",
        "experiment=demo",
    ]
    out = _lines(_run("horovodrun.sh", "--dry-run", "--hosts", "a:4,b:4", "x=1", PYTHON="py"))
    assert shlex.split(out[1])[:6] == ["horovodrun", "--gloo", "-np", "8", "-H", "a:4,b:4"]
    assert out[2].startswith("# node 1 (b, ranks 4-7): started over ssh by horovodrun on a")
    assert out[2].endswith("py -m secondorder.train distributed=horovod x=1")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# cluster\nn0 slots=2\nn1 slots=2\n")
    out = _lines(_run("horovodrun.sh", "--dry-run", "--hostfile", str(hosts), "-np", "3"))
    assert shlex.split(out[1])[:6] == ["horovodrun", "--gloo", "-np", "3", "--hostfile", str(hosts)]
    assert out[2].startswith("# node 1 (n1, ranks 2-2)")
    result = _run("horovodrun.sh", "--dry-run", "-np", "5", "--hosts", "a:4")
    assert result.returncode == 2 and "more than the 4 slots" in result.stderr


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """``scontrol`` and ``srun`` stand-ins: srun runs its command once per node, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = requeue ]; then echo "$@" >> "$SCONTROL_LOG"; exit 0; fi\n'
        "printf 'gpu-a\\ngpu-b\\n'\n"
    )
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        'echo "srun $*" >> "$SCONTROL_LOG"\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{_fake_slurm_bin(tmp_path)}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "16",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        **extra,
    }


def test_slurm_templates_dry_run_per_node(tmp_path: Path) -> None:
    """Each node's command; the rendezvous port and the run dir come from the job id (a requeued
    job keeps it, so it resumes there), and srun passes the CPUs per task on."""
    slurm = _slurm_env(tmp_path, DRY_RUN="1")
    out = _lines(_run("slurm/torchrun.sbatch", "model=resnet50", **slurm))
    assert len(out) == 2
    for node, line in enumerate(out):
        argv = shlex.split(line)
        assert argv[0] == f"NODE_RANK={node}"
        assert "--nnodes=2" in argv and f"--node-rank={node}" in argv
        assert "--rdzv-endpoint=gpu-a:24242" in argv and "--rdzv-id=4242" in argv
        assert "--nproc-per-node=4" in argv
        assert argv[-3:] == ["model=resnet50", "trainer.run_dir=runs/4242", "trainer.resume=auto"]
    assert "--cpus-per-task=16" in (tmp_path / "scontrol.log").read_text().split()
    out = _lines(_run("slurm/horovodrun.sbatch", "model=resnet50", **slurm))
    assert shlex.split(out[1])[:6] == ["horovodrun", "--gloo", "-np", "8", "-H", "gpu-a:4,gpu-b:4"]
    assert out[2].startswith("# node 1 (gpu-b, ranks 4-7)")
    assert out[1].endswith("model=resnet50 trainer.run_dir=runs/4242 trainer.resume=auto")
    # A run dir or resume the user gave is kept.
    given = ("trainer.run_dir=/x", "trainer.resume=null")
    out = _lines(_run("slurm/torchrun.sbatch", *given, **slurm))
    assert shlex.split(out[0])[-2:] == list(given)


@pytest.mark.parametrize("template", ["torchrun.sbatch", "horovodrun.sbatch"])
def test_slurm_templates_ask_for_a_warning_signal_and_requeue(template: str) -> None:
    text = (LAUNCH / "slurm" / template).read_text()
    assert "#SBATCH --signal=B:TERM@" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize(("exit_code", "requeued"), [(143, True), (1, False), (0, False)])
def test_slurm_job_requeues_itself_when_its_run_stopped_on_sigterm(
    tmp_path: Path, exit_code: int, requeued: bool
) -> None:
    """The run exits 143 (SIGTERM, checkpointed): the job requeues itself and exits 143; a crash
    (1) or a finished run (0) is not requeued."""
    fake = tmp_path / "fake_torchrun"
    fake.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    fake.chmod(0o755)
    slurm = _slurm_env(tmp_path, TORCHRUN=str(fake))
    result = _run("slurm/torchrun.sbatch", "model=resnet50", **slurm)
    assert result.returncode == exit_code, result.stderr
    log = (tmp_path / "scontrol.log").read_text()
    assert ("requeue 4242" in log) == requeued, log


# -- elastic restart -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the wrapper runs torchrun as a child, not by exec)."""
    found = _children(pid)
    for child in list(found):
        found += _descendants(child)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_checkpoint(tmp_path: Path, data_root: Path) -> None:
    """Kill rank 1 with SIGKILL after the first checkpoint: torchrun restarts both ranks, they
    resume from that checkpoint and the run completes all its steps."""
    run_dir = tmp_path / "elastic"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen(
        [
            "bash",
            str(LAUNCH / "torchrun.sh"),
            "--max-restarts",
            "1",
            f"trainer.run_dir={run_dir}",
            f"data.root={data_root}",
            "data.num_samples=1200",
            "data.progress=false",
            "data.batch_size=64",
            "trainer.max_steps=400",
            "trainer.checkpoint_every=25",
            "trainer.eval_every=0",
            "trainer.log_every=25",
            "trainer.progress=false",
            "trainer.threads=1",
            "logger=none",
        ],
        env=_env(NPROC="2", TORCHRUN=str(torchrun), OMP_NUM_THREADS="1", RDZV_ID="elastic"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        checkpoints = run_dir / "checkpoints"
        deadline = time.monotonic() + 90
        while not (checkpoints.is_dir() and any(checkpoints.glob("step_*.pt"))):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        victims = [p for p in _descendants(proc.pid) if _rank_of(p) == 1]
        assert victims, "rank 1 not found among torchrun's workers"
        os.kill(victims[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 400
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 400  # no duplicated steps after the resume
