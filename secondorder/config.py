"""Typed schema and validation of the composed Hydra config.

Fixed-shape groups (``trainer``, ``distributed``, ``logger``) are dataclasses. Pluggable groups
take their schema from code: a model's or data set's keys are the keyword-only, annotated
arguments of its registered factory, an optimizer's those of its class
(:func:`secondorder.optim.hyperparameters`), so the code that uses a hyperparameter and the
schema that admits it are the same thing. :func:`register_optimizer_schemas` hands each
optimizer's keys and defaults to Hydra, so the YAML presets only override them and
``--cfg job`` shows every value. :func:`validate` checks all of it before any work, the
optimizer classes' own range checks included, and raises :class:`ConfigError` with one message
naming the key and the allowed values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from secondorder.config_trainer import check_step_options, trainer_settings
from secondorder.config_values import (
    ConfigError,
    choice,
    coerce,
    config_type,
    dataclass_from,
    factory_kwargs,
    factory_schema,
    unknown_key,
)
from secondorder.data import DATASETS, data_spec
from secondorder.models import MODELS, model_spec
from secondorder.optim import LOSS_KINDS, OPTIMIZERS
from secondorder.optim.kfac.worker_settings import WorkersSettings
from secondorder.optim.library_optimizers import missing_library
from secondorder.optim.probe import HyperparameterError, check_hyperparameters, key_in_message
from secondorder.optim.registry import REQUIRED, hyperparameters
from secondorder.trainer.settings import TrainerSettings


@dataclass
class DistributedSettings:
    """``backend``: ``auto`` (horovod under horovodrun, torch under torchrun, else none),
    ``none``, ``torch``, ``horovod``.

    ``verify_every``: compare a parameter checksum across ranks every this many steps
    (0 = never). ``timeout_s``: collective timeout. ``overlap``: launch the gradient
    all-reduce bucket by bucket during backward (``false``: after it, for comparison).
    """

    backend: Literal["auto", "none", "torch", "horovod"] = "auto"
    timeout_s: float = 600.0
    verify_every: int = 0
    overlap: bool = True


@dataclass
class LoggerSettings:
    """``name``: ``wandb`` or ``none``; ``mode``: ``offline`` unless asked (``WANDB_MODE``);
    ``entity``, ``group`` and ``tags`` are handed to wandb as they are."""

    name: Literal["wandb", "none"] = "wandb"
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "secondorder"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ModelSettings:
    """``weights``: a state_dict file to start from; ``sync_bn``: SyncBatchNorm (torch
    backend, GPUs). Both apply to any model, so they are not factory arguments."""

    name: str
    loss: str
    task: Literal["classification", "reconstruction"]
    kwargs: dict[str, Any]
    weights: str | None = None
    sync_bn: bool = False


@dataclass
class DataSettings:
    name: str
    batch_size: int
    eval_batch_size: int
    num_workers: int | Literal["auto"]
    kwargs: dict[str, Any]
    loader: Literal["workers", "dali"] = "workers"


@dataclass
class OptimizerSettings:
    name: str
    kwargs: dict[str, Any]


@dataclass
class RunConfig:
    """The validated configuration the entry point builds objects from."""

    model: ModelSettings
    data: DataSettings
    optimizer: OptimizerSettings
    trainer: TrainerSettings
    distributed: DistributedSettings
    logger: LoggerSettings
    name: str
    workers: WorkersSettings = field(default_factory=WorkersSettings)


# -- optimizers: the class signature is the schema -------------------------------------------------


def optimizer_schema(name: str) -> dict[str, tuple[Any, Any]]:
    """Config keys of optimizer ``name``: key -> (type a config value must have, default)."""
    return {
        key: (config_type(annotation), default)
        for key, (annotation, default) in hyperparameters(name).items()
    }


def optimizer_defaults(name: str) -> dict[str, Any]:
    """The ``optimizer`` group of ``name`` with every key at its class default (``???``: none)."""
    values: dict[str, Any] = {"name": name}
    for key, (_, default) in optimizer_schema(name).items():
        values[key] = MISSING if default is REQUIRED else default
        if isinstance(default, tuple):
            values[key] = list(default)
    return values


def register_optimizer_schemas() -> None:
    """Store every optimizer's defaults in Hydra's ConfigStore as ``schema/optimizer/<name>``.

    A preset ``configs/optimizer/<preset>.yaml`` starts from one of them
    (``- /schema/optimizer/<name>@_here_`` in its defaults list), so it holds only overrides,
    every key can be overridden without ``+``, and ``--cfg job`` shows the resolved values.
    The nodes are plain dicts: types are checked by :func:`validate`, with its messages.
    """
    store = ConfigStore.instance()
    for name in OPTIMIZERS:
        store.store(group="schema/optimizer", name=name, node=optimizer_defaults(name))


def _optimizer_kwargs(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    schema = optimizer_schema(name)
    for key in data:
        if key not in schema:
            raise unknown_key("optimizer", key, list(schema))
    for key, (_, default) in schema.items():
        if data.get(key, default) in (REQUIRED, MISSING):
            raise ConfigError(f"optimizer.{key}: missing value; set it with optimizer.{key}=...")
    return {k: coerce(v, schema[k][0], f"optimizer.{k}") for k, v in data.items()}


def _probe_optimizer(settings: OptimizerSettings, loss_kind: str, world_size: int) -> None:
    """The class's own range checks, before any data or model is built."""
    try:
        check_hyperparameters(
            settings.name, settings.kwargs, loss_kind=loss_kind, world_size=world_size
        )
    except HyperparameterError as err:
        raise ConfigError(f"optimizer{'.' + err.key if err.key else ''}: {err}") from err


# -- the whole config --------------------------------------------------------------------------


def _raw_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The composed config as plain containers, without Hydra's own node."""
    if isinstance(cfg, DictConfig):
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # noqa: BLE001 - interpolation errors are the user's config
            raise ConfigError(f"cannot resolve the config: {err}") from err
    else:
        raw = dict(cfg)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    for group in ("model", "data", "optimizer", "trainer", "distributed", "logger"):
        if not isinstance(raw.get(group), Mapping):
            raise ConfigError(f"{group}: missing config group (is configs/train.yaml intact?)")
    known = {"model", "data", "optimizer", "trainer", "distributed", "logger", "name", "workers"}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{key}: unknown top-level key; allowed keys: {', '.join(sorted(known))}"
            )
    return raw


def _model_settings(data: Mapping[str, Any]) -> ModelSettings:
    model_raw = dict(data)
    model_name = choice("model", model_raw.pop("name", None), MODELS)
    loss = model_raw.pop("loss", None)
    if loss not in LOSS_KINDS:
        raise ConfigError(f"model.loss: expected one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    task = coerce(
        model_raw.pop("task", "classification"),
        Literal["classification", "reconstruction"],
        "model.task",
    )
    weights = coerce(model_raw.pop("weights", None), str | None, "model.weights")
    sync_bn = coerce(model_raw.pop("sync_bn", False), bool, "model.sync_bn")
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.weights: no such file: {weights!r}")
    kwargs = factory_kwargs(MODELS[model_name], model_raw, "model")
    return ModelSettings(model_name, loss, task, kwargs, weights, sync_bn)


def _data_settings(data: Mapping[str, Any]) -> DataSettings:
    data_raw = dict(data)
    data_name = choice("data", data_raw.pop("name", None), DATASETS)
    batch_size = coerce(data_raw.pop("batch_size", None), int, "data.batch_size")
    eval_batch = coerce(data_raw.pop("eval_batch_size", 1024), int, "data.eval_batch_size")
    workers = coerce(data_raw.pop("num_workers", 0), int | Literal["auto"], "data.num_workers")
    loader = coerce(data_raw.pop("loader", "workers"), Literal["workers", "dali"], "data.loader")
    for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch)):
        if value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value}")
    if workers != "auto" and workers < 0:
        raise ConfigError(f"data.num_workers: must be 0 or more, or auto, got {workers}")
    if loader == "dali":
        _check_dali(data_name)
    kwargs = factory_kwargs(DATASETS[data_name], data_raw, "data")
    return DataSettings(data_name, batch_size, eval_batch, workers, kwargs, loader)


def _check_dali(data_name: str) -> None:
    """``data.loader=dali`` decodes ImageNet folders on the GPU: it needs DALI and CUDA."""
    if data_name != "imagenet":
        raise ConfigError(
            f"data.loader: dali reads ImageNet folders only; use data.loader=workers for "
            f"data {data_name}"
        )
    try:
        from secondorder.data.dali_loader import dali_unavailable_reason
    except ImportError:
        reason = "the DALI loader is not part of this installation"
    else:
        reason = dali_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"data.loader=dali: {reason}")


def _check_model_fits_data(model: ModelSettings, data: DataSettings) -> None:
    """The model reads what the data gives, predicts all its classes, learns the configured
    task, and the batch fits the training set: from both factories' declarations
    (:func:`~secondorder.data.data_spec`, :func:`~secondorder.models.model_spec`), before
    anything is generated or loaded."""
    try:
        given = data_spec(data.name, **data.kwargs)
    except ValueError as err:
        key = key_in_message(str(err), list(factory_schema(DATASETS[data.name])))
        raise ConfigError(f"data{'.' + key if key else ''}: {err}") from err
    taken = model_spec(model.name, **model.kwargs)
    if taken.task != model.task:
        raise ConfigError(
            f"model.task: {model.name} is a {taken.task} model, got task {model.task!r}; "
            f"set model.task={taken.task} or choose a {model.task} model"
        )
    if not taken.takes(given.input_shape):
        keys = " / ".join(f"model.{key}" for key in taken.input_keys)
        raise ConfigError(
            f"{keys}: {model.name} takes inputs of {taken.describe_input()}, but data "
            f"{data.name} gives samples of shape {given.input_shape}; choose a model for this "
            "data or set its input size"
        )
    if (
        taken.num_classes is not None
        and given.num_classes is not None
        and taken.num_classes < given.num_classes
    ):
        raise ConfigError(
            f"model.num_classes: {model.name} predicts {taken.num_classes} classes, but data "
            f"{data.name} has {given.num_classes}; set model.num_classes={given.num_classes}"
        )
    if given.train_samples is not None and data.batch_size > given.train_samples:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} is larger than the training set of data "
            f"{data.name} ({given.train_samples} samples); lower the batch or use more samples"
        )


def _optimizer_settings(data: Mapping[str, Any], loss_kind: str, world_size: int):
    opt_raw = dict(data)
    name = choice("optimizer", opt_raw.pop("name", None), OPTIMIZERS)
    missing = missing_library(OPTIMIZERS[name].cls)
    if missing is not None:
        raise ConfigError(f"optimizer={name} needs {missing}")
    optimizer = OptimizerSettings(name, _optimizer_kwargs(name, opt_raw))
    for key in ("lr", "damping"):
        value = optimizer.kwargs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"optimizer.{key}: must be positive, got {value}")
    _probe_optimizer(optimizer, loss_kind, world_size)
    return optimizer


def validate(cfg: DictConfig | Mapping[str, Any], *, world_size: int = 1) -> RunConfig:
    """Check a composed config; the first problem found raises :class:`ConfigError`."""
    raw = _raw_config(cfg)
    model = _model_settings(raw["model"])
    data = _data_settings(raw["data"])
    _check_model_fits_data(model, data)
    optimizer = _optimizer_settings(raw["optimizer"], model.loss, world_size)
    trainer = trainer_settings(raw["trainer"], model.task, data.batch_size, world_size)
    distributed = dataclass_from(DistributedSettings, raw["distributed"], "distributed")
    check_step_options(
        trainer,
        model=model.name,
        loss=model.loss,
        sync_bn=model.sync_bn,
        optimizer=optimizer.name,
        backend=distributed.backend,
    )
    return RunConfig(
        model=model,
        data=data,
        optimizer=optimizer,
        trainer=trainer,
        distributed=distributed,
        logger=dataclass_from(LoggerSettings, raw["logger"], "logger"),
        name=str(raw.get("name", "default")),
        workers=_workers(raw.get("workers"), optimizer.name),
    )


def _workers(data: Any, optimizer: str) -> WorkersSettings:
    """The ``workers`` group (absent: ``mode: none``)."""
    try:
        workers = dataclass_from(WorkersSettings, data or {"mode": "none"}, "workers")
    except ConfigError:
        raise
    except ValueError as err:  # WorkersSettings' own checks name the key
        raise ConfigError(str(err).replace("Invalid ", "")) from err
    if workers.mode != "none" and not optimizer.startswith("kfac"):
        raise ConfigError(
            f"workers.mode: {workers.mode!r} needs a K-FAC optimizer (kfac, kfac_eigen, "
            f"kfac_inverse), got optimizer {optimizer!r}; use workers=none"
        )
    return workers
