"""One builder: a validated config to communicator, data, model, optimizer, workers, trainer.

The entry point (:mod:`secondorder.train`), the benchmarks and the scaling tool all build through
these functions, so a run is wired one way. Each function makes one part, so a tool can build
just what it needs, for example data, model and optimizer on a device without a communicator or
a run directory::

    data = build_data(run)
    model = build_model(run, torch.device("cpu"))
    optimizer = build_optimizer(run, model, steps_per_epoch=100)

:func:`build_run` makes everything in the order of a training run. That order is part of the
results: the global RNG is seeded before the data and again before the model, so the initial
weights depend only on ``trainer.seed``; what is built after the model (optimizer, logger,
trainer) sees the RNG state the model left.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from secondorder import data as datasets
from secondorder import models, optim
from secondorder.config import ConfigError, RunConfig, validate
from secondorder.data import DataBundle, Task
from secondorder.data.loader import StepLoader, auto_workers, make_step_loader
from secondorder.data.sampler import GlobalBatchSampler, plan_batches
from secondorder.distributed.comm import Communicator, build_communicator, launcher_env
from secondorder.distributed.parent_watch import watch_parent
from secondorder.models.weights import WeightsError, load_weights
from secondorder.optim.kfac.async_curvature import curvature_workers
from secondorder.trainer import checkpoint as ckpt
from secondorder.trainer.batchnorm import convert_sync_batchnorm
from secondorder.trainer.gpu_step import apply_gpu_step
from secondorder.trainer.parts import DataFeed, RunOutput, RunParts
from secondorder.trainer.records import NullLogger, WandbLogger, wandb_run_id
from secondorder.trainer.rundir import RunDirError, RunDirLock, next_resume_config
from secondorder.trainer.schedules import scaled_lr
from secondorder.trainer.settings import in_steps
from secondorder.trainer.stats_source import StatsSource
from secondorder.trainer.trainer import Trainer

__all__ = [
    "build_comm",
    "build_data",
    "build_loader",
    "build_logger",
    "build_model",
    "build_optimizer",
    "build_run",
    "build_sampler",
    "build_task",
    "build_trainer",
    "loader_workers",
    "own_run_dir",
    "pick_device",
    "record_config",
    "setup_device",
    "start_workers",
    "stats_source",
]


# -- the process ---------------------------------------------------------------------------------


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``trainer.device``: CUDA (one GPU per local rank) when asked or available, else CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device: 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_device(run: RunConfig, local_rank: int = 0) -> torch.device:
    """Set this process's torch threads (``trainer.threads``) and pick its device."""
    if run.trainer.threads is not None:
        torch.set_num_threads(run.trainer.threads)
    return pick_device(run.trainer.device, local_rank)


def build_comm(run: RunConfig, device: torch.device) -> Communicator:
    """The communicator of ``distributed.backend`` (world size 1 without a launcher)."""
    return build_communicator(
        run.distributed.backend, device=device, timeout_s=run.distributed.timeout_s
    )


@contextlib.contextmanager
def own_run_dir(run: RunConfig, comm: Communicator) -> Iterator[Path]:
    """``trainer.run_dir`` (or a fresh ``runs/<time>-<model>-<optimizer>``), created and owned
    by this run for the body: rank 0 takes its lock and tells every rank the outcome, so a run
    dir that is busy or cannot be written stops all ranks with the same error, none left waiting.

    Raises:
        ConfigError: the directory is held by another live run or cannot be created or written.
    """
    chosen, lock, error = run.trainer.run_dir, None, None
    if comm.is_main:
        try:
            chosen = chosen if chosen is not None else str(_fresh_run_dir(run))
            lock = RunDirLock(chosen, notify=lambda line: print(line, file=sys.stderr, flush=True))
        except RunDirError as err:
            error = str(err)
    chosen, error = comm.broadcast_object((chosen, error))
    if error is not None:
        raise ConfigError(error)
    try:
        yield Path(chosen)
    finally:
        if lock is not None:
            lock.release()


def _fresh_run_dir(run: RunConfig) -> Path:
    """A new ``runs/<time>-<model>-<optimizer>[-n]``; ``mkdir`` without ``exist_ok`` claims the
    name, so two runs started in the same second get two folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{run.model.name}-{run.optimizer.name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        except OSError as err:
            raise RunDirError(
                f"trainer.run_dir is not set and {str(path)!r} cannot be created: "
                f"{err.strerror or err}; set trainer.run_dir to a writable folder"
            ) from err


@contextlib.contextmanager
def record_config(
    run: RunConfig, cfg: DictConfig, run_dir: Path, comm: Communicator, trainer: Trainer
) -> Iterator[None]:
    """Write the run's resolved config for the body (rank 0): ``config.yaml`` for a run from
    step 0, ``config.resume-<n>.yaml`` beside it for a resume. A resume that is refused (the
    body fails before the trainer took the checkpoint's step) removes its file again, so the
    record only holds configs of runs that happened."""
    if not comm.is_main:
        yield
        return
    resume = run.trainer.resume
    # An explicit path counts as a resume even when missing: the trainer refuses it then.
    resuming = resume is not None and (resume != "auto" or bool(ckpt.list_checkpoints(run_dir)))
    path = next_resume_config(run_dir) if resuming else run_dir / "config.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    try:
        yield
    except BaseException:
        if resuming and trainer.step == 0:
            path.unlink(missing_ok=True)
        raise


# -- the parts -----------------------------------------------------------------------------------


def build_task(run: RunConfig) -> Task:
    """What the targets are (``model.task``) and the loss (``model.loss``)."""
    return Task(kind=run.model.task, loss=run.model.loss)


def build_data(run: RunConfig) -> DataBundle:
    """The data set of ``data.name``; the global RNG is seeded first, so a factory that draws
    from it makes the same data on every rank and in every run."""
    torch.manual_seed(run.trainer.seed)
    return datasets.build_data(run.data.name, **run.data.kwargs)


def build_sampler(
    run: RunConfig, num_samples: int, *, world_size: int = 1, rank: int = 0
) -> GlobalBatchSampler:
    """This rank's share of every global batch: the one place that splits ``data.batch_size``
    into ranks and micro-batches and counts the steps per epoch."""
    plan = plan_batches(
        global_batch=run.data.batch_size,
        world_size=world_size,
        max_micro_batch=run.trainer.max_micro_batch,
    )
    return GlobalBatchSampler(num_samples=num_samples, plan=plan, rank=rank, seed=run.trainer.seed)


def loader_workers(run: RunConfig, environ: Any = None) -> int:
    """``data.num_workers``, with ``auto`` resolved by :func:`auto_workers`."""
    if run.data.num_workers != "auto":
        return int(run.data.num_workers)
    return auto_workers(os.environ if environ is None else environ)


def build_loader(
    run: RunConfig, train: Any, sampler: GlobalBatchSampler, device: torch.device
) -> StepLoader:
    """The training loader of ``data.loader``: persistent CPU workers (``workers``) or NVIDIA
    DALI's GPU decode (``dali``); built once, its processes start at the first batch."""
    workers = loader_workers(run)
    if run.data.loader == "dali":
        from secondorder.data.dali_loader import DaliStepLoader

        return DaliStepLoader(
            dataset=train,
            sampler=sampler,
            device=device,
            seed=run.trainer.seed,
            num_threads=workers,
        )
    return make_step_loader(
        train, sampler, num_workers=workers, device=device, total_steps=run.trainer.max_steps
    )


def build_model(
    run: RunConfig, device: torch.device, comm: Communicator | None = None
) -> nn.Module:
    """The model of ``model.name`` on ``device``, initialised from ``trainer.seed`` or loaded
    from ``model.weights``; with a communicator, rank 0's parameters and buffers are broadcast so
    every rank starts equal. Then the GPU step settings (:mod:`secondorder.trainer.gpu_step`).

    Raises:
        ConfigError: a weights file that does not fit, or ``model.sync_bn`` where it cannot run.
    """
    torch.manual_seed(run.trainer.seed)
    model = models.build_model(run.model.name, **run.model.kwargs)
    if run.model.weights is not None:
        try:
            load_weights(model, run.model.weights)
        except WeightsError as err:
            raise ConfigError(f"model.weights: {err}") from err
    if run.model.sync_bn:
        model = _sync_batchnorm(model, device, comm)
    model = model.to(device)
    if comm is not None:
        comm.broadcast_parameters([*model.parameters(), *model.buffers()])
    apply_gpu_step(
        model, device, cudnn_benchmark=run.trainer.cudnn_benchmark, compile=run.trainer.compile
    )
    return model


def _sync_batchnorm(model: nn.Module, device: torch.device, comm: Communicator | None):
    """``model.sync_bn``: SyncBatchNorm under torch.distributed on GPUs; one rank: no-op."""
    if comm is None or comm.world_size == 1:
        if comm is None or comm.is_main:
            print("note: model.sync_bn has nothing to synchronise with one rank", file=sys.stderr)
        return model
    if getattr(comm, "backend", None) != "torch":
        raise ConfigError(
            "model.sync_bn: SyncBatchNorm needs the torch.distributed backend "
            f"(distributed=torch under torchrun), got {getattr(comm, 'backend', 'none')!r}"
        )
    if device.type != "cuda":
        raise ConfigError(
            "model.sync_bn: torch runs SyncBatchNorm on GPUs only; use trainer.device=cuda or "
            "model.sync_bn=false (running statistics are averaged over ranks anyway)"
        )
    return convert_sync_batchnorm(model)


def build_optimizer(
    run: RunConfig,
    model: nn.Module,
    *,
    comm: Communicator | None = None,
    steps_per_epoch: int = 1,
) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer.name`` over ``model``'s parameters, with ``optimizer.lr``
    scaled by the linear rule when ``trainer.scale_lr`` is set."""
    hyper = dict(run.optimizer.kwargs)
    if run.trainer.scale_lr and "lr" in hyper:
        hyper["lr"] = scaled_lr(
            hyper["lr"],
            batch_size=run.data.batch_size,
            base_batch_size=run.trainer.base_batch_size,
        )
    context = optim.OptimContext(
        model=model, loss_kind=run.model.loss, comm=comm, steps_per_epoch=steps_per_epoch
    )
    return optim.build_optimizer(run.optimizer.name, model.parameters(), context, **hyper)


def build_logger(run: RunConfig, cfg: DictConfig, run_dir: Path, comm: Communicator) -> Any:
    """wandb on rank 0 when ``logger.name`` is ``wandb``, otherwise a logger that drops all."""
    if not (comm.is_main and run.logger.name == "wandb"):
        return NullLogger()
    return WandbLogger(
        project=run.logger.project,
        mode=run.logger.mode,
        run_dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        name=run_dir.name,
        tags=run.logger.tags,
        entity=run.logger.entity,
        group=run.logger.group,
        run_id=wandb_run_id(run_dir, resume=run.trainer.resume is not None),
    )


def stats_source(run: RunConfig) -> StatsSource:
    """The recipe from which statistics workers rebuild this run's model and data."""
    return StatsSource(
        model=run.model.name,
        data=run.data.name,
        model_kwargs=dict(run.model.kwargs),
        data_kwargs=dict(run.data.kwargs),
        task=build_task(run),
    )


def start_workers(run: RunConfig, optimizer: torch.optim.Optimizer) -> Any:
    """A context manager running the optimizer's curvature workers (``workers`` group; nothing
    for ``workers.mode: none``) for its body and stopping them on any exit; it yields their
    handle, or ``None``."""
    return curvature_workers(optimizer, run.workers, stats_source(run))


# -- a whole run ---------------------------------------------------------------------------------


def build_trainer(
    run: RunConfig, cfg: DictConfig, run_dir: Path, comm: Communicator, device: torch.device
) -> Trainer:
    """Data, sampler, model, optimizer, logger and the trainer over them, in the order that
    fixes the RNG (see the module docstring)."""
    data = build_data(run)
    sampler = build_sampler(run, len(data.train), world_size=comm.world_size, rank=comm.rank)
    model = build_model(run, device, comm)
    optimizer = build_optimizer(run, model, comm=comm, steps_per_epoch=sampler.steps_per_epoch)
    output = RunOutput(
        run_dir=run_dir,
        names={"model": run.model.name, "optimizer": run.optimizer.name, "data": run.data.name},
        logger=build_logger(run, cfg, run_dir, comm),
        options={"model": dict(run.model.kwargs), "data": dict(run.data.kwargs)},
    )
    feed = DataFeed(
        train=data.train,
        eval=data.eval,
        task=build_task(run),
        sampler=sampler,
        eval_batch_size=run.data.eval_batch_size,
        num_workers=loader_workers(run),  # evaluation: CPU workers with every data.loader
        loader=build_loader(run, data.train, sampler, device),
    )
    parts = RunParts(
        model,
        optimizer,
        comm,
        device,
        verify_every=run.distributed.verify_every,
        overlap=run.distributed.overlap,
    )
    settings = in_steps(run.trainer, steps_per_epoch=sampler.steps_per_epoch)
    return Trainer(settings, parts, feed, output)


@contextlib.contextmanager
def build_run(cfg: DictConfig) -> Iterator[Trainer]:
    """Everything ``python -m secondorder.train`` runs, for the ``with`` body: the trainer, with
    the curvature workers started, in a run directory this run owns. Workers, the directory's
    lock and the communicator are released on any exit. The config is written once everything
    is built, so a run that fails in setup leaves no config behind."""
    layout = launcher_env()  # torchrun's or horovodrun's variables
    if layout["launcher"] != "none":  # a rank stops when its launcher is killed (an OOM kill)
        watch_parent()
    run = validate(cfg, world_size=layout["world_size"])
    device = setup_device(run, layout["local_rank"])
    comm = build_comm(run, device)
    try:
        with own_run_dir(run, comm) as run_dir:
            trainer = build_trainer(run, cfg, run_dir, comm, device)
            try:
                with (
                    record_config(run, cfg, run_dir, comm, trainer),
                    start_workers(run, trainer.optimizer),
                ):
                    yield trainer
            finally:  # fit closes them too; a run that fails before fit must as well
                trainer.close_loaders()
    finally:
        comm.shutdown()
