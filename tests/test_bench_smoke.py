"""`llmkern bench all --quick`: every real benchmark runs (the distributed ones under torchrun at each of
their rank counts), writes its results in the harness's schema with the environment block, and the
run ends with the summary table, bench.json, ratios.csv and the plots. Minutes: marked slow."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmkern import bench

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import _harness as harness  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "llmkern", "bench", "all", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    return proc, out


def test_every_benchmark_ran_and_passed(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((out / "bench.json").read_text())
    expected = [j.name for j in bench.discover(ROOT / "bench", bench.SUITES)]
    assert [r["name"] for r in doc["runs"]] == expected
    assert all(r["rc"] == 0 for r in doc["runs"])
    for name in expected:  # one line per run
        assert f"ok         {name}" in proc.stdout
    # every run wrote at least one results document; the distributed ones one per rank count
    for r in doc["runs"]:
        assert r["results"], f"{r['name']} wrote no results (log: {r['log']})"
    ring = {d["name"] for d in doc["results"] if d["name"].startswith("ring_all_reduce")}
    assert ring == {"ring_all_reduce_w2", "ring_all_reduce_w4"}


def test_results_hold_the_environment(quick_run):
    _, out = quick_run
    doc = json.loads((out / "bench.json").read_text())
    assert doc["env"]["quick"] is True and doc["env"]["cpu"]["isa"] is not None
    for d in doc["results"]:
        env = d["env"]
        assert env["cpu"]["model"] and isinstance(env["cpu"]["isa"], list), d["name"]
        assert env["versions"]["torch"] and "peft" in env["versions"] and "deepspeed" in env["versions"]
        assert "loadavg" in env["load_after"] and env["timestamp"]
    # the per-benchmark CSVs carry the CPU in every line, so an Intel run can be told from an AMD run
    for path in (out / "raw").rglob("*.csv"):
        lines = list(csv.DictReader(open(path)))
        assert lines and all(line["cpu"] == doc["env"]["cpu"]["model"] for line in lines), path


def test_the_converted_benches_state_ratios_with_spreads_and_goals(quick_run):
    _, out = quick_run
    doc = json.loads((out / "bench.json").read_text())
    by_name = {d["name"]: d for d in doc["results"]}
    for name in ("lora_quick", "adapter_quick", "peft_methods_quick", "optim_fused_adamw_quick"):
        ratios = by_name[name]["ratios"]
        assert ratios, name
        assert all(list(r) == list(harness.RATIO_FIELDS) for r in ratios)
        timed = [r for r in ratios if r["lo"] is not None]
        assert timed and all(r["lo"] <= r["value"] <= r["hi"] for r in timed), name
    goals = {r["name"]: r for r in by_name["lora_quick"]["ratios"] if r["goal"] is not None}
    assert goals["fp32 p=0.05: saved bytes / PEFT's"]["goal"] == 0.5
    # llmkern keeps x and the (T, R) product where PEFT keeps dropout(x) and its mask: just over half
    assert 0.5 <= goals["fp32 p=0.05: saved bytes / PEFT's"]["value"] < 0.6
    adamw = {r["name"]: r for r in by_name["optim_fused_adamw_quick"]["ratios"]}
    assert adamw["mixed fp16 step speed-up over the torch composition"]["goal"] == 1.5


def test_summary_table_csv_and_plots(quick_run):
    proc, out = quick_run
    assert "summary: llmkern against the peers measured in the same run" in proc.stdout
    n = sum(len(d["ratios"]) for d in json.loads((out / "bench.json").read_text())["results"])
    assert f"{n} ratios:" in proc.stdout
    assert len(list(csv.DictReader(open(out / "ratios.csv")))) == n
    for png in ("ratios_ops.png", "ratios_optim.png", "ratios_peft.png", "ratios_parallel.png", "ring_bandwidth.png",
                "zero_bytes_per_stage.png", "pipeline_step_time.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
