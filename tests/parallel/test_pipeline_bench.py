"""The plumbing from bench/parallel/bench_pipeline.py to `llmkern bench`'s summary and plots, without
torchrun: the calibrated rows and Ratio of a measurement (synthetic times against the real timing
model), their round trip through bench/_harness.write_results, and the pipeline scaling plot drawn
from them. Seconds: no process group, no timing."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llmkern import bench_plots
from llmkern.parallel.pipeline import schedules as sch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import _harness as harness  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_pipeline():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "parallel" / "bench_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measurement(bench_pipeline, name: str, p: int, m: int, off: list[float], t_f=0.04, t_b=0.08, overshoot=0.0):
    """The rows and Ratio of `name` at p ranks and m micro-batches whose llmkern rounds took the
    nominal prediction x each of `off` (torch's 5 % slower than predicted)."""
    v = 2 if name == "interleaved_1f1b" else 1
    costs = sch.Costs(forward=t_f / v, backward=t_b / v, input_grad=t_b / v / 2, weight_grad=t_b / v / 2)
    schedule = sch.make_schedule(name, p, m, v)
    predicted = sch.simulate(schedule, costs).step_time
    times = {f"llmkern {name}": [predicted * f for f in off]}
    if name != "zero_bubble":
        times[f"torch {name}"] = [predicted * 1.05] * len(off)
    return bench_pipeline.calibrated_results(schedule, costs, times, t_f=t_f, t_b=t_b, overshoot=overshoot,
                                             contention=0.5), predicted


def test_calibrated_ratio_is_two_sided_and_rows_hold_the_prediction(bench_pipeline):
    rows, ratio = _measurement(bench_pipeline, "1f1b", 2, 4, [1.04, 0.97, 1.06])[0]
    assert ratio.goal == 1.1 and not ratio.higher_is_better and ratio.met
    assert ratio.value == pytest.approx(1.04) and (ratio.lo, ratio.hi) == pytest.approx((1.03, 1.06))
    # 12 % too fast misses the "within 10 %" goal as surely as 12 % too slow
    for off in ([0.88] * 3, [1.12] * 3):
        (_, slow_or_fast), _ = _measurement(bench_pipeline, "1f1b", 2, 4, off)
        assert slow_or_fast.value == pytest.approx(1.12) and slow_or_fast.met is False
    # gpipe/1f1b: the simulated prediction is the closed form (m + p - 1)(t_f + t_b)
    ours = next(r for r in rows if r["candidate"] == "llmkern 1f1b")
    assert ours["predicted_ms"] == pytest.approx((4 + 2 - 1) * 120.0)
    assert ours["closed_form_ms"] == pytest.approx(ours["predicted_ms"])
    assert ours["no_bubble_ms"] == pytest.approx(4 * 120.0)
    assert ours["ratio_vs_baseline"] == pytest.approx(1.04) and ours["within_10pct"]
    assert [r["candidate"] for r in rows] == ["llmkern 1f1b", "torch 1f1b"]
    # sleeps 1 ms late: F 41 ms, B 82 ms, so (m + p - 1) x 123 ms is the prediction the Ratio is taken
    # against; the nominal one stays in the rows for the plot
    (rows, late), _ = _measurement(bench_pipeline, "1f1b", 2, 4, [1.025] * 3, overshoot=0.001)
    assert rows[0]["realized_predicted_ms"] == pytest.approx(5 * 123.0)
    assert rows[0]["predicted_ms"] == pytest.approx(5 * 120.0)
    assert late.value == pytest.approx(1.0) and rows[0]["ratio_vs_nominal"] == pytest.approx(1.025)


def test_plot_reads_what_the_bench_writes(bench_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKERN_BENCH_RESULTS", str(tmp_path / "raw"))
    predicted = {}
    for p in (2, 4):
        rows, ratios = [], []
        for name in sch.SCHEDULES:
            for m in (4, 8, 16):
                (r, ratio), predicted[name, p, m] = _measurement(bench_pipeline, name, p, m, [1.02, 1.05, 1.03])
                rows += r
                ratios.append(ratio)
        harness.write_results(f"pipeline_w{p}", rows, {"cpu": {"model": "a test CPU", "isa": []}}, ratios)
    docs = [json.loads(f.read_text()) | {"suite": "parallel"} for f in sorted((tmp_path / "raw").glob("*.json"))]
    assert [d["name"] for d in docs] == ["pipeline_w2", "pipeline_w4"]
    assert all(r["met"] for d in docs for r in d["ratios"]) and len(docs[0]["ratios"]) == 12
    # interleaving and the zero-bubble order really predict less than 1f1b's (m + p - 1)(t_f + t_b)
    for p in (2, 4):
        assert predicted["interleaved_1f1b", p, 8] < predicted["1f1b", p, 8]
        assert predicted["zero_bubble", p, 8] < predicted["1f1b", p, 8]
    # make_plots draws it for the documents named pipeline_*
    assert bench_plots.SCALING_PLOTS["pipeline"] is bench_plots.pipeline_step_time
    png = bench_plots.pipeline_step_time(docs, tmp_path / "plots").read_bytes()
    assert png[:8] == PNG and len(png) > 20_000
    # documents without calibrated rows (a run that failed before them) draw nothing
    for d in docs:
        d["rows"] = [r for r in d["rows"] if r["op"] != "pipeline_calibrated"]
    assert bench_plots.pipeline_step_time(docs, tmp_path / "none") is None
