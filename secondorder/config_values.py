"""Plain config values checked against type annotations, with messages naming the key.

The schema of every config group is code: dataclass fields, or the keyword-only, annotated
arguments of a factory or class. These helpers hold a value (from YAML or the command line) to
such an annotation and raise :class:`ConfigError` naming the key and what it allows.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args, get_origin

__all__ = [
    "ConfigError",
    "choice",
    "coerce",
    "config_type",
    "dataclass_from",
    "factory_kwargs",
    "factory_schema",
    "type_name",
    "unknown_key",
]


class ConfigError(ValueError):
    """A user's configuration mistake, reported before any work starts."""


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (ints accepted as floats)."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        text = str(value).lower() if isinstance(value, bool) else str(value)  # `true` is a bool
        if value not in allowed and text not in allowed:
            raise bad
        return value if value in allowed else text
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return coerce(value, option, key)
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
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return dataclass_from(tp, value, key)
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


def unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    return ConfigError(f"{key}.{name}: unknown key; allowed keys: {', '.join(sorted(allowed))}")


def dataclass_from(cls: Any, data: Any, key: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in names:
            raise unknown_key(key, name, names)
    return cls(**{n: coerce(v, hints[n], f"{key}.{n}") for n, v in data.items()})


def factory_schema(factory: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """The keyword-only arguments of ``factory``: name -> (annotation, default)."""
    hints = typing.get_type_hints(factory)
    return {
        p.name: (hints.get(p.name, Any), p.default)
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def factory_kwargs(factory: Callable[..., Any], data: Mapping[str, Any], key: str) -> dict:
    schema = factory_schema(factory)
    for name in data:
        if name not in schema:
            raise unknown_key(key, name, list(schema))
    return {n: coerce(v, schema[n][0], f"{key}.{n}") for n, v in data.items()}


def choice(group: str, name: Any, registry: Mapping[str, Any]) -> str:
    if name not in registry:
        raise ConfigError(
            f"{group}.name: unknown {group} {name!r}; allowed values: {', '.join(registry)}"
        )
    return name


def config_type(tp: Any) -> Any:
    """Annotation ``tp`` as a config value can meet it: callables dropped (a schedule given in a
    config is a number), any sequence a list."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        kept = [
            config_type(a) for a in get_args(tp) if get_origin(a) is not collections.abc.Callable
        ]
        return typing.Union[tuple(kept)] if len(kept) > 1 else kept[0]  # noqa: UP007
    if origin in (collections.abc.Sequence, tuple) and get_args(tp):
        return list[get_args(tp)[0]]
    return tp
