"""A teacher-student classification task with label noise: a large-batch workload on a CPU.

Inputs are ``x ~ N(0, I_d)``; a fixed random teacher network ``f`` gives logits, and each label
is *sampled* from ``softmax(f(x) / temperature)``, so no student can do better than the teacher
itself: the Bayes loss is the teacher's conditional entropy (:func:`teacher_student_bayes`
measures it on the eval split). Near that optimum the true gradient ``|G|²`` goes to zero while
the per-example gradient covariance ``tr(Σ)`` stays, set by the label noise, so the gradient noise
scale ``B_simple = tr(Σ)/|G|²`` (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training") grows as training approaches the target. That is the noisy quadratic model of Zhang
et al. 2019 ("Which algorithmic choices matter at which batch sizes?"), and the regime of late
ImageNet training, where B_simple reaches the tens of thousands.

No example is stored. Example ``i`` of a split is a pure function of ``(seed, split, i)``: each
of its ``d`` input values and the uniform that samples its label come from a counter-based hash
of those numbers (the "lowbias32" integer hash, turned into a normal by the inverse normal CDF).
So a training set of millions of examples costs no memory and no generation time, any batch is
drawn in one vectorised call, every process (ranks, statistics workers) sees the same examples,
and the eval split (another ``split`` number) is disjoint from the training split.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from secondorder.data.core import DataBundle, DataSpec

__all__ = ["TeacherStudentDataset", "teacher_student", "teacher_student_bayes", "uniforms"]

_MASK32 = 0xFFFFFFFF
_TRAIN, _EVAL = 0, 1


def teacher_student(
    *,
    num_samples: int = 8_388_608,
    eval_samples: int = 65_536,
    input_dim: int = 40,
    teacher_width: int = 64,
    teacher_depth: int = 1,
    num_classes: int = 10,
    temperature: float = 1.0,
    seed: int = 0,
) -> DataBundle:
    """Builds the task: the teacher's weights are drawn now, every example on demand.

    Args:
        num_samples: Size of the training split (examples are generated, never stored; a run of
            ``batch x steps`` above it sees examples again).
        eval_samples: Size of the held-out evaluation split.
        input_dim: ``d``, the number of input features.
        teacher_width: Width of each hidden (tanh) layer of the teacher.
        teacher_depth: Number of hidden layers of the teacher (0: a linear teacher).
        num_classes: Number of classes.
        temperature: Divides the teacher's logits (whose spread over inputs is normalised to
            one) before the softmax the labels are sampled from: higher means noisier labels.
        seed: Seed of the teacher's weights and of every example.

    Raises:
        ValueError: If an argument is out of range.
    """
    spec = teacher_student_spec(
        num_samples=num_samples,
        eval_samples=eval_samples,
        input_dim=input_dim,
        teacher_width=teacher_width,
        teacher_depth=teacher_depth,
        num_classes=num_classes,
        temperature=temperature,
    )
    teacher = _teacher_weights(input_dim, teacher_width, teacher_depth, num_classes, seed)
    common = {"teacher": teacher, "temperature": temperature, "seed": seed}
    return DataBundle(
        train=TeacherStudentDataset(num_samples=num_samples, split=_TRAIN, **common),
        eval=TeacherStudentDataset(num_samples=eval_samples, split=_EVAL, **common),
        num_classes=num_classes,
        input_shape=spec.input_shape,
        description=(
            f"teacher_student: {num_samples} train / {eval_samples} eval examples of dimension "
            f"{input_dim}, {num_classes} classes sampled from a {teacher_depth}x{teacher_width} "
            f"tanh teacher at temperature {temperature}, seed={seed}"
        ),
    )


def teacher_student_spec(
    *,
    num_samples: int,
    eval_samples: int,
    input_dim: int,
    teacher_width: int,
    teacher_depth: int,
    num_classes: int,
    temperature: float,
    **_: object,
) -> DataSpec:
    """What :func:`teacher_student` makes of these arguments; checks them without drawing.

    Raises:
        ValueError: If an argument is out of range.
    """
    if not 1 <= num_samples < 2**32 or not 1 <= eval_samples < 2**32:
        raise ValueError(
            f"num_samples and eval_samples must be in [1, 2^32), got {num_samples} and "
            f"{eval_samples}"
        )
    if input_dim < 1 or teacher_width < 1 or teacher_depth < 0:
        raise ValueError(
            f"input_dim and teacher_width must be positive and teacher_depth non-negative, got "
            f"{input_dim}, {teacher_width}, {teacher_depth}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return DataSpec(
        input_shape=(input_dim,),
        num_classes=num_classes,
        train_samples=num_samples,
        eval_samples=eval_samples,
    )


def teacher_student_bayes(**kwargs: object) -> dict[str, float]:
    """The teacher's own scores on the eval split: the floor a student can only approach.

    Args:
        **kwargs: The arguments of :func:`teacher_student`.

    Returns:
        ``eval_loss`` (the teacher's cross-entropy on the sampled eval labels) and
        ``eval_accuracy`` (its argmax against them), as the trainer measures a student, and
        their expectations over the label noise: ``entropy`` (the mean entropy of the label
        distribution, the Bayes loss) and ``expected_accuracy`` (the mean top probability).
    """
    evaluation = teacher_student(**kwargs).eval
    assert isinstance(evaluation, TeacherStudentDataset)
    totals = torch.zeros(4, dtype=torch.float64)
    for indices in torch.arange(len(evaluation)).split(16_384):
        x, y = evaluation.get_batch(indices)
        log_p = evaluation.log_probs(x.double())
        p = log_p.exp()
        totals += torch.stack(
            [
                -log_p.gather(1, y[:, None]).sum(),
                (log_p.argmax(dim=1) == y).sum(),
                -(p * log_p).sum(),
                p.max(dim=1).values.sum(),
            ]
        )
    totals /= len(evaluation)
    names = ("eval_loss", "eval_accuracy", "entropy", "expected_accuracy")
    return {name: float(value) for name, value in zip(names, totals, strict=True)}


class TeacherStudentDataset(Dataset):
    """One split: example ``i`` is generated from ``(seed, split, i)`` when it is asked for.

    Args:
        num_samples: Number of examples of the split.
        split: A number that separates the splits' examples (0: train, 1: eval).
        teacher: The teacher's ``(weight, bias)`` pairs, last one the output layer.
        temperature: Divides the teacher's logits.
        seed: Seed of the examples.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        split: int,
        teacher: list[tuple[torch.Tensor, torch.Tensor]],
        temperature: float,
        seed: int,
    ) -> None:
        self.num_samples = num_samples
        self.split = split
        self.teacher = teacher
        self.temperature = temperature
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch(torch.tensor([index]))
        return x[0], y[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices``: float32 inputs ``(n, d)`` and int64 labels ``(n,)``."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"an index is outside [0, {self.num_samples})")
        dim = self.teacher[0][0].shape[1]
        u = uniforms(indices, dim + 1, seed=self.seed, stream=self.split)
        x = torch.special.ndtri(u[:, :dim])
        p = self.log_probs(x).exp()
        # Inverse-CDF sampling of each label from its own uniform.
        labels = (p.cumsum(dim=1) < u[:, dim : dim + 1]).sum(dim=1)
        return x.float(), labels.clamp_(max=p.shape[1] - 1)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log softmax(f(x) / temperature)`` in float64: the distribution labels come from."""
        h = x.double()
        for weight, bias in self.teacher[:-1]:
            h = torch.tanh(h @ weight.T + bias)
        weight, bias = self.teacher[-1]
        return torch.log_softmax((h @ weight.T + bias) / self.temperature, dim=1)


def uniforms(indices: torch.Tensor, count: int, *, seed: int, stream: int) -> torch.Tensor:
    """``count`` uniforms in (0, 1) per index, each a pure function of its coordinates.

    Returns:
        A float64 tensor of shape ``(len(indices), count)``.
    """
    key = _hash32(torch.tensor([(seed * 2 + stream) & _MASK32]))
    high = _hash32(torch.tensor([(seed >> 31) & _MASK32]) ^ key)
    rows = _hash32(_hash32((indices & _MASK32) ^ key) ^ (indices >> 32) ^ high)
    columns = _hash32(torch.arange(count, dtype=torch.int64) ^ _hash32(key ^ 0x9E3779B9))
    bits = _hash32(rows[:, None] ^ columns[None, :])
    return (bits.double() + 0.5) / 2.0**32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (C. Wellons) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _multiply32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _multiply32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _multiply32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2^32`` in two 16-bit halves, so no int64 product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _teacher_weights(
    input_dim: int, width: int, depth: int, num_classes: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian layers with variance 1/fan-in (biases 0.5/sqrt(fan-in)), float64, from ``seed``.

    The output layer is rescaled so the logits' spread over inputs (their standard deviation,
    measured on 4096 probe inputs) is one: the temperature alone sets the label noise, whatever
    the depth and width.
    """
    generator = torch.Generator().manual_seed(seed)
    sizes = [input_dim, *[width] * depth, num_classes]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        weight = torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64)
        bias = torch.randn(fan_out, generator=generator, dtype=torch.float64)
        layers.append((weight / math.sqrt(fan_in), bias * 0.5 / math.sqrt(fan_in)))
    h = torch.randn(4096, input_dim, generator=generator, dtype=torch.float64)
    for weight, bias in layers[:-1]:
        h = torch.tanh(h @ weight.T + bias)
    weight, bias = layers[-1]
    scale = (h @ weight.T + bias).std(dim=0).mean()
    layers[-1] = (weight / scale, bias / scale)
    return layers
