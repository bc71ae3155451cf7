"""Each optimizer class's keyword-only signature is its schema.

Every preset in ``configs/optimizer/`` composes to the class's defaults plus the keys the preset
file itself sets, and the class receives exactly those values; every keyword-only argument of
every class is a command-line override without ``+``; every value a class rejects is one
``ConfigError`` naming the key, raised by ``validate`` before any data or model is built.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf
from torch import nn

from secondorder.config import ConfigError, validate
from secondorder.optim import OPTIMIZERS, OptimContext, build_optimizer
from secondorder.optim.library_optimizers import missing_library
from secondorder.optim.registry import CONTEXT_ARGUMENTS

PRESET_DIR = REPO / "configs" / "optimizer"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_file(preset: str) -> tuple[str, dict[str, Any]]:
    """The optimizer a preset file starts from and the keys it (or a parent preset) sets."""
    raw = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    name, values = None, {}
    for entry in raw.get("defaults", []):
        if entry == "_self_":
            continue
        if entry.startswith("/schema/optimizer/"):
            name = entry.removeprefix("/schema/optimizer/").split("@")[0]
        else:  # another preset of the same group
            name, parent = preset_file(entry)
            values.update(parent)
    values.update({k: v for k, v in raw.items() if k != "defaults"})
    assert name is not None, f"{preset}.yaml starts from no /schema/optimizer/<name>"
    return name, values


def keyword_only(function: Any) -> dict[str, Any]:
    return {
        p.name: p.default
        for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def signature_defaults(name: str) -> dict[str, Any]:
    """Config keys and defaults of ``name``, read here from the signatures themselves."""
    entry = OPTIMIZERS[name]
    values = {}
    for key, default in keyword_only(entry.cls).items():
        if key in CONTEXT_ARGUMENTS or key in entry.hidden:
            continue
        if key in entry.pairs:
            values.update(zip(entry.pairs[key], default, strict=True))
        else:
            values[key] = list(default) if isinstance(default, tuple) else default
    if entry.translate is not None:
        values.update(keyword_only(entry.translate))
    return {k: "???" if v is inspect.Parameter.empty else v for k, v in values.items()}


def composed_optimizer(*overrides: str) -> dict[str, Any]:
    cfg = compose_config(list(overrides))
    return OmegaConf.to_container(cfg.optimizer, resolve=False)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def build_and_record(
    name: str, kwargs: dict[str, Any], context: OptimContext, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any]]:
    """Build through ``build_optimizer``; return the optimizer and the class's keyword args."""
    cls = OPTIMIZERS[name].cls
    original = cls.__init__
    received: dict[str, Any] = {}

    @functools.wraps(original)
    def spy(self, params, **kw):
        received.update(kw)
        original(self, params, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(cls, "__init__", spy)
        opt = build_optimizer(name, context.model.parameters(), context, **kwargs)
    return opt, received


def test_every_optimizer_has_a_preset_of_its_own_name() -> None:
    assert set(OPTIMIZERS) <= set(PRESETS)
    assert {preset_file(p)[0] for p in PRESETS} == set(OPTIMIZERS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_class_defaults_plus_its_own_overrides(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, overrides = preset_file(preset)
    if missing_library(OPTIMIZERS[name].cls):  # tested in tests/optim/test_library_optimizers.py
        pytest.skip(f"optimizer={name} needs {missing_library(OPTIMIZERS[name].cls)}")
    composed = composed_optimizer(f"optimizer={preset}")
    assert composed == {"name": name, **signature_defaults(name), **overrides}

    run = validate(compose_config([f"optimizer={preset}"]))
    assert run.optimizer.name == name
    model = tiny_model()
    context = OptimContext(model=model, loss_kind=run.model.loss, steps_per_epoch=7)
    opt, received = build_and_record(name, run.optimizer.kwargs, context, monkeypatch)

    entry = OPTIMIZERS[name]
    takes = inspect.signature(entry.cls).parameters
    for key in CONTEXT_ARGUMENTS:  # context only where the signature takes it
        assert (key in received) == (key in takes), (name, key)
        if key in takes:
            assert received[key] == getattr(context, key)
    translated = set(keyword_only(entry.translate)) if entry.translate else set()
    for key, value in composed.items():
        if key == "name" or key in translated:
            continue
        pair = [(k, parts.index(key)) for k, parts in entry.pairs.items() if key in parts]
        got = received[pair[0][0]][pair[0][1]] if pair else received[key]
        assert got == value, (preset, key, got, value)
    if name == "neumann":  # epochs -> steps through steps_per_epoch
        assert received["warmup_steps"] == round(composed["warmup_epochs"] * 7)
        assert received["reset_steps"] == round(composed["reset_epochs"] * 7)
    passed = set(composed) - {"name"} - translated - {p for ps in entry.pairs.values() for p in ps}
    made = set(entry.pairs) | ({"warmup_steps", "reset_steps"} if name == "neumann" else set())
    assert set(received) == passed | made | (set(CONTEXT_ARGUMENTS) & set(takes))
    group = opt.param_groups[0]
    for key, value in received.items():
        if key in opt.defaults:
            assert group[key] == value, (preset, key)


def test_kfac_presets_set_the_inverse_method() -> None:
    for preset, method in (("kfac", "eigen"), ("kfac_eigen", "eigen"), ("kfac_inverse", "inverse")):
        composed = composed_optimizer(f"optimizer={preset}")
        assert (composed["name"], composed["inverse_method"]) == ("kfac", method)


def other_value(annotation: Any, default: Any) -> tuple[str, Any]:
    """A value unlike ``default`` that fits ``annotation``: (override text, composed value)."""
    union = get_origin(annotation) in (typing.Union, types.UnionType)
    kind = [o for o in get_args(annotation) if o is not type(None)][0] if union else annotation
    if get_origin(kind) is Literal:
        choice = next(a for a in get_args(kind) if a != default)
        return choice, choice
    if kind is bool:
        return str(not default).lower(), not default
    if kind is int:
        value = (default or 0) + 3
        return str(value), value
    if kind is float:
        value = 0.5 if default in (None, "???", 0.0) else default / 2
        return repr(value), value
    if get_origin(kind) is list:
        return "[fc,conv]", ["fc", "conv"]
    raise AssertionError(f"no test value for {annotation!r}")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_class_argument_is_a_command_line_override(name: str) -> None:
    from secondorder.config import optimizer_schema

    schema = optimizer_schema(name)
    assert set(schema) == set(signature_defaults(name))
    defaults = signature_defaults(name)
    chosen = {key: other_value(tp, defaults[key]) for key, (tp, _) in schema.items()}
    composed = composed_optimizer(
        f"optimizer={name}", *(f"optimizer.{key}={text}" for key, (text, _) in chosen.items())
    )
    for key, (_, value) in chosen.items():
        assert composed[key] == value, (name, key)


@pytest.mark.parametrize(
    ("preset", "override", "world_size", "key"),
    [
        ("sgd", "momentum=1.5", 1, "momentum"),
        ("adamw", "beta1=1.5", 1, "beta1"),
        ("adamw", "eps=-1", 1, "eps"),
        ("lars", "trust_coefficient=0", 1, "trust_coefficient"),
        ("lamb", "beta2=1.0", 1, "beta2"),
        ("lamb", "max_trust_ratio=-1", 1, "max_trust_ratio"),
        ("kfac", "factor_decay=1.5", 1, "factor_decay"),
        ("kfac", "inverse_method=foo", 1, "inverse_method"),
        ("kfac", "damping=-1", 1, "damping"),
        ("kfac", "grad_worker_fraction=0.5", 4, "grad_worker_fraction"),
        ("kfac_inverse", "kl_clip=-1", 1, "kl_clip"),
        ("newton", "min_eigenvalue=-1", 1, "min_eigenvalue"),
        ("newton_cg", "armijo_c1=2", 1, "armijo_c1"),
        ("newton_cg", "hvp_mode=fast", 1, "hvp_mode"),
        ("ggn_cg", "cg_warm_start_decay=2", 1, "cg_warm_start_decay"),
        ("curveball", "lambda_factor=2", 1, "lambda_factor"),
        ("neumann", "gamma=1.0", 1, "gamma"),
        ("neumann", "mu_min=0.95", 1, "mu_min"),
        ("neumann", "warmup_epochs=-1", 1, "warmup_epochs"),
    ],
)
def test_range_error_is_one_config_error_naming_the_key(
    preset: str, override: str, world_size: int, key: str
) -> None:
    cfg = compose_config([f"optimizer={preset}", f"optimizer.{override}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world_size)
    message = str(err.value)
    assert message.startswith(f"optimizer.{key}: ") and "\n" not in message, message


def test_a_bare_true_is_the_fisher_type_true() -> None:
    run = validate(compose_config(["optimizer=kfac", "optimizer.fisher_type=true"]))
    assert run.optimizer.kwargs["fisher_type"] == "true"


def test_cli_range_error_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "secondorder.train", "optimizer.momentum=1.5", "logger=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert lines == ["error: optimizer.momentum: Invalid momentum value: 1.5"], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
