"""The end of a run: the summary every rank returns and rank 0's closing writes.

A mixin of :class:`~secondorder.trainer.trainer.Trainer` (it reads the trainer's state), kept
apart so the loop reads on its own.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from secondorder.trainer import checkpoint as ckpt
from secondorder.trainer.records import MetricsFile, format_summary, tell, write_json_atomic

Status = Literal["completed", "target_reached", "diverged", "failed"]


class Closing:
    """Summary and closing records of a trainer."""

    def _close_records(
        self,
        metrics: MetricsFile,
        status: Status,
        error: str | None,
        failure: BaseException | None,
    ) -> dict[str, Any]:
        """Rank 0's closing writes. One that fails (a full disk) never hides an error under way,
        and the small ``summary.json`` is still written, as failed writes remove their temporary
        files; after a full disk the final weights are left to the newest checkpoint."""
        late: Exception | None = None
        try:
            metrics.close()
        except (OSError, ckpt.CheckpointError) as err:
            late = err
        if status != "diverged" and not isinstance(failure, ckpt.DiskFullError) and not late:
            try:
                # final_model.pt: the evaluation weights as a plain state_dict
                ckpt.save_torch_atomic(self.run_dir / "final_model.pt", self._evaluation_state())
            except (OSError, ckpt.CheckpointError) as err:
                late = err
        if late is not None and failure is None:
            status, error = "failed", f"{type(late).__name__}: {late}"
        summary = self._summary(status, error)
        try:
            write_json_atomic(self.run_dir / "summary.json", summary)
        except (OSError, ckpt.CheckpointError) as err:
            print(f"summary.json not written: {err}", file=sys.stderr, flush=True)
        self.logger.finish(summary)
        tell(format_summary(summary))
        if error:
            tell(f"run {status}: {error}")
        if late is not None and failure is None:
            raise late
        return summary

    def _summary(self, status: Status, error: str | None) -> dict[str, Any]:
        target = self.s.target
        summary = {
            "optimizer": self.names["optimizer"],
            "model": self.names["model"],
            "data": self.names["data"],
            "global_batch_size": self.plan.global_batch,
            "precision": self.precision,
            "world_size": self.comm.world_size,
            "micro_batch_size": self.plan.micro_batch,
            "accumulation_steps": self.plan.accumulation_steps,
            "steps": self.step,
            "samples_seen": self.step * self.plan.global_batch,
            "wall_s": self._elapsed() if hasattr(self, "start_time") else 0.0,
            "final_train_loss": self.last_train_loss,
            "final_eval_loss": self.last_eval.get("eval_loss"),
            "final_eval_accuracy": self.last_eval.get("eval_accuracy"),
            "target": {"metric": target.metric, "value": target.value}
            if target.metric is not None
            else None,
            "steps_to_target": self.reached["steps"] if self.reached else None,
            "wall_to_target_s": self.reached["wall_s"] if self.reached else None,
            "status": status,
            "run_dir": str(self.run_dir),
        }
        summary.update(self._step_counts())
        summary["mean_data_wait_fraction"] = self.throughput.mean_data_wait_fraction
        if self.skipped_images is not None:
            summary["skipped_images"] = self.skipped_images
        if error:
            summary["error"] = error
        if self.signals.received is not None and status == "failed":
            summary["stop_signal"] = self.signals.received  # a request to stop, not a failed trial
        return summary
