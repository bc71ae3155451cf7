"""Deep autoencoder in the style of Hinton & Salakhutdinov (2006)."""

from __future__ import annotations

import torch
from torch import nn

from secondorder.models._common import ModelSpec, make_activation

AUTOENCODER_ACTIVATIONS = ("relu", "tanh", "sigmoid")

#: Widths of the MNIST autoencoder of Hinton & Salakhutdinov (2006); use with ``in_features=784``.
MNIST_WIDTHS: list[int] = [1000, 500, 250, 30]
#: Default (smaller) widths, sized for MNIST-1D's 40 features.
MNIST1D_WIDTHS: list[int] = [200, 100, 50, 10]


def _stack(sizes: list[int], activation: str, *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(make_activation(activation, allowed=AUTOENCODER_ACTIVATIONS))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Fully connected encoder/decoder pair with a linear code layer.

    The encoder maps ``in_features -> widths[0] -> ... -> widths[-1]`` with an activation after
    every layer except the last (the code layer is linear, as in the paper). The decoder mirrors
    it back to ``in_features`` with an activation after every layer except the output, which
    returns raw values: the loss decides how to read them (e.g. as Bernoulli logits or as a
    mean-squared-error reconstruction).

    Args:
        in_features: Number of input features after flattening.
        widths: Encoder widths, ending with the code size.
        activation: One of ``relu``, ``tanh``, ``sigmoid`` (the paper used logistic units).
    """

    def __init__(self, *, in_features: int, widths: list[int], activation: str):
        super().__init__()
        if activation not in AUTOENCODER_ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; "
                f"choose one of: {', '.join(AUTOENCODER_ACTIVATIONS)}"
            )
        if not widths:
            raise ValueError("widths must list at least the code layer size")
        if in_features < 1 or any(w < 1 for w in widths):
            raise ValueError("in_features and widths must be positive")
        sizes = [in_features, *widths]
        self.in_features = in_features
        self.encoder = _stack(sizes, activation, last_activation=False)
        self.decoder = _stack(sizes[::-1], activation, last_activation=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Maps inputs of shape ``(N, ...)`` to codes of shape ``(N, widths[-1])``."""
        return self.encoder(x.flatten(1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Maps codes to raw reconstructions of shape ``(N, in_features)``."""
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructs the input.

        Args:
            x: Inputs of shape ``(N, ...)`` with ``in_features`` elements per sample.

        Returns:
            Raw reconstructions with the same shape as ``x``.
        """
        return self.decode(self.encode(x)).reshape(x.shape)


def autoencoder(
    *,
    in_features: int = 40,
    widths: list[int] | None = None,
    activation: str = "relu",
) -> nn.Module:
    """Builds a deep autoencoder.

    For the MNIST autoencoder of Hinton & Salakhutdinov (2006) pass ``in_features=784``,
    ``widths=[1000, 500, 250, 30]`` and ``activation="sigmoid"``.

    Args:
        in_features: Number of input features (40 for MNIST-1D, 784 for MNIST).
        widths: Encoder widths ending with the (linear) code layer; ``None`` means
            ``[200, 100, 50, 10]``, a small network for MNIST-1D.
        activation: One of ``relu``, ``tanh``, ``sigmoid``.

    Returns:
        An :class:`Autoencoder`.

    Raises:
        ValueError: If the activation is unknown or the sizes are invalid.
    """
    chosen = list(MNIST1D_WIDTHS) if widths is None else list(widths)
    return Autoencoder(in_features=in_features, widths=chosen, activation=activation)


def autoencoder_spec(*, in_features: int, **_: object) -> ModelSpec:
    """:func:`autoencoder` reconstructs any input of ``in_features`` elements."""
    return ModelSpec(("in_features",), input_features=in_features)
