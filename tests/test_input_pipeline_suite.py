"""The ``input_pipeline`` benchmark suite: its baseline is the old transform, its quick run writes
results.json, the table and the plot, the report rebuilds from results.json alone, and trainer
cases read the data-wait record or say that it is missing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import input_pipeline
from benchmarks.run import SUITES, main
from secondorder.data.image_transforms import random_resized_crop_box


def test_baseline_draws_the_boxes_the_new_sampler_draws() -> None:
    """Same law, same draws: the old path's copy with the global RNG and the new sampler with a
    generator of the same seed give the same boxes, so the two paths do the same work."""
    for seed in range(10):
        torch.manual_seed(seed)
        old = [input_pipeline.baseline_crop_box(420, 330) for _ in range(5)]
        generator = torch.Generator().manual_seed(seed)
        assert old == [random_resized_crop_box(420, 330, generator) for _ in range(5)]


@pytest.mark.timeout(240)
def test_quick_transforms_and_report_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SECONDORDER_DATA", str(tmp_path / "data"))
    sizes = yaml.safe_load((SUITES / "input_pipeline.yaml").read_text())["transforms"]["sizes"]
    names = [f"transforms {s['image_size']}px" for s in sizes]
    out = tmp_path / "out"
    args = ["input_pipeline", "--quick", "--out", str(out), "--optimizers", ",".join(names)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["case"] for r in results] == names
    for r in results:
        assert r["kind"] == "transforms" and r["rounds"] == 2 and r["images"] == 16
        assert len(r["paths"]) == 4 and all(
            p["img_per_s_per_core"] > 0 for p in r["paths"].values()
        )
        old, new = (r["paths"][k]["img_per_s_per_core"] for k in list(r["paths"])[:2])
        assert r["speedup"]["train"] == pytest.approx(new / old)
        assert r["folder"].startswith("imagenet_generated_c4_t16")
    assert (tmp_path / "data" / results[0]["folder"] / ".complete").exists()
    readme = (out / "README.md").read_text()
    assert "| train, new (reduced decode, uint8) |" in readme and "1.00x (baseline)" in readme
    assert (out / "input_pipeline.png").stat().st_size > 1000
    (out / "README.md").write_text(readme + "\nnotes written by hand\n")
    assert main(["input_pipeline", "--quick", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "README.md").read_text() == readme + "\nnotes written by hand\n"
    capsys.readouterr()


def _fake_training(records: list[dict], summary: dict):
    def run(command: list[str], **_: object) -> subprocess.CompletedProcess:
        run_dir = Path(next(a for a in command if a.startswith("trainer.run_dir=")).split("=")[1])
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_trainer_case_reads_the_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"step": s, "images_per_s": 10.0 * s} for s in range(1, 8)]
    summary = {"steps": 7, "global_batch_size": 32, "samples_seen": 224, "wall_s": 10.0}
    case = {"name": "cpu x", "overrides": ["data.num_workers=1", "model=resnet18"]}
    monkeypatch.setattr(
        subprocess, "run", _fake_training(records, {**summary, "mean_data_wait_fraction": 0.03})
    )
    result = input_pipeline.run_trainer_case(case, tmp_path, tmp_path, ["data=imagenet"], [])
    assert result["mean_data_wait_fraction"] == 0.03 and "note" not in result
    assert result["images_per_s"] == 50.0  # median of steps 3-7
    assert result["overrides"] == [
        "data=imagenet",
        "data.num_workers=1",
        "model=resnet18",
        f"data.root={tmp_path}",
    ]
    # A trainer without the record: the case says so and falls back to samples / wall time.
    monkeypatch.setattr(subprocess, "run", _fake_training([{"step": 1}], summary))
    result = input_pipeline.run_trainer_case(
        {**case, "name": "cpu y"}, tmp_path, tmp_path, [], ["model=resnet20"]
    )
    assert (
        result["mean_data_wait_fraction"] is None and "no mean_data_wait_fraction" in result["note"]
    )
    assert result["images_per_s"] == 22.4 and "wall_s" in result["images_per_s_source"]
    assert "model=resnet20" in result["overrides"] and "model=resnet18" not in result["overrides"]


def test_failed_trainer_case_names_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(command: list[str], **_: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 2, "", "error: data.loader: bad value\n")

    monkeypatch.setattr(subprocess, "run", failing)
    case = {"name": "gpu z", "overrides": []}
    result = input_pipeline.run_trainer_case(case, tmp_path, tmp_path, [], [])
    assert result["note"] == "run failed (exit 2): error: data.loader: bad value"


def test_trainer_cases_are_valid_configs(tmp_path: Path) -> None:
    """Every trainer case (and its quick version) composes and validates, so a typo does not
    wait for the suite's run (GPU cases: composed only, their checks need CUDA and DALI)."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    from secondorder.config import validate

    trainer = yaml.safe_load((SUITES / "input_pipeline.yaml").read_text())["trainer"]
    has_loader_key = "loader" in OmegaConf.load(
        Path(__file__).parents[1] / "configs" / "data" / "imagenet.yaml"
    )
    for case in trainer["cases"]:
        for extra in ([], trainer["quick_overrides"]):
            if case.get("gpu") and (extra or not has_loader_key):
                continue  # the quick suite runs no GPU case; data.loader comes with the loader
            overrides = input_pipeline._merge(
                trainer["common"], case["overrides"], extra, [f"data.root={tmp_path}"]
            )
            cfg = compose_config([*overrides, "logger=none"])
            assert cfg.data.name == "imagenet", case["name"]
            if not case.get("gpu"):
                run = validate(cfg)
                assert run.data.kwargs["root"] == str(tmp_path), case["name"]


def test_uint8_hand_over_normalised_equals_the_old_float_transform(tmp_path: Path) -> None:
    """Where no reduced decoding applies (PNGs; JPEGs whose crops are under twice the output),
    the new uint8 image normalised with the dataset's ``normalization`` is the old float output."""
    from PIL import Image

    from secondorder.data import imagenet
    from secondorder.data.generate_imagenet import generate

    root = generate(tmp_path, classes=1, train_per_class=2, val_per_class=2, seed=3)
    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        pixels = torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8, generator=rng).numpy()
        Image.fromarray(pixels).save(root / split / "n00000000" / "noise.png")
    size, resize = 224, 256  # generated photographs are under 448 px: full-scale decoding
    bundle = imagenet(root=str(root), image_size=size, eval_resize=resize)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in bundle.train.normalization)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - mean) / std

    for i in range(len(bundle.train)):
        for seed in range(3):
            torch.manual_seed(seed)
            old = input_pipeline.baseline_train(bundle.train.path(i), size)
            new, _ = bundle.train.sample(i, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(normalised(new), old, atol=1e-5, rtol=0)
    for i in range(len(bundle.eval)):
        old = input_pipeline.baseline_eval(bundle.eval.path(i), size, resize)
        torch.testing.assert_close(normalised(bundle.eval[i][0]), old, atol=1e-5, rtol=0)
