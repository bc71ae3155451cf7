"""Tests for the synthetic dataset."""

from __future__ import annotations

import pytest
import torch

from secondorder.data import synthetic
from secondorder.data import synthetic_data as synthetic_module


def test_default_shape_and_types() -> None:
    bundle = synthetic(num_samples=16, eval_samples=8)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    x, y = bundle.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0
    assert len(bundle.train) == 16 and len(bundle.eval) == 8


def test_deterministic_and_seed_dependent() -> None:
    a = synthetic(num_samples=64, eval_samples=32, shape=[4, 5], seed=3)
    b = synthetic(num_samples=64, eval_samples=32, shape=[4, 5], seed=3)
    c = synthetic(num_samples=64, eval_samples=32, shape=[4, 5], seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.eval.x, b.eval.x) and torch.equal(a.eval.y, b.eval.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.train.x, a.eval.x[:32].repeat(2, 1, 1))


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    synthetic(num_samples=8, eval_samples=8, shape=[3])
    assert torch.equal(state, torch.get_rng_state())


def test_labels_come_from_a_learnable_teacher() -> None:
    bundle = synthetic(num_samples=2000, eval_samples=500, shape=[6], num_classes=4, seed=1)
    counts = torch.bincount(bundle.train.y, minlength=4)
    assert counts.min() > 200  # roughly balanced
    # The labels are a linear function of x: a least-squares linear fit separates them well.
    x, y = bundle.train.x, bundle.train.y
    weights = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 4).float()).solution
    accuracy = ((bundle.eval.x @ weights).argmax(1) == bundle.eval.y).float().mean()
    assert accuracy > 0.6


def test_labels_follow_teacher_whatever_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    # The teacher is the first draw of the seeded generator; rebuild it independently.
    teacher = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    teacher /= teacher.norm(dim=0, keepdim=True)
    whole = synthetic(num_samples=50, eval_samples=10, shape=[2, 3], seed=7)
    monkeypatch.setattr(synthetic_module, "_CHUNK_ELEMENTS", 12)  # two rows per chunk
    chunked = synthetic(num_samples=50, eval_samples=10, shape=[2, 3], seed=7)
    again = synthetic(num_samples=50, eval_samples=10, shape=[2, 3], seed=7)
    assert torch.equal(chunked.train.x, again.train.x)
    for bundle in (whole, chunked):
        assert bundle.train.x.shape == (50, 2, 3) and bundle.eval.x.shape == (10, 2, 3)
        for split in (bundle.train, bundle.eval):
            assert torch.equal(split.y, (split.x.flatten(1) @ teacher).argmax(1))


@pytest.mark.parametrize(
    "kwargs",
    [{"num_samples": 0}, {"eval_samples": 0}, {"num_classes": 1}, {"shape": [3, 0]}, {"shape": []}],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synthetic(**kwargs)
