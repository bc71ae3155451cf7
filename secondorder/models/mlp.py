"""Multi-layer perceptron classifier."""

from __future__ import annotations

from torch import nn

from secondorder.models._common import ModelSpec, make_activation


def mlp(
    *,
    in_features: int = 40,
    hidden: list[int] | None = None,
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Module:
    """Builds a fully connected classifier that flattens its input.

    The network is ``Flatten -> [Linear -> act] * len(hidden) -> Linear``.

    Args:
        in_features: Number of input features after flattening.
        hidden: Widths of the hidden layers; ``None`` means ``[256, 256]``. An empty list gives
            a linear (logistic-regression) model.
        num_classes: Number of output logits.
        activation: One of ``relu``, ``tanh``, ``sigmoid``, ``gelu``.

    Returns:
        An ``nn.Sequential`` mapping ``(N, ...)`` inputs to ``(N, num_classes)`` logits.

    Raises:
        ValueError: If the activation is unknown or a size is not positive.
    """
    widths = [256, 256] if hidden is None else list(hidden)
    if in_features < 1 or num_classes < 1 or any(w < 1 for w in widths):
        raise ValueError("in_features, num_classes and hidden widths must be positive")
    make_activation(activation)  # validate early, even when there are no hidden layers
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for width in widths:
        layers += [nn.Linear(prev, width), make_activation(activation)]
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def mlp_spec(*, in_features: int, num_classes: int, **_: object) -> ModelSpec:
    """:func:`mlp` flattens any input of ``in_features`` elements into ``num_classes`` logits."""
    return ModelSpec(("in_features",), input_features=in_features, num_classes=num_classes)
