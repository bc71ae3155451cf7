"""One convention for what belongs to no parameter: λ in ``param_groups[0]["damping"]``,
counters in ``global_state``; both survive ``state_dict`` / ``load_state_dict``."""

from __future__ import annotations

import copy

import pytest
import torch
from float64_problems import Float64Closure, tiny_batch, tiny_mlp

from secondorder.optim.curveball import CurveBall
from secondorder.optim.neumann import Neumann
from secondorder.optim.newton import ExactNewton
from secondorder.optim.newton_cg import GaussNewtonCG, NewtonCG

MAKERS = {
    # Thresholds low = high: every λ test moves λ.
    "curveball": lambda m: CurveBall(m.parameters(), lambda_every=1, lambda_low=1, lambda_high=1),
    "newton": lambda m: ExactNewton(m.parameters(), model=m, loss_kind="mse", damping=0.1),
    # λ = 10: short steps, an accurate quadratic model, ρ > 3/4: λ shrinks.
    "newton_cg": lambda m: NewtonCG(m.parameters(), model=m, loss_kind="mse", damping=10.0),
    "ggn_cg": lambda m: GaussNewtonCG(m.parameters(), model=m, loss_kind="mse", damping=10.0),
    "neumann": lambda m: Neumann(m.parameters(), lr=0.05, warmup_steps=1, reset_steps=2),
}
ADAPTS_DAMPING = {"curveball", "newton_cg", "ggn_cg"}


def _steps(opt: torch.optim.Optimizer, model: torch.nn.Module, seeds: range) -> None:
    for seed in seeds:
        x, y = tiny_batch("mse", seed=seed)
        opt.step(Float64Closure(model=model, micro_batches=[(x, y)], loss_kind="mse"))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_damping_and_counters_round_trip(name: str) -> None:
    model = tiny_mlp()
    opt = MAKERS[name](model)
    initial = copy.deepcopy(opt.param_groups[0].get("damping"))
    _steps(opt, model, range(3))
    assert opt.global_state["step"] == 3
    saved = copy.deepcopy(opt.state_dict())
    assert saved["global_state"] == opt.global_state
    if name in ADAPTS_DAMPING:  # the live λ, not the initial one
        assert opt.param_groups[0]["damping"] != initial
        assert saved["param_groups"][0]["damping"] == opt.param_groups[0]["damping"]

    other = tiny_mlp(seed=3)
    fresh = MAKERS[name](other)
    fresh.load_state_dict(saved)
    assert fresh.global_state == opt.global_state
    if "damping" in opt.param_groups[0]:
        assert fresh.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    saved.pop("global_state")
    with pytest.raises(ValueError, match="'global_state' entry is missing"):
        MAKERS[name](tiny_mlp()).load_state_dict(saved)
