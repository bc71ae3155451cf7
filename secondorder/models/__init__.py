"""Model zoo: a registry of model factories and :func:`build_model`.

Every factory takes only keyword arguments, each with a default and a simple type annotation,
so configuration keys can be validated against ``inspect.signature``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from secondorder.models.autoencoder import autoencoder
from secondorder.models.cnn1d import cnn1d
from secondorder.models.convnet import convnet
from secondorder.models.mlp import mlp
from secondorder.models.resnet import resnet18, resnet20, resnet50

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn1d": cnn1d,
    "convnet": convnet,
    "autoencoder": autoencoder,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
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
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return factory(**kwargs)


__all__ = [
    "MODELS",
    "build_model",
    "autoencoder",
    "cnn1d",
    "convnet",
    "mlp",
    "resnet18",
    "resnet20",
    "resnet50",
]
