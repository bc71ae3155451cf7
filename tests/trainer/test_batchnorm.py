"""BatchNorm running statistics equal on every rank: the average, before evaluation and saves;
``model.sync_bn`` where it can run and its refusals where it cannot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from torch import nn

from secondorder.config import ConfigError, validate
from secondorder.distributed.comm import TorchComm
from secondorder.distributed.testing import run_on_ranks
from secondorder.trainer.batchnorm import (
    average_norm_statistics,
    convert_sync_batchnorm,
    norm_layers,
)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4)
    )


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}


def _average_on_rank() -> dict[str, dict[str, torch.Tensor]]:
    comm = TorchComm()
    model = _bn_net().train()
    gen = torch.Generator().manual_seed(100 + comm.rank)  # different data on every rank
    for _ in range(2 + comm.rank):  # and a different number of batches
        model(torch.randn(8, 3, 6, 6, generator=gen) * (1 + comm.rank))
    before = _buffers(model)
    average_norm_statistics(model, comm)
    return {"before": before, "after": _buffers(model)}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_statistics_become_the_mean_over_ranks() -> None:
    ranks = run_on_ranks(_average_on_rank, world_size=2, timeout_s=90)
    for key, first in ranks[0]["after"].items():
        assert torch.equal(first, ranks[1]["after"][key]), key  # bitwise equal on both ranks
        values = torch.stack([r["before"][key].double() for r in ranks])
        expected = values.mean(0)
        if key.endswith("num_batches_tracked"):
            assert first.dtype == torch.int64 and first.item() == round(expected.item())
        else:
            assert not torch.equal(ranks[0]["before"][key], ranks[1]["before"][key])
            torch.testing.assert_close(first.double(), expected, rtol=1e-6, atol=1e-7)


def test_one_rank_or_no_communicator_changes_nothing() -> None:
    model = _bn_net().train()
    model(torch.randn(8, 3, 6, 6))
    before = _buffers(model)
    average_norm_statistics(model, None)
    for key, value in _buffers(model).items():
        assert torch.equal(value, before[key])


def _train_and_return_buffers(overrides: list[str]) -> dict[str, torch.Tensor]:
    from secondorder.build import build_run

    with build_run(compose_config(overrides)) as trainer:
        trainer.fit()
        return _buffers(trainer.model)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_after_training_and_evaluation_every_rank_holds_the_same_statistics(
    tmp_path: Path,
) -> None:
    overrides = [
        f"trainer.run_dir={tmp_path / 'run'}",
        "model=resnet20",
        "data=synthetic",
        "data.num_samples=64",
        "data.eval_samples=32",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.progress=false",
        "trainer.threads=1",
        "logger=none",
        "distributed=torch",
    ]
    ranks = run_on_ranks(_train_and_return_buffers, world_size=2, args=(overrides,), timeout_s=150)
    assert ranks[0] and set(ranks[0]) == set(ranks[1])
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    saved = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)
    for key, value in ranks[0].items():
        assert torch.equal(saved[key], value), key


def test_sync_bn_conversion_keeps_names_and_kfac_layers() -> None:
    from secondorder.optim.kfac.layers import find_layers

    model = _bn_net()
    plain_keys = list(model.state_dict())
    plain_layers = [
        type(layer.module).__name__
        for layer in find_layers(model, model.parameters(), double_factor_threshold=4096)
    ]
    synced = convert_sync_batchnorm(model)
    assert list(synced.state_dict()) == plain_keys
    assert all(isinstance(m, nn.SyncBatchNorm) for m in norm_layers(synced))
    assert len(norm_layers(synced)) == 2
    layers = find_layers(synced, synced.parameters(), double_factor_threshold=4096)
    assert [type(layer.module).__name__ for layer in layers] == plain_layers


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distributed=horovod"], "model.sync_bn: SyncBatchNorm needs the torch.distributed"),
        (["distributed=none"], "model.sync_bn: SyncBatchNorm needs the torch.distributed"),
    ],
)
def test_sync_bn_refused_without_torch_distributed(overrides: list[str], message: str) -> None:
    cfg = compose_config(["model=resnet20", "data=synthetic", "model.sync_bn=true", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def _build_with_sync_bn(overrides: list[str]) -> str:
    from secondorder.build import build_model

    run = validate(compose_config(overrides), world_size=int(os.environ["WORLD_SIZE"]))
    try:
        build_model(run, torch.device("cpu"), TorchComm())
    except ConfigError as err:
        return str(err)
    return "built"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sync_bn_on_cpu_ranks_is_a_config_error() -> None:
    # torch runs SyncBatchNorm's synchronised forward on GPUs only (ValueError on CPU tensors).
    overrides = ["model=resnet20", "data=synthetic", "model.sync_bn=true", "distributed=torch"]
    results = run_on_ranks(_build_with_sync_bn, world_size=2, args=(overrides,), timeout_s=90)
    assert all(
        r.startswith("model.sync_bn: torch runs SyncBatchNorm on GPUs only") for r in results
    )


def test_sync_bn_with_one_rank_is_a_no_op_with_a_note(capsys: pytest.CaptureFixture) -> None:
    from secondorder.build import build_model

    run = validate(compose_config(["model=resnet20", "data=synthetic", "model.sync_bn=true"]))
    model = build_model(run, torch.device("cpu"), None)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert "note: model.sync_bn has nothing to synchronise" in capsys.readouterr().err
