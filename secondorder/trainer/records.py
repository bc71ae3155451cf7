"""What a run leaves behind: ``metrics.jsonl``, ``summary.json``, the closing table, wandb.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step (``step``,
``epoch``, ``samples``, ``train_loss``, ``lr``, ``elapsed_s``, the input pipeline's
``data_wait_s``, ``images_per_s`` and ``rank_images_per_s`` (see :class:`Throughput`) and the
optimizer's diagnostics) and one per evaluation (``eval_loss``, ``eval_accuracy`` where the
task has classes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secondorder.trainer.checkpoint import disk_full, write_atomic

SUMMARY_KEYS = (
    "optimizer",
    "model",
    "data",
    "global_batch_size",
    "world_size",
    "steps",
    "samples_seen",
    "wall_s",
    "final_train_loss",
    "final_eval_loss",
    "final_eval_accuracy",
    "target",
    "steps_to_target",
    "wall_to_target_s",
    "status",
)
STATUSES = ("completed", "target_reached", "diverged", "failed")


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsFile:
    """Appends records to ``metrics.jsonl``; a resumed run drops records past its step.

    A kill or a full disk can leave a torn last line; a resume drops unreadable lines with a
    warning instead of refusing a run whose checkpoint is intact.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self._readable_lines() if line[1] <= resume_step]
            write_atomic(
                self.path,
                lambda f: f.write("".join(text + "\n" for text, _ in kept).encode()),
                size_hint=sum(len(text) + 1 for text, _ in kept),
            )
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def _readable_lines(self) -> list[tuple[str, int]]:
        """``(line, step)`` of each record that parses; the others are reported and dropped."""
        readable, torn = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                readable.append((line, int(record.get("step", 0))))
            except (ValueError, TypeError, AttributeError):
                torn.append(number)
        if torn:
            warnings.warn(
                f"{self.path}: dropped unreadable line(s) {torn} (a write cut short by a kill "
                "or a full disk)",
                stacklevel=3,
            )
        return readable

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(_clean(record)) + "\n"
        self._guarded(lambda: self._file.write(text), len(text))

    def close(self) -> None:
        self._guarded(self._file.close, 0)

    def _guarded(self, action: Callable[[], object], size: int) -> None:
        """``action()``, a full disk reported as :class:`DiskFullError`."""
        try:
            action()
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(self.path, size, err) from err
            raise


class Throughput:
    """How long training steps took and how much of it they waited for their batches.

    :meth:`record` gives, over the steps since the previous record, ``data_wait_s`` (seconds a
    step waited for its batches, per step), ``rank_images_per_s`` (this rank's samples per
    second of step time) and ``images_per_s`` (the global batch's: every rank runs the same
    steps in lockstep); :attr:`mean_data_wait_fraction` is total wait over total step time.
    Step time runs from asking for the batches to the step's loss on the host, so evaluations
    and checkpoints are not counted.
    """

    def __init__(self, *, rank_batch: int, global_batch: int):
        self.rank_batch, self.global_batch = rank_batch, global_batch
        self.steps, self.wait_s, self.step_s = 0, 0.0, 0.0  # since the last record
        self.total_wait_s, self.total_step_s = 0.0, 0.0

    def add(self, *, wait_s: float, step_s: float) -> None:
        self.steps += 1
        self.wait_s += wait_s
        self.step_s += step_s
        self.total_wait_s += wait_s
        self.total_step_s += step_s

    def record(self) -> dict[str, float]:
        """The interval's values (empty without steps); starts the next interval."""
        if self.steps == 0:
            return {}
        per_s = self.steps / max(self.step_s, 1e-12)
        values = {
            "data_wait_s": self.wait_s / self.steps,
            "images_per_s": per_s * self.global_batch,
            "rank_images_per_s": per_s * self.rank_batch,
        }
        self.steps, self.wait_s, self.step_s = 0, 0.0, 0.0
        return values

    @property
    def mean_data_wait_fraction(self) -> float | None:
        if self.total_step_s <= 0:
            return None
        return self.total_wait_s / self.total_step_s


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a temporary file renamed in place (removed on failure)."""
    text = (json.dumps(_clean(data), indent=2) + "\n").encode()
    write_atomic(path, lambda f: f.write(text), size_hint=len(text))


def format_summary(summary: dict[str, Any]) -> str:
    """The closing table printed at the end of a run."""
    rows = []
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        rows.append((key, "-" if value is None else str(value)))
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [rule, *(f"| {k:<{width}} | {v:<{vwidth}} |" for k, v in rows), rule]
    return "\n".join(lines)


def progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix at a logged step: loss, data wait per step, global img/s."""
    shown = {"loss": ("train_loss", ".4f"), "wait_s": ("data_wait_s", ".3f")}
    shown["img/s"] = ("images_per_s", ".0f")
    return {
        label: format(record[key], spec)
        for label, (key, spec) in shown.items()
        if record.get(key) is not None
    }


def tell(text: str) -> None:
    """Print the closing lines; a reader that went away (the pipe of a benchmark harness that was
    stopped) must not turn a finished or stopped run into a failed one: the summary is on disk."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # keep Python's exit-time flush from complaining
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


WANDB_ID_FILE = "wandb_id.txt"


def wandb_run_id(run_dir: str | os.PathLike, *, resume: bool) -> str:
    """The wandb run id of the run in ``run_dir``, kept in its ``wandb_id.txt``.

    A resumed run (``resume``) continues the wandb run whose id is stored there, so a restart
    or a requeued job is one wandb run, not a new one each time; a fresh run gets a new id: the
    directory's name and a random suffix (a run directory can be reused for a fresh start).
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if resume and path.exists() and path.read_text().strip():
        return path.read_text().strip()
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(run_dir).resolve().name).strip("-")[:48]
    run_id = f"{name or 'run'}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class WandbLogger:
    """wandb, offline unless asked otherwise (``mode`` or the ``WANDB_MODE`` environment).

    ``run_id`` (see :func:`wandb_run_id`) is resumed when wandb already has that run, so a
    resumed training run continues its wandb run; ``group`` gathers runs (a sweep, a study).
    """

    def __init__(
        self,
        *,
        project: str,
        mode: str,
        run_dir: str,
        config: dict[str, Any],
        name: str | None = None,
        tags: list[str] | None = None,
        entity: str | None = None,
        group: str | None = None,
        run_id: str | None = None,
    ):
        import wandb  # deferred: importing wandb costs about a second

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            id=run_id,
            resume="allow" if run_id else None,
            mode=os.environ.get("WANDB_MODE", mode),
            dir=run_dir,
            config=config,
            name=name,
            tags=tags or None,
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any], *, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if summary:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)) or value is None:
                    self.run.summary[key] = value
        self.run.finish()


class NullLogger:
    def log(self, record: dict[str, Any], *, step: int) -> None:
        return None

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        return None
