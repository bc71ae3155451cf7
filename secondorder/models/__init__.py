"""Model zoo: a registry of model factories and :func:`build_model`.

Every factory takes only keyword arguments, each with a default and a simple type annotation,
so configuration keys can be validated against ``inspect.signature``. Each factory has a
companion in :data:`MODEL_SPECS` that tells, from the same arguments and without building
anything, what the model takes and gives (:class:`ModelSpec`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from secondorder.models._common import ModelSpec
from secondorder.models.autoencoder import autoencoder, autoencoder_spec
from secondorder.models.cnn1d import cnn1d, cnn1d_spec
from secondorder.models.convnet import convnet, convnet_spec
from secondorder.models.mlp import mlp, mlp_spec
from secondorder.models.resnet import resnet18, resnet20, resnet50, resnet_spec

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn1d": cnn1d,
    "convnet": convnet,
    "autoencoder": autoencoder,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
}

#: For each factory, what its model takes and gives given the same (complete) keyword arguments.
MODEL_SPECS: dict[str, Callable[..., ModelSpec]] = {
    "mlp": mlp_spec,
    "cnn1d": cnn1d_spec,
    "convnet": convnet_spec,
    "autoencoder": autoencoder_spec,
    "resnet20": resnet_spec,
    "resnet18": resnet_spec,
    "resnet50": resnet_spec,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Builds a registered model.

    Args:
        name: A key of :data:`MODELS`.
        **kwargs: Keyword arguments for the model's factory.

    Returns:
        The model.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return _factory(name)(**kwargs)


def model_spec(name: str, **kwargs: object) -> ModelSpec:
    """What :func:`build_model` would build for these arguments takes and gives; builds nothing.

    Args:
        name: A key of :data:`MODELS`.
        **kwargs: Keyword arguments for the model's factory; missing ones take its defaults.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    arguments = inspect.signature(_factory(name)).bind(**kwargs)
    arguments.apply_defaults()
    return MODEL_SPECS[name](**arguments.arguments)


def _factory(name: str) -> Callable[..., nn.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


__all__ = [
    "MODELS",
    "MODEL_SPECS",
    "ModelSpec",
    "build_model",
    "model_spec",
    "autoencoder",
    "cnn1d",
    "convnet",
    "mlp",
    "resnet18",
    "resnet20",
    "resnet50",
]
