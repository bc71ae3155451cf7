"""The parallel-efficiency tool: the alpha-beta model against hand-written formulas, the readers of
a run's files, and one measured 1-vs-2-rank run whose counted bytes are checked exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secondorder.scaling.cli import main
from secondorder.scaling.cost_model import Network, comm_seconds, project
from secondorder.scaling.measure import efficiency, launch_command
from secondorder.scaling.project import amortized
from secondorder.scaling.readers import step_seconds, step_traffic

NET = Network(bus_bw_intra=100e9, bus_bw_inter=10e9, alpha_intra=2e-6, alpha_inter=8e-6)


def _traffic(**kinds: tuple[float, float]) -> dict:
    return {k: {"bytes": b, "calls": c} for k, (b, c) in kinds.items()}


def test_ring_all_reduce_time_matches_the_formula() -> None:
    traffic = _traffic(all_reduce=(4e8, 3))
    # N = 8 fits a node: 2 (N-1)/N * B / bw + 2 (N-1) alpha per call.
    assert comm_seconds(traffic, 8, NET) == pytest.approx(2 * 7 / 8 * 4e8 / 100e9 + 3 * 14 * 2e-6)
    # N = 32 crosses nodes: the inter-node link and latency.
    assert comm_seconds(traffic, 32, NET) == pytest.approx(2 * 31 / 32 * 4e8 / 10e9 + 3 * 62 * 8e-6)
    assert comm_seconds(traffic, 1, NET) == 0.0


def test_broadcast_and_all_gather_times_match_their_formulas() -> None:
    traffic = _traffic(broadcast=(1e8, 2), all_gather=(1e6, 1))
    expected = (1e8 / 100e9 + 2 * 3 * 2e-6) + (3 * 1e6 / 100e9 + 3 * 2e-6)
    assert comm_seconds(traffic, 4, NET) == pytest.approx(expected)


def test_projection_efficiency_and_overlap() -> None:
    traffic = _traffic(all_reduce=(1e9, 1))
    t8 = 2 * 7 / 8 * 1e9 / 100e9 + 14 * 2e-6
    (row,) = project(compute_s=0.09, optimizer_s=0.01, traffic=traffic, net=NET, sizes=(8,))
    assert row["comm_s"] == pytest.approx(t8)
    assert row["efficiency"] == pytest.approx(0.1 / (0.1 + t8))
    # Overlap hides communication behind backward (2/3 of compute), never below zero.
    (row,) = project(
        compute_s=0.09, optimizer_s=0.0, traffic=traffic, net=NET, sizes=(8,), overlap=0.1
    )
    assert row["exposed_comm_s"] == pytest.approx(t8 - 0.1 * 2 / 3 * 0.09)
    (row,) = project(
        compute_s=0.09, optimizer_s=0.0, traffic=traffic, net=NET, sizes=(8,), overlap=1
    )
    assert row["exposed_comm_s"] == 0.0 and row["efficiency"] == 1.0
    with pytest.raises(ValueError, match="overlap"):
        project(compute_s=1.0, optimizer_s=0.0, traffic=traffic, net=NET, overlap=1.5)
    with pytest.raises(ValueError, match="bus_bw_intra"):
        Network(bus_bw_intra=0)


def test_projection_with_a_measured_hidden_fraction() -> None:
    traffic = _traffic(all_reduce=(1e9, 1))
    t8 = 2 * 7 / 8 * 1e9 / 100e9 + 14 * 2e-6  # 17.528 ms
    (row,) = project(
        compute_s=0.09, optimizer_s=0.0, traffic=traffic, net=NET, sizes=(8,), hidden_fraction=0.6
    )
    assert row["exposed_comm_s"] == pytest.approx(0.4 * t8)
    # Never more hidden than backward lasts (2/3 of 9 ms = 6 ms here).
    (row,) = project(
        compute_s=0.009, optimizer_s=0.0, traffic=traffic, net=NET, sizes=(8,), hidden_fraction=1
    )
    assert row["exposed_comm_s"] == pytest.approx(t8 - 0.006)
    with pytest.raises(ValueError, match="hidden_fraction"):
        project(compute_s=1.0, optimizer_s=0.0, traffic=traffic, net=NET, hidden_fraction=-0.1)


def test_project_reads_the_hidden_fraction_from_the_overlap_results(tmp_path: Path) -> None:
    source = tmp_path / "m.json"
    source.write_text(json.dumps({"counted": {"traffic": _traffic(all_reduce=(1e8, 1))}}))
    overlap = tmp_path / "results.json"
    overlap.write_text(json.dumps({"suite": "overlap", "hidden_fraction": 0.75}))
    args = ["--name", "p", "--out", str(tmp_path), "--traffic", str(source), "--compute-s", "0.1"]
    result = main(["project", *args, "--sizes", "8", "--hidden-from", str(overlap)])
    t8 = 2 * 7 / 8 * 1e8 / 370e9 + 14 * 5e-6
    assert result["projection"]["hidden_fraction"] == 0.75
    assert result["projection"]["rows"][0]["exposed_comm_s"] == pytest.approx(0.25 * t8)
    assert "hidden by overlap 0.75" in (tmp_path / "p.md").read_text()
    overlap.write_text(json.dumps({"suite": "overlap"}))
    with pytest.raises(SystemExit, match="no measured hidden_fraction"):
        main(["project", *args, "--hidden-from", str(overlap)])
    with pytest.raises(SystemExit, match="not both"):
        main(["project", *args, "--hidden-from", str(overlap), "--hidden-fraction", "0.5"])


def test_weak_and_strong_efficiency() -> None:
    weak = [
        {"world_size": 1, "throughput": 100.0, "step_s": 1.0},
        {"world_size": 4, "throughput": 320.0, "step_s": 1.25},
    ]
    efficiency(weak, "weak")
    assert weak[1]["efficiency"] == pytest.approx(320 / (4 * 100))
    strong = [
        {"world_size": 1, "throughput": 100.0, "step_s": 1.0},
        {"world_size": 4, "throughput": 320.0, "step_s": 0.3125},
    ]
    efficiency(strong, "strong")
    assert strong[1]["efficiency"] == pytest.approx(1.0 / (4 * 0.3125))


def test_readers_use_the_steady_window(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "lr": 0.1, "elapsed_s": 10.0 + 0.5 * s} for s in (2, 4, 6, 8)]
    lines.insert(2, {"step": 4, "eval_loss": 1.0, "elapsed_s": 99.0})  # evaluations are ignored
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert step_seconds(metrics, warmup_steps=3) == (pytest.approx(0.5), 4)
    with pytest.raises(ValueError, match="two logged steps"):
        step_seconds(metrics, warmup_steps=7)

    def interval(nbytes: float, seconds: float) -> dict:
        empty = {"bytes": 0, "calls": 0, "seconds": 0.0}
        return {
            "all_reduce": {"bytes": nbytes, "calls": 2, "seconds": seconds},
            "broadcast": dict(empty),
            "all_gather": dict(empty),
            "object": dict(empty),
        }

    for rank, scale in ((0, 1.0), (1, 3.0)):
        stats = {"intervals": [interval(999, 9.0), interval(100, scale), interval(300, scale)]}
        stats["intervals"].append(interval(5000, 50.0))  # the closing evaluation: left out
        (tmp_path / f"comm_stats.rank{rank}.json").write_text(json.dumps(stats))
    got = step_traffic(tmp_path, 2, warmup_steps=1)
    assert got["bytes_per_step"] == 200 and got["traffic"]["all_reduce"]["calls"] == 2
    assert got["comm_s"] == pytest.approx(2.0)  # mean over ranks 1.0 and 3.0


def test_periodic_traffic_is_amortized_over_its_period() -> None:
    baseline = _traffic(all_reduce=(1000, 2), broadcast=(0, 0))
    counted = _traffic(all_reduce=(6000, 12), broadcast=(900, 3))
    got = amortized(counted, baseline, {"all_reduce": 10, "broadcast": 100})
    assert got["all_reduce"] == {"bytes": 1000 + 5000 / 10, "calls": 2 + 10 / 10}
    assert got["broadcast"] == {"bytes": 900 / 100, "calls": 3 / 100}


def test_launch_commands_use_the_entry_point() -> None:
    torch_cmd = launch_command("torch", 2, ["optimizer=kfac"])
    assert torch_cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert torch_cmd[-3:] == ["secondorder.train", "distributed=torch", "optimizer=kfac"]
    hvd_cmd = launch_command("horovod", 4, ["optimizer=kfac"])
    assert hvd_cmd[1:6] == ["--gloo", "-np", "4", "-H", "localhost:4"]
    assert hvd_cmd[-2:] == ["distributed=horovod", "optimizer=kfac"]


def test_project_from_a_measured_result(tmp_path: Path) -> None:
    measured = {
        "rows": [
            {"world_size": 1, "traffic": _traffic(all_reduce=(0, 0)), "bytes_per_step": 0},
            {"world_size": 2, "traffic": _traffic(all_reduce=(1e8, 1)), "bytes_per_step": 1e8},
        ]
    }
    source = tmp_path / "m.json"
    source.write_text(json.dumps(measured))
    args = ["--name", "p", "--out", str(tmp_path), "--traffic", str(source), "--compute-s", "0.1"]
    argv = ["project", *args, "--sizes", "8,16", "--assumption", "test input"]
    result = main(argv)
    assert result["command"] == "python -m secondorder.scaling " + " ".join(argv)
    eff8 = 0.1 / (0.1 + 2 * 7 / 8 * 1e8 / 370e9 + 14 * 5e-6)
    assert result["projection"]["rows"][0]["efficiency"] == pytest.approx(eff8)
    text = (tmp_path / "p.md").read_text()
    assert "test input" in text and "| 16 |" in text
    png = (tmp_path / "p.png").read_bytes()
    assert len(png) > 0
    # `report` rebuilds the table and the plot from the JSON alone.
    (tmp_path / "p.md").unlink()
    (tmp_path / "p.png").unlink()
    main(["report", str(tmp_path / "p.json")])
    assert (tmp_path / "p.md").read_text() == text
    assert (tmp_path / "p.png").read_bytes() == png
    with pytest.raises(SystemExit, match="not a result"):
        main(["report", str(source)])


def test_missing_matplotlib_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from secondorder.scaling.report import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit, match=r"pip install 'secondorder\[plots\]'") as error:
        pyplot()
    assert "\n" not in str(error.value.code)


@pytest.mark.slow
def test_measure_one_and_two_ranks_counts_exact_bytes(tmp_path: Path, data_root: Path) -> None:
    from secondorder.models import build_model

    runs = ["--name", "cnn", "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    steps = ["--steps", "12", "--log-every", "2", "--warmup", "2", "--compute-repeats", "3"]
    shape = ["--world-sizes", "1,2", "--batch-per-rank", "32", "--threads", "1"]
    overrides = ["model=cnn1d", "optimizer=sgd", f"data.root={data_root}"]
    data = ["data.num_samples=1200", "data.progress=false"]
    result = main(["measure", *runs, *steps, *shape, "--", *overrides, *data])
    one, two = result["rows"]
    assert (one["world_size"], one["global_batch"], two["global_batch"]) == (1, 32, 64)
    assert one["bytes_per_step"] == 0 and one["efficiency"] == 1.0
    # Steps 3..11 are timed for traffic (warm-up 2, the last step holds the closing eval): each
    # all-reduces every float32 gradient and the loss, and the trainer's 4-byte stop flag.
    grad_bytes = 4 * sum(p.numel() for p in build_model("cnn1d").parameters())
    expected = grad_bytes + 4 + 4
    assert two["traffic"]["all_reduce"]["bytes"] == pytest.approx(expected, rel=1e-12)
    assert two["traffic"]["all_reduce"]["calls"] == pytest.approx(3)
    assert two["traffic"]["broadcast"]["bytes"] == 0
    assert two["step_s"] > 0 and two["comm_s"] > 0 and two["compute_s"] > 0
    assert 0 < two["efficiency"] < 2
    assert [r["world_size"] for r in result["projection"]["rows"]][:2] == [8, 16]
    assert (tmp_path / "cnn.png").stat().st_size > 0
    assert "| 2 | 64 |" in (tmp_path / "cnn.md").read_text()
