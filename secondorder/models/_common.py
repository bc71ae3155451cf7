"""Small helpers shared by the model factories."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def make_activation(name: str, *, allowed: tuple[str, ...] | None = None) -> nn.Module:
    """Builds an activation module from its name.

    Args:
        name: Activation name, e.g. ``"relu"``.
        allowed: Optional subset of :data:`ACTIVATIONS` keys that the caller accepts.

    Returns:
        A fresh activation module.

    Raises:
        ValueError: If ``name`` is not an accepted activation.
    """
    choices = tuple(ACTIVATIONS) if allowed is None else allowed
    if name not in choices:
        raise ValueError(f"Unknown activation {name!r}; choose one of: {', '.join(choices)}")
    return ACTIVATIONS[name]()
