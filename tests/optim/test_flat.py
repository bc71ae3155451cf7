"""The flat-vector helpers: the dict, list and 1-D forms of a vector line up element for element."""

from __future__ import annotations

import pytest
import torch
from float64_problems import DTYPE, tiny_mlp
from torch import nn

from secondorder.optim.flat import (
    dot,
    flat_gradient,
    flatten,
    named_parameters_of,
    params_by_name,
    set_flat,
    single_group_parameters,
    split_like,
    unflatten,
)


def test_forms_round_trip_in_model_order() -> None:
    model = tiny_mlp()
    params = params_by_name(model)
    assert list(params) == [name for name, _ in model.named_parameters()]
    w = torch.arange(sum(p.numel() for p in model.parameters()), dtype=DTYPE)
    as_dict = unflatten(w, params)
    as_list = split_like(w, list(model.parameters()))
    views = zip(as_dict.values(), as_list, strict=True)
    assert all(t.data_ptr() == u.data_ptr() for t, u in views)
    assert torch.equal(flatten(as_dict), w) and torch.equal(flatten(as_list), w)
    assert as_dict["0.weight"].shape == (5, 4) and float(as_dict["0.bias"][0]) == 20.0
    with pytest.raises(ValueError, match="elements"):
        split_like(w[:-1], as_list)


def test_dot_pairs_dicts_by_name_and_lists_by_position() -> None:
    gen = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, generator=gen, dtype=DTYPE), "y": torch.randn(2, 2, generator=gen)}
    b = {"y": torch.randn(2, 2, generator=gen), "x": torch.randn(3, generator=gen, dtype=DTYPE)}
    expected = float(a["x"] @ b["x"]) + float((a["y"] * b["y"]).sum())
    assert float(dot(a, b)) == pytest.approx(expected, rel=1e-6)
    assert float(dot([a["x"], a["y"]], [b["x"], b["y"]])) == pytest.approx(expected, rel=1e-6)


def test_parameters_in_model_order_and_their_gradient() -> None:
    model = tiny_mlp()
    last = [model[2].bias, model[2].weight]  # out of order on purpose
    assert list(named_parameters_of(model, last)) == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="not parameters of the model"):
        named_parameters_of(model, [nn.Parameter(torch.zeros(2))])
    opt = torch.optim.SGD(last, lr=0.1)
    assert single_group_parameters(opt, model) == [model[2].weight, model[2].bias]
    opt.add_param_group({"params": [model[0].weight]})
    with pytest.raises(ValueError, match="one parameter group"):
        single_group_parameters(opt, model)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    g = flat_gradient([model[2].weight, model[2].bias])
    assert torch.equal(g, torch.cat([torch.ones(15, dtype=DTYPE), torch.zeros(3, dtype=DTYPE)]))
    with torch.no_grad():
        set_flat([model[2].weight, model[2].bias], torch.arange(18, dtype=DTYPE))
    assert float(model[2].weight[1, 0]) == 5.0 and float(model[2].bias[2]) == 17.0
