"""Training entry point: compose the config, build the objects, ``Trainer.fit``. No logic.

One process::

    python -m secondorder.train model=cnn1d data=mnist1d optimizer=sgd trainer.max_steps=500

Two data-parallel ranks on one machine (gloo on CPU, NCCL on GPUs)::

    torchrun --standalone --nproc_per_node=2 -m secondorder.train experiment=demo

The console script ``secondorder-train`` is the same program. The wiring is
:mod:`secondorder.build`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig

from secondorder.build import build_run
from secondorder.config import ConfigError, RunConfig, validate
from secondorder.data import DataError
from secondorder.trainer.checkpoint import CheckpointError
from secondorder.trainer.signals import StopForced

USER_ERRORS = (ConfigError, DataError, CheckpointError)
# Set by launch/torchrun.sh and launch/horovodrun.sh: a folder where a rank that stops on a signal
# leaves its exit code. torchrun's agent and horovodrun exit 1 whatever their ranks exited with;
# from this the wrapper exits 128 + the signal too, so Slurm can tell a preemption from a crash.
STOP_DIR_ENV = "SECONDORDER_STOP_DIR"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, build everything and train; returns the run summary."""
    with build_run(cfg) as trainer:
        return trainer.fit()


def compose_run(overrides: Sequence[str], *, world_size: int = 1) -> RunConfig:
    """The validated config ``python -m secondorder.train <overrides>`` would run."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="secondorder.configs", version_base="1.3"):
        return validate(
            compose(config_name="train", overrides=list(overrides)), world_size=world_size
        )


@hydra.main(version_base="1.3", config_path="pkg://secondorder.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except StopForced as err:  # a second signal: the summary is written and says so
        _exit_stopped(err.signum)
    # A run stopped by SIGTERM/SIGINT (checkpointed, resumable) exits with 128 + the signal's
    # number, in a multirun too: the stop is meant for the whole sweep, not for one trial.
    if summary.get("stop_signal") is not None:
        _exit_stopped(int(summary["stop_signal"]))
    # A single run that diverged or failed exits with 1. In a multirun (a benchmark grid) the
    # status stays in that trial's summary.json and the sweep goes on: Hydra runs the trials in
    # this process, and exiting would silently drop every trial after this one.
    if summary["status"] in ("diverged", "failed") and not _in_multirun():
        sys.exit(1)


def _exit_stopped(signum: int) -> NoReturn:
    """Exit with 128 + ``signum``, first leaving that code where a launch wrapper looks."""
    code = 128 + signum
    folder = os.environ.get(STOP_DIR_ENV)
    if folder:
        with contextlib.suppress(OSError):  # a rank on another node: the folder is not there
            (Path(folder) / f"stopped.{os.getpid()}").write_text(f"{code}\n")
    sys.exit(code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
