"""The teacher-student task: examples are pure functions of (seed, split, index), inputs are
standard normal, labels follow the teacher's softmax, and the teacher's scores are its floor."""

from __future__ import annotations

import pickle

import pytest
import torch

from secondorder.data import build_data, data_spec
from secondorder.data.teacher_student_data import (
    TeacherStudentDataset,
    teacher_student,
    teacher_student_bayes,
    uniforms,
)

MASK = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The reference hash in Python integers (C. Wellons' "lowbias32")."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK
    return x ^ (x >> 16)


def test_hash_matches_the_reference_on_32_bit_values() -> None:
    seed, stream, indices, count = 7, 1, [0, 1, 5, 2**32 - 1, 2**32 + 3], 3
    key = lowbias32((seed * 2 + stream) & MASK)
    high = lowbias32(0 ^ key)
    expected = []
    for i in indices:
        row = lowbias32(lowbias32((i & MASK) ^ key) ^ (i >> 32) ^ high)
        columns = [lowbias32(j ^ lowbias32(key ^ 0x9E3779B9)) for j in range(count)]
        expected.append([(lowbias32(row ^ c) + 0.5) / 2**32 for c in columns])
    got = uniforms(torch.tensor(indices), count, seed=seed, stream=stream)
    assert got.dtype == torch.float64
    assert got.tolist() == expected


def test_examples_are_a_function_of_seed_split_and_index() -> None:
    bundle = teacher_student(num_samples=1000, eval_samples=100, seed=3)
    again = teacher_student(num_samples=1000, eval_samples=100, seed=3)
    indices = torch.tensor([5, 999, 0, 5])
    x, y = bundle.train.get_batch(indices)
    assert x.shape == (4, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    x2, y2 = again.train.get_batch(indices)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[0], x[3]) and not torch.equal(x[0], x[2])
    stacked = torch.stack([bundle.train[int(i)][0] for i in indices])
    assert torch.equal(stacked, x)
    assert [int(bundle.train[int(i)][1]) for i in indices] == y.tolist()
    eval_x, _ = bundle.eval.get_batch(indices % 100)
    other_seed, _ = teacher_student(num_samples=1000, eval_samples=100, seed=4).train.get_batch(
        indices
    )
    assert (eval_x - bundle.train.get_batch(indices % 100)[0]).abs().min() > 0
    assert (other_seed - x).abs().min() > 0
    restored = pickle.loads(pickle.dumps(bundle.train))
    assert torch.equal(restored.get_batch(indices)[0], x)
    with pytest.raises(IndexError, match="outside"):
        bundle.train.get_batch(torch.tensor([1000]))


def test_inputs_are_standard_normal_and_labels_follow_the_teacher() -> None:
    train = teacher_student(num_samples=2**32 - 1, num_classes=5, temperature=0.5, seed=1).train
    assert isinstance(train, TeacherStudentDataset)
    x, y = train.get_batch(torch.arange(2**32 - 100_001, 2**32 - 1))
    assert x.mean().abs() < 0.01 and (x.std() - 1).abs() < 0.01
    correlations = torch.corrcoef(x.T.double()) - torch.eye(40, dtype=torch.float64)
    assert correlations.abs().max() < 0.02  # 4.5 standard errors at 100k examples
    probs = train.log_probs(x).exp()
    frequencies = torch.bincount(y, minlength=5) / len(y)
    # Each label frequency equals the teacher's mean probability within 4 standard errors.
    expected = probs.mean(dim=0)
    assert ((frequencies - expected).abs() < 4 * (expected / len(y)).sqrt()).all()
    # Labels are drawn from the softmax, not its argmax: the top class is not always taken.
    assert 0.5 < (probs.argmax(dim=1) == y).double().mean() < 0.95


def test_teacher_logits_have_unit_spread_and_temperature_sets_the_noise() -> None:
    train = teacher_student(temperature=1.0).train
    x, _ = train.get_batch(torch.arange(20_000))
    (w0, b0), (w1, b1) = train.teacher
    logits = torch.tanh(x.double() @ w0.T + b0) @ w1.T + b1
    assert logits.std(dim=0).mean() == pytest.approx(1.0, abs=0.05)
    assert torch.allclose(train.log_probs(x), torch.log_softmax(logits, dim=1))
    entropies = [
        teacher_student_bayes(temperature=t, eval_samples=4096)["entropy"] for t in (0.25, 1, 4)
    ]
    assert entropies == sorted(entropies) and entropies[-1] < torch.log(torch.tensor(10.0))


def test_bayes_scores_are_the_teachers_own_on_the_eval_split() -> None:
    kwargs = {"eval_samples": 3000, "temperature": 0.25, "seed": 2}
    scores = teacher_student_bayes(**kwargs)
    evaluation = teacher_student(**kwargs).eval
    x, y = evaluation.get_batch(torch.arange(3000))
    log_p = evaluation.log_probs(x.double())
    assert scores["eval_loss"] == pytest.approx(-log_p.gather(1, y[:, None]).mean().item())
    assert scores["eval_accuracy"] == pytest.approx((log_p.argmax(1) == y).double().mean().item())
    # Over the label noise the teacher's loss is its entropy: equal within sampling error.
    assert scores["eval_loss"] == pytest.approx(scores["entropy"], abs=0.03)
    assert scores["eval_accuracy"] == pytest.approx(scores["expected_accuracy"], abs=0.03)


def test_registry_builds_it_and_the_spec_checks_arguments() -> None:
    bundle = build_data("teacher_student", num_samples=64, eval_samples=16, input_dim=7)
    assert len(bundle.train) == 64 and len(bundle.eval) == 16 and bundle.input_shape == (7,)
    spec = data_spec("teacher_student", num_classes=3)
    assert spec.input_shape == (40,) and spec.num_classes == 3
    assert spec.train_samples == 8_388_608 and spec.eval_samples == 65_536
    for bad, message in [
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
        ({"teacher_depth": -1}, "teacher_depth non-negative"),
        ({"num_samples": 2**32}, r"num_samples and eval_samples must be in \[1, 2\^32\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            data_spec("teacher_student", **bad)


def test_linear_teacher_without_hidden_layers() -> None:
    train = teacher_student(num_samples=100, teacher_depth=0, input_dim=3).train
    assert len(train.teacher) == 1 and train.teacher[0][0].shape == (10, 3)
    x, y = train.get_batch(torch.arange(100))
    assert x.shape == (100, 3) and int(y.max()) < 10
