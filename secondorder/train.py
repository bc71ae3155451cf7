"""Training entry point: compose the config, build the objects, ``Trainer.fit``. No logic.

One process::

    python -m secondorder.train model=cnn1d data=mnist1d optimizer=sgd trainer.max_steps=500

Two data-parallel ranks on one machine (gloo on CPU, NCCL on GPUs)::

    torchrun --standalone --nproc_per_node=2 -m secondorder.train experiment=demo

The console script ``secondorder-train`` is the same program.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from secondorder.config import ConfigError, RunConfig, validate
from secondorder.data import DataError, build_data
from secondorder.distributed.comm import Communicator, build_communicator, launcher_env
from secondorder.distributed.workers import curvature_workers
from secondorder.models import build_model
from secondorder.optim import OptimContext, build_optimizer
from secondorder.trainer.checkpoint import CheckpointError
from secondorder.trainer.records import NullLogger, WandbLogger
from secondorder.trainer.schedules import scaled_lr
from secondorder.trainer.stats_source import StatsSource
from secondorder.trainer.trainer import Trainer

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device: 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_run_dir(run: RunConfig, comm: Communicator) -> Path:
    """``trainer.run_dir`` or a fresh ``runs/<time>-<model>-<optimizer>``, same on every rank."""
    chosen = run.trainer.run_dir
    if chosen is None and comm.is_main:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{stamp}-{run.model.name}-{run.optimizer.name}"
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        chosen = str(path)
    chosen = comm.broadcast_object(chosen)
    if comm.is_main:
        Path(chosen).mkdir(parents=True, exist_ok=True)
    comm.barrier()
    return Path(chosen)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, build everything and train; returns the run summary."""
    layout = launcher_env()  # torchrun's or horovodrun's variables
    run_cfg = validate(cfg, world_size=layout["world_size"])
    settings = run_cfg.trainer
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device, layout["local_rank"])
    comm = build_communicator(
        run_cfg.distributed.backend, device=device, timeout_s=run_cfg.distributed.timeout_s
    )
    try:
        torch.manual_seed(settings.seed)
        run_dir = make_run_dir(run_cfg, comm)
        if comm.is_main:
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        data = build_data(run_cfg.data.name, **run_cfg.data.kwargs)
        torch.manual_seed(settings.seed)
        model = build_model(run_cfg.model.name, **run_cfg.model.kwargs).to(device)
        comm.broadcast_parameters([*model.parameters(), *model.buffers()])
        hyper = dict(run_cfg.optimizer.kwargs)
        if settings.scale_lr and "lr" in hyper:
            hyper["lr"] = scaled_lr(
                hyper["lr"],
                batch_size=run_cfg.data.batch_size,
                base_batch_size=settings.base_batch_size,
            )
        context = OptimContext(
            model=model,
            loss_kind=run_cfg.model.loss,
            comm=comm,
            steps_per_epoch=max(1, len(data.train) // run_cfg.data.batch_size),
        )
        optimizer = build_optimizer(run_cfg.optimizer.name, model.parameters(), context, **hyper)
        logger = NullLogger()
        if comm.is_main and run_cfg.logger.name == "wandb":
            logger = WandbLogger(
                project=run_cfg.logger.project,
                mode=run_cfg.logger.mode,
                run_dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                name=run_dir.name,
                tags=run_cfg.logger.tags,
            )
        trainer = Trainer(
            settings=settings,
            model=model,
            optimizer=optimizer,
            train_set=data.train,
            eval_set=data.eval,
            global_batch=run_cfg.data.batch_size,
            loss_kind=run_cfg.model.loss,
            reconstruction=run_cfg.model.task == "reconstruction",
            comm=comm,
            device=device,
            run_dir=run_dir,
            names={
                "model": run_cfg.model.name,
                "optimizer": run_cfg.optimizer.name,
                "data": run_cfg.data.name,
            },
            logger=logger,
            eval_batch_size=run_cfg.data.eval_batch_size,
            num_workers=run_cfg.data.num_workers,
            verify_every=run_cfg.distributed.verify_every,
        )
        source = StatsSource(
            model=run_cfg.model.name,
            data=run_cfg.data.name,
            model_kwargs=dict(run_cfg.model.kwargs),
            data_kwargs=dict(run_cfg.data.kwargs),
            reconstruction=run_cfg.model.task == "reconstruction",
        )
        with curvature_workers(optimizer, run_cfg.workers, source):  # stopped on any exit
            return trainer.fit()
    finally:
        comm.shutdown()


@hydra.main(version_base="1.3", config_path="pkg://secondorder.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    # A run stopped by SIGTERM/SIGINT (checkpointed, resumable) exits with 128 + the signal's
    # number, in a multirun too: the stop is meant for the whole sweep, not for one trial.
    if summary.get("stop_signal") is not None:
        sys.exit(128 + int(summary["stop_signal"]))
    # A single run that diverged or failed exits with 1. In a multirun (a benchmark grid) the
    # status stays in that trial's summary.json and the sweep goes on: Hydra runs the trials in
    # this process, and exiting would silently drop every trial after this one.
    if summary["status"] in ("diverged", "failed") and not _in_multirun():
        sys.exit(1)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
