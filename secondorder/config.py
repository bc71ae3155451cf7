"""Typed schema and validation of the composed Hydra config.

Fixed-shape groups (``trainer``, ``distributed``, ``logger``) are dataclasses. Pluggable groups
(``model``, ``data``, ``optimizer``) take their schema from the registered factory: its
keyword-only, annotated arguments are the allowed keys and their types, so the code that uses a
hyperparameter and the schema that admits it are the same thing. :func:`validate` checks all of
it before any work and raises :class:`ConfigError` with one message naming the key and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, OmegaConf

from secondorder.data import DATASETS
from secondorder.data.sampler import plan_batches
from secondorder.models import MODELS
from secondorder.optim import LOSS_KINDS, OPTIMIZERS
from secondorder.optim.kfac.worker_settings import WorkersSettings
from secondorder.trainer.settings import TrainerSettings


class ConfigError(ValueError):
    """A user's configuration mistake, reported before any work starts."""


@dataclass
class DistributedSettings:
    """``backend``: ``auto`` (horovod under horovodrun, torch under torchrun, else none),
    ``none``, ``torch``, ``horovod``.

    ``verify_every``: compare a parameter checksum across ranks every this many steps
    (0 = never). ``timeout_s``: collective timeout.
    """

    backend: Literal["auto", "none", "torch", "horovod"] = "auto"
    timeout_s: float = 600.0
    verify_every: int = 0


@dataclass
class LoggerSettings:
    """``name``: ``wandb`` or ``none``; ``mode``: ``offline`` unless asked (``WANDB_MODE``)."""

    name: Literal["wandb", "none"] = "wandb"
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "secondorder"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ModelSettings:
    name: str
    loss: str
    task: Literal["classification", "reconstruction"]
    kwargs: dict[str, Any]


@dataclass
class DataSettings:
    name: str
    batch_size: int
    eval_batch_size: int
    num_workers: int
    kwargs: dict[str, Any]


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


# -- type checking ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (ints accepted as floats)."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed and str(value) not in allowed:
            raise bad
        return value if value in allowed else str(value)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = get_args(tp)[0] if get_args(tp) else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _dataclass_from(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    return value


def _unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    return ConfigError(f"{key}.{name}: unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _dataclass_from(cls: Any, data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in names:
            raise _unknown_key(key, name, names)
    return cls(**{n: _coerce(v, hints[n], f"{key}.{n}") for n, v in data.items()})


def factory_schema(factory: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """The keyword-only arguments of ``factory``: name -> (annotation, default)."""
    hints = typing.get_type_hints(factory)
    return {
        p.name: (hints.get(p.name, Any), p.default)
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _factory_kwargs(factory: Callable[..., Any], data: Mapping[str, Any], key: str) -> dict:
    schema = factory_schema(factory)
    for name in data:
        if name not in schema:
            raise _unknown_key(key, name, list(schema))
    return {n: _coerce(v, schema[n][0], f"{key}.{n}") for n, v in data.items()}


def _choice(group: str, name: Any, registry: Mapping[str, Any]) -> str:
    if name not in registry:
        raise ConfigError(
            f"{group}.name: unknown {group} {name!r}; allowed values: {', '.join(registry)}"
        )
    return name


# -- the whole config --------------------------------------------------------------------------


def validate(cfg: DictConfig | Mapping[str, Any], *, world_size: int = 1) -> RunConfig:
    """Check a composed config; the first problem found raises :class:`ConfigError`."""
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

    model_raw = dict(raw["model"])
    model_name = _choice("model", model_raw.pop("name", None), MODELS)
    loss = model_raw.pop("loss", None)
    if loss not in LOSS_KINDS:
        raise ConfigError(f"model.loss: expected one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    task = _coerce(
        model_raw.pop("task", "classification"),
        Literal["classification", "reconstruction"],
        "model.task",
    )
    model = ModelSettings(
        model_name, loss, task, _factory_kwargs(MODELS[model_name], model_raw, "model")
    )

    data_raw = dict(raw["data"])
    data_name = _choice("data", data_raw.pop("name", None), DATASETS)
    batch_size = _coerce(data_raw.pop("batch_size", None), int, "data.batch_size")
    eval_batch = _coerce(data_raw.pop("eval_batch_size", 1024), int, "data.eval_batch_size")
    workers = _coerce(data_raw.pop("num_workers", 0), int, "data.num_workers")
    for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch)):
        if value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value}")
    data = DataSettings(
        data_name,
        batch_size,
        eval_batch,
        workers,
        _factory_kwargs(DATASETS[data_name], data_raw, "data"),
    )

    opt_raw = dict(raw["optimizer"])
    opt_name = _choice("optimizer", opt_raw.pop("name", None), OPTIMIZERS)
    optimizer = OptimizerSettings(
        opt_name, _factory_kwargs(OPTIMIZERS[opt_name], opt_raw, "optimizer")
    )
    for key in ("lr", "damping"):
        value = optimizer.kwargs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"optimizer.{key}: must be positive, got {value}")

    trainer = _dataclass_from(TrainerSettings, raw["trainer"], "trainer")
    _check_trainer(trainer)
    metric = trainer.target.metric
    produced = ["train_loss", "eval_loss"] + (["eval_accuracy"] if task == "classification" else [])
    if metric is not None and metric not in produced:
        raise ConfigError(
            f"trainer.target.metric: {metric!r} is not produced by a {task} task; "
            f"allowed values: {', '.join(produced)}"
        )
    if (metric is None) != (trainer.target.value is None):
        raise ConfigError("trainer.target: set both metric and value, or neither")
    try:
        plan_batches(
            global_batch=batch_size, world_size=world_size, max_micro_batch=trainer.max_micro_batch
        )
    except ValueError as err:
        raise ConfigError(f"data.batch_size: {err}") from err

    workers = _workers(raw.get("workers"), opt_name)
    return RunConfig(
        model=model,
        data=data,
        optimizer=optimizer,
        trainer=trainer,
        distributed=_dataclass_from(DistributedSettings, raw["distributed"], "distributed"),
        logger=_dataclass_from(LoggerSettings, raw["logger"], "logger"),
        name=str(raw.get("name", "default")),
        workers=workers,
    )


def _workers(data: Any, optimizer: str) -> WorkersSettings:
    """The ``workers`` group (absent: ``mode: none``)."""
    try:
        workers = _dataclass_from(WorkersSettings, data or {"mode": "none"}, "workers")
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


def _check_trainer(t: TrainerSettings) -> None:
    positive = {
        "trainer.max_steps": t.max_steps,
        "trainer.max_micro_batch": t.max_micro_batch,
        "trainer.log_every": t.log_every,
        "trainer.base_batch_size": t.base_batch_size,
    }
    non_negative = {
        "trainer.eval_every": t.eval_every,
        "trainer.checkpoint_every": t.checkpoint_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.lr_schedule.warmup_steps": t.lr_schedule.warmup_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be zero or positive, got {value}")
    if t.threads is not None and t.threads <= 0:
        raise ConfigError(f"trainer.threads: must be positive or null, got {t.threads}")
