"""The benchmark harness end to end on tiny versions of the suites: runs through the real
trainer, aggregation, the README table and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.harness import Suite, better, grid_overrides, merge_overrides
from benchmarks.report import scaling_efficiency
from benchmarks.run import SUITES, main


def test_suites_have_equal_tuning_budgets() -> None:
    for path in SUITES.glob("*.yaml"):
        if "kind:" in path.read_text():
            continue
        suite = Suite.load(path)
        tuned = [o for o in suite.optimizers if o.grid]
        assert len({len(o.trials()) for o in tuned}) == 1, path.name
        assert all(len(o.trials()) == 1 for o in suite.optimizers if not o.grid), path.name
        assert len(suite.seeds) >= 3, path.name


def test_selection_prefers_reached_targets_then_fewer_steps() -> None:
    missed = {"steps_to_target": None, "wall_s": 1.0, "status": "completed"}
    slow = {"steps_to_target": 40, "wall_s": 5.0, "status": "target_reached"}
    fast = {"steps_to_target": 20, "wall_s": 9.0, "status": "target_reached"}
    assert better(slow, missed, "steps_to_target")
    assert better(fast, slow, "steps_to_target")
    assert not better(missed, fast, "steps_to_target")
    # Both missed: the run that ended closer to the target wins, whatever its wall time.
    target = {"metric": "eval_accuracy", "value": 0.9}
    close = {"status": "completed", "target": target, "final_eval_accuracy": 0.85, "wall_s": 9.0}
    far = {"status": "completed", "target": target, "final_eval_accuracy": 0.5, "wall_s": 1.0}
    assert better(close, far, "steps_to_target") and not better(far, close, "steps_to_target")
    loss_target = {"metric": "eval_loss", "value": 0.18}
    low = {"status": "completed", "target": loss_target, "final_eval_loss": 0.2, "wall_s": 9.0}
    high = {"status": "completed", "target": loss_target, "final_eval_loss": 0.3, "wall_s": 1.0}
    assert better(low, high, "steps_to_target")
    assert better(high, {**low, "status": "diverged"}, "steps_to_target")
    assert grid_overrides([{"optimizer.lr": 0.1}, {"optimizer.lr": 1.0}]) == [
        "optimizer.lr=0.1,1.0"
    ]


def test_point_overrides_replace_base_keys() -> None:
    assert merge_overrides(["a=1", "b=2", "a=3"]) == ["a=3", "b=2"]
    assert merge_overrides(["a=1", "b=2"]) == ["a=1", "b=2"]  # unchanged: same command text
    suite = Suite.load(SUITES / "batch_scaling.yaml")
    assert suite.point_overrides["32768"] == ["trainer.max_steps=200"]


def test_scaling_efficiency_rows() -> None:
    steps = {256: 800, 1024: 200, 4096: 100, 16384: None}
    rows = [
        {"optimizer": "sgd", "point": {"data.batch_size": b}, "steps": [s]}
        for b, s in steps.items()
    ]
    table = scaling_efficiency(rows, "data.batch_size")
    assert "| sgd | 256 | 1024 | 800 -> 200 | 100% |" in table  # 4x fewer steps at 4x batch
    assert "| sgd | 1024 | 4096 | 200 -> 100 | 50% |" in table
    assert "| sgd | 4096 | 16384 | 100 -> None | target missed |" in table
    assert "| sgd | 256 | 16384 |" in table and "| sgd | 1024 | 16384 |" in table  # to the largest
    assert table.count("| sgd |") == 5


@pytest.mark.slow
def test_quick_time_to_target_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("SECONDORDER_DATA", str(data_root))
    assert main(["time_to_target", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    optimizers = results["points"][0]["optimizers"]
    assert list(optimizers) == ["sgd", "adamw"]
    for entry in optimizers.values():
        assert len(entry["trials"]) == 2 and entry["seeds"]
        assert all(Path(t["run_dir"], "summary.json").is_file() for t in entry["trials"])
    readme = (tmp_path / "README.md").read_text()
    assert "| sgd |" in readme and "| adamw |" in readme and "Machine:" in readme
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # Run again: every sweep is kept (same command, all summaries there), nothing re-trains.
    summaries = sorted(tmp_path.glob("runs/**/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    assert main(["time_to_target", "--quick", "--out", str(tmp_path)]) == 0
    assert "running:" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert json.loads((tmp_path / "results.json").read_text())["points"] == results["points"]
    # Every run keeps its curve: without the run folders the report is the same.
    assert all(len(t["curve"]["step"]) >= 2 for e in optimizers.values() for t in e["trials"])
    readme = (tmp_path / "README.md").read_text()
    (tmp_path / "runs").rename(tmp_path.parent / f"{tmp_path.name}-runs")
    assert main(["time_to_target", "--quick", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "README.md").read_text() == readme
    assert json.loads((tmp_path / "results.json").read_text()) == results
    (tmp_path.parent / f"{tmp_path.name}-runs").rename(tmp_path / "runs")
    # --report-only runs nothing and leaves out an unfinished sweep.
    next(tmp_path.glob("runs/main/adamw/tune/0/summary.json")).unlink()
    assert main(["time_to_target", "--quick", "--out", str(tmp_path), "--report-only"]) == 0
    assert "running:" not in capsys.readouterr().out
    partial = json.loads((tmp_path / "results.json").read_text())
    assert list(partial["points"][0]["optimizers"]) == ["sgd"]
    assert not (tmp_path / "runs/main/adamw/tune/0/summary.json").exists()


@pytest.mark.slow
def test_sigterm_of_the_harness_stops_its_sweep(tmp_path: Path, data_root: Path) -> None:
    """SIGTERM of a harness that is running a sweep stops the sweep with it (the trial
    checkpoints, the next one never starts) instead of orphaning the trainer."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    data = ["data=mnist1d", f"data.root={data_root}", "data.num_samples=1200", "data.batch_size=64"]
    trainer = ["trainer.max_steps=100000", "trainer.eval_every=0", "trainer.log_every=1"]
    overrides = ["model=cnn1d", *data, *trainer, "trainer.threads=1", "optimizer.lr=0.01,0.02"]
    script = textwrap.dedent(f"""
        from pathlib import Path
        from benchmarks.harness import multirun, stop_on_sigterm
        stop_on_sigterm()
        multirun({overrides!r}, Path({str(tmp_path / "sweep")!r}), jobs=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    metrics = tmp_path / "sweep" / "0" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the harness ended early"
            time.sleep(0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        trainers = [int(p) for p in children.read_text().split()]
        assert len(trainers) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not Path(f"/proc/{trainers[0]}").exists(), "the sweep outlived its harness"
    summary = json.loads((tmp_path / "sweep" / "0" / "summary.json").read_text())
    assert summary["stop_signal"] == signal.SIGTERM
    assert not (tmp_path / "sweep" / "1").exists()


def test_samples_and_gradient_equivalents(tmp_path: Path) -> None:
    from benchmarks.report import step_costs, summarize, table

    seed = {"wall_to_target_s": 1.0, "final_eval_accuracy": 0.9, "final_eval_loss": 0.3}
    seed |= {"global_batch_size": 4096, "run_dir": "r"}

    def entry(cost: str, *steps: int | None) -> dict:
        seeds = [{**seed, "steps_to_target": n} for n in steps]
        return {"trials": [{}], "best": {}, "cost": cost, "seeds": seeds}

    optimizers = {"cg": entry("m/cg", 30, 40, 20), "sgd": entry("m/absent", 240)}
    optimizers["missed"] = entry("m/cg", None)
    results = {"points": [{"point": {}, "optimizers": optimizers}]}
    cg, sgd, missed = summarize(results, costs={"m/cg": 12.5})
    assert cg["samples"] == (30 * 4096, 20 * 4096, 40 * 4096)
    assert cg["gradients"] == (375.0, 250.0, 500.0)
    assert sgd["gradients"] == (None, None, None) and sgd["cost_ratio"] is None
    assert missed["gradients"] == (None, None, None)
    rows = table([cg, sgd, missed]).splitlines()
    assert "| 375 [250-500] (12.50 per step) |" in rows[2] and "| - |" in rows[3]
    # The ratios come from the step-cost suite's results file, by "<case>/<label>".
    ratios = {"sgd": {"ratio_vs_baseline": 1.0}, "cg": {"ratio_vs_baseline": 12.5}}
    (tmp_path / "results.json").write_text(json.dumps([{"case": "m", "optimizers": ratios}]))
    assert step_costs(tmp_path / "results.json") == {"m/sgd": 1.0, "m/cg": 12.5}
    assert step_costs(tmp_path / "absent.json") == {}


def test_steps_cell_names_the_seeds_that_reached() -> None:
    """A point where some seeds miss stays "not reached" (the median counts the misses) but
    says which seeds did reach, and in how many steps."""
    from benchmarks.report import summarize, table

    seed = {"wall_to_target_s": 1.0, "final_eval_accuracy": 0.9, "final_eval_loss": 0.3}
    seed |= {"global_batch_size": 256, "run_dir": "r"}
    per_seed = {"some": (290, None, None), "none": (None, None, None), "all": (60, 70, 60)}
    optimizers = {
        name: {
            "trials": [{}],
            "best": {},
            "cost": None,
            "seeds": [{**seed, "steps_to_target": n} for n in steps],
        }
        for name, steps in per_seed.items()
    }
    results = {"points": [{"point": {}, "optimizers": optimizers}]}
    some, none, every = summarize(results, costs={})
    assert some["steps"] == (None, None, None)
    rows = table([some, none, every]).splitlines()
    assert "| not reached (1 of 3 seeds did: 290) |" in rows[2]
    assert "| not reached |" in rows[3] and "seeds did" not in rows[3]
    assert "| 60 [60-70] |" in rows[4]


def test_report_only_mixes_seed_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimizer whose seeds ran is reported over them; one whose seeds never ran, with its
    best tuning run alone; one whose grid did not finish is left out. One without a run folder
    here keeps its entry of the existing results.json (run folders are not committed), and a
    report from that file alone keeps its command."""
    import shutil

    import benchmarks.harness as harness

    finished = {("a", "tune"), ("a", "seeds"), ("b", "tune")}
    ran: list[bool] = []

    def fake_multirun(overrides, sweep_dir: Path, *, jobs: int, run: bool = True) -> bool:
        ran.append(run)
        return (sweep_dir.parent.name, sweep_dir.name) in finished

    def fake_collect(sweep_dir: Path) -> list[dict]:
        n = 3 if sweep_dir.name == "seeds" else 2
        reached = {"status": "target_reached"}
        return [
            {**reached, "steps_to_target": 10 * (i + 1), "run_dir": f"{sweep_dir}/{i}"}
            for i in range(n)
        ]

    monkeypatch.setattr(harness, "multirun", fake_multirun)
    monkeypatch.setattr(harness, "collect", fake_collect)
    monkeypatch.setattr(harness, "_trial_of", lambda best, trials: trials[0])
    monkeypatch.setattr(harness, "_slim", lambda row, metric: row)
    for name in "abc":  # run folders of a, b and c are here, d has none
        (tmp_path / "runs" / "main" / name / "tune").mkdir(parents=True)
    recorded = {"trials": [{}], "best": {}, "seeds": [{"steps_to_target": 5}], "cost": None}
    earlier = {"suite": "s", "quick": False, "command": "earlier", "machine": "earlier machine"}
    earlier["points"] = [{"point": {}, "optimizers": {"c": recorded, "d": recorded}}]
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    entries = [harness.OptimizerEntry(n, [], {"optimizer.lr": [0.1, 0.3]}) for n in "abcd"]
    suite = Suite("s", "", [], entries, "steps_to_target", [0, 1, 2])
    results = harness.run_suite(suite, tmp_path, report_only=True, command="now")
    optimizers = results["points"][0]["optimizers"]
    assert list(optimizers) == ["a", "b", "d"]  # c's grid is running again here: left out
    assert len(optimizers["a"]["seeds"]) == 3 and optimizers["a"]["seeds"][0]["run_dir"].endswith(
        "a/seeds/0"
    )
    assert [r["run_dir"] for r in optimizers["b"]["seeds"]] == [f"{tmp_path}/runs/main/b/tune/0"]
    assert optimizers["d"] == recorded
    assert results["command"] == "now" and results["machine"] != "earlier machine"
    assert not any(ran)  # report only: nothing was started
    # Without run folders the report comes from results.json alone, command and machine too.
    shutil.rmtree(tmp_path / "runs")
    again = harness.run_suite(suite, tmp_path, report_only=True, command="later")
    assert again == results == json.loads((tmp_path / "results.json").read_text())
    # A run of some optimizers keeps what results.json records of the others.
    only_c = harness.run_suite(suite, tmp_path, only={"c"}, command="c alone")
    assert ran[-1] and list(only_c["points"][0]["optimizers"]) == ["a", "b", "d"]


@pytest.mark.slow
def test_quick_step_cost_suite(tmp_path: Path) -> None:
    assert main(["step_cost", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    case = results[0]["optimizers"]
    assert case["sgd"]["ratio_vs_baseline"] == 1.0
    assert all(r["step_s"] > 0 and r["forward_backward_s"] > 0 for r in case.values())
    assert (tmp_path / "step_cost.png").stat().st_size > 1000
    # A case measured earlier by another command and not repeated now is kept, with its command.
    earlier = {**results[0], "case": "cnn1d", "command": "an earlier command"}
    (tmp_path / "results.json").write_text(json.dumps([earlier]))
    assert main(["step_cost", "--quick", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert [r["case"] for r in merged] == ["convnet", "cnn1d"]  # the suite's order
    assert merged[1]["command"] == "an earlier command"
    readme = (tmp_path / "README.md").read_text()
    assert "`an earlier command`" in readme
    # --report-only measures nothing: the same report from results.json.
    assert main(["step_cost", "--quick", "--report-only", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == merged
    assert (tmp_path / "README.md").read_text() == readme


def test_cost_suites_compose_for_every_case() -> None:
    """Every optimizer of every case of the cost suites (the GPU suite included, which cannot run
    here) composes into a valid trainer config, so a typo does not wait for a GPU to show."""
    import yaml

    from benchmarks.step_cost import compose_run

    for suite in ("step_cost", "gpu"):
        spec = yaml.safe_load((SUITES / f"{suite}.yaml").read_text())
        for case in spec["cases"]:
            labels = [o["label"] for o in case["optimizers"]]
            assert labels[0] == "sgd" and len(set(labels)) == len(labels), case["name"]
            for optimizer in case["optimizers"]:
                run = compose_run(case, optimizer)
                assert run.model.name == case["model"], (case["name"], optimizer["label"])
                # kfac_eigen and kfac_inverse are presets of kfac
                preset = optimizer["name"]
                expected = "kfac" if preset.startswith("kfac") else preset
                assert run.optimizer.name == expected, (case["name"], optimizer["label"])
                if preset.startswith("kfac_"):
                    method = preset.removeprefix("kfac_")
                    assert run.optimizer.kwargs["inverse_method"] == method, case["name"]
                if any(o.startswith("workers=") for o in optimizer.get("overrides", [])):
                    assert run.workers.mode == "async", (case["name"], optimizer["label"])
    gpu = {c["name"]: c for c in yaml.safe_load((SUITES / "gpu.yaml").read_text())["cases"]}
    assert gpu["resnet50_b256"]["batch_size"] == 256


def test_gpu_step_case_composes_the_goals_configurations() -> None:
    """The case the GPU goals are about: ResNet-50 at batch 256 with the GPU step settings, SGD
    (plain and compiled), K-FAC f10 with asynchronous inversion workers, synchronous K-FAC
    f10/i100 and Newton-CG, each a valid trainer config (composed here, on CPU)."""
    import torch
    import yaml

    from benchmarks.step_cost import _autocast, compose_run

    cases = {c["name"]: c for c in yaml.safe_load((SUITES / "gpu.yaml").read_text())["cases"]}
    case = cases["resnet50_gpu_step"]
    assert (case["model"], case["batch_size"], case["input_shape"]) == (
        "resnet50",
        256,
        [3, 224, 224],
    )
    runs = {o["label"]: compose_run(case, o) for o in case["optimizers"]}
    assert list(runs) == [
        "sgd",
        "sgd compiled",
        "kfac f10 async inverses (workers)",
        "kfac f10 i100",
        "newton_cg",
    ]
    assert all(r.trainer.precision == "auto" and r.trainer.cudnn_benchmark for r in runs.values())
    assert runs["sgd compiled"].trainer.compile and not runs["sgd"].trainer.compile
    asynchronous = runs["kfac f10 async inverses (workers)"]
    assert asynchronous.workers.mode == "async" and asynchronous.workers.inversion.num_processes
    assert asynchronous.optimizer.kwargs["factor_update_every"] == 10
    synchronous = runs["kfac f10 i100"].optimizer.kwargs
    assert (synchronous["factor_update_every"], synchronous["inverse_update_every"]) == (10, 100)
    assert runs["kfac f10 i100"].workers.mode == "none"
    assert runs["newton_cg"].optimizer.name == "newton_cg"
    # precision auto: float32 on CPU, bf16 autocast on CUDA
    assert _autocast(runs["sgd"], torch.device("cpu")) is None
    bf16 = compose_run({**case, "overrides": ["trainer.precision=bf16"]}, case["optimizers"][0])
    with _autocast(bf16, torch.device("cpu"))():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_gpu_suite_skips_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu suite runs for real here")
    assert main(["gpu", "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.mark.parametrize("suite", sorted(p.stem for p in SUITES.glob("*.yaml")))
def test_committed_report_rebuilds_from_results_alone(
    suite: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The committed results of every suite rebuild its committed tables and plots with no run
    folder: README up to the hand-written notes (the scaling suite: every <name>.md) equal to
    the committed one, and every committed plot drawn again at the same size."""
    from benchmarks.report import NOTES

    committed = RESULTS / suite
    results = sorted(committed.glob("*.json"))
    assert results, f"{suite}: no committed results"
    for path in results:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert main([suite, "--report-only", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    if suite == "scaling":
        tables = [p.with_suffix(".md").name for p in results if "probe" not in p.name]
    else:
        tables = ["README.md"]
    for name in tables:
        rebuilt = (tmp_path / name).read_text().split(NOTES)[0]
        assert rebuilt == (committed / name).read_text().split(NOTES)[0], name
    for png in committed.glob("*.png"):
        assert _png_size(tmp_path / png.name) == _png_size(png), png.name
    assert not list(tmp_path.glob("runs"))


def test_readme_keeps_the_notes_below_the_generated_report(tmp_path: Path) -> None:
    from benchmarks.report import NOTES, write_readme

    write_readme(tmp_path, "# Report\n\n| a |\n")
    text = (tmp_path / "README.md").read_text()
    assert text == f"# Report\n\n| a |\n\n{NOTES}\n"
    (tmp_path / "README.md").write_text(text + "\n## Findings\n\nwritten by hand\n")
    write_readme(tmp_path, "# Report\n\n| b |")
    assert (tmp_path / "README.md").read_text() == (
        f"# Report\n\n| b |\n\n{NOTES}\n\n## Findings\n\nwritten by hand\n"
    )


def test_results_keep_number_lists_on_one_line(tmp_path: Path) -> None:
    from benchmarks.records import write_json

    data = {"curve": {"step": [10, 20], "loss": [0.5, -1e-05, float("nan")]}, "names": ["a"]}
    write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert '"step": [10, 20]' in text and '"loss": [0.5, -1e-05, NaN]' in text
    assert '"names": [\n' in text  # only lists of numbers are folded
    loaded = json.loads(text)
    assert loaded["curve"]["step"] == [10, 20] and loaded["names"] == ["a"]


def test_repository_tracks_no_run_folders() -> None:
    import shutil
    import subprocess

    root = RESULTS.parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "benchmarks/results"], cwd=root, capture_output=True, text=True
    ).stdout.split()
    assert tracked
    runs = [f for f in tracked if "/runs/" in f or "/probes/" in f or f.endswith((".py", ".sh"))]
    assert not runs, runs[:5]


def test_results_json_keeps_number_lists_inside_strings(tmp_path: Path) -> None:
    """``write_json`` puts number lists on one line but leaves strings as they were written: an
    override ``data.shape=[3,32,32]`` stays that, so a rebuilt report names the command run."""
    from benchmarks.records import write_json

    data = {"curve": [1, 2.5, -3e-05], "overrides": ["data.shape=[3,32,32]"], "empty": []}
    write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == data
    assert '"curve": [1, 2.5, -3e-05]' in text and '"data.shape=[3,32,32]"' in text
