"""Small helpers shared by the model factories, and what a model takes and gives."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ModelSpec:
    """What a model takes and gives, known from its factory's arguments alone (nothing is built).

    Config validation holds it against the data's :class:`~secondorder.data.DataSpec`, so a model
    that cannot read the data fails with one message before any data is loaded.

    Attributes:
        input_keys: The model's config keys that set its input size, named in mismatch messages.
        input_shapes: Per-sample input shapes it reads; ``None`` in a shape is any size on that
            axis; empty means any shape with ``input_features`` elements.
        input_features: Elements per sample after flattening; ``None``: any.
        num_classes: Logits per sample; ``None`` for a model that reconstructs its input.
    """

    input_keys: tuple[str, ...]
    input_shapes: tuple[tuple[int | None, ...], ...] = ()
    input_features: int | None = None
    num_classes: int | None = None

    @property
    def task(self) -> str:
        """``classification`` (predicts logits) or ``reconstruction`` (predicts its input)."""
        return "reconstruction" if self.num_classes is None else "classification"

    def takes(self, shape: tuple[int, ...]) -> bool:
        """Whether a sample of ``shape`` fits the model's first layer."""
        if self.input_features is not None and math.prod(shape) != self.input_features:
            return False
        return not self.input_shapes or any(
            len(pattern) == len(shape)
            and all(want is None or want == have for want, have in zip(pattern, shape, strict=True))
            for pattern in self.input_shapes
        )

    def describe_input(self) -> str:
        """The accepted inputs in words, e.g. ``shape (3, H, W)`` or ``40 features``."""
        if self.input_shapes:
            return "shape " + " or ".join(_shape_text(p) for p in self.input_shapes)
        return f"{self.input_features} features (any shape)"


def _shape_text(pattern: tuple[int | None, ...]) -> str:
    """``(3, H, W)`` for ``(3, None, None)``: free axes get the letters H, W, D, ..."""
    letters = iter("HWDEFG")
    parts = [str(d) if d is not None else next(letters) for d in pattern]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
