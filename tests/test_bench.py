"""`llmkern bench` on small stand-in benchmarks: discovery (TORCHRUN_NPROC read without importing),
torchrun at each rank count, results in the harness's schema, the summary, --compare, failures and
time limits. The real benchmarks in --quick form are run by tests/test_bench_smoke.py."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from llmkern import bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import _harness as harness  # noqa: E402

# A stand-in benchmark: one row, one timed ratio whose rounds are given on the command line.
FAKE = '''
import argparse, os, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import Ratio, environment, write_results
{decl}
ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true")
args = ap.parse_args()
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
rounds = [float(v) for v in os.environ.get("FAKE_ROUNDS", "1.1,1.2,1.3").split(",")]
if rank == 0:
    write_results(f"fake_w{{world}}", [{{"op": "fake", "candidate": "llmkern", "median_ms": 1.0, "world": world,
                                        "quick": args.quick}}], environment(quick=args.quick),
                  [Ratio.from_rounds("speed-up over peer", rounds, peer="peer", goal=1.25),
                   Ratio(name="bytes / peer's", value=0.5, peer="peer", goal=0.5, higher_is_better=False)])
print("fake bench done on rank", rank)
'''


def make_bench_dir(tmp_path: Path, scripts: dict[str, str]) -> Path:
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(ROOT / "bench" / "_harness.py", d / "_harness.py")
    for rel, text in scripts.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(textwrap.dedent(text))
    return d


def test_declarations_are_read_without_importing(tmp_path):
    ok = tmp_path / "bench_ok.py"
    ok.write_text("raise SystemExit('imported!')\nTORCHRUN_NPROC = (2, 4)\nX = '--quick'\nTAKES_DEVICE = True\n")
    assert bench.declarations(ok) == ((2, 4), True, True)
    plain = tmp_path / "bench_plain.py"
    plain.write_text("import sys\n")
    assert bench.declarations(plain) == (None, False, False)
    for bad in ("[2, 4]", "(0,)", "()", "(2.0,)", "N"):
        f = tmp_path / "bench_bad.py"
        f.write_text(f"N = 2\nTORCHRUN_NPROC = {bad}\n")
        with pytest.raises(ValueError, match="bench_bad.py: TORCHRUN_NPROC must be a literal tuple"):
            bench.declarations(f)


def test_every_real_bench_script_is_discovered():
    jobs = bench.discover(ROOT / "bench", bench.SUITES)
    names = {j.name for j in jobs}
    for script in (ROOT / "bench").glob("*/bench_*.py"):
        nproc, _, _ = bench.declarations(script)
        expected = [f"{script.parent.name}/{script.stem}" + (f" x{n}" if n else "") for n in (nproc or (None,))]
        assert set(expected) <= names
    # the distributed benches run under torchrun at 2 and 4 ranks
    assert {"parallel/bench_ring_all_reduce x2", "parallel/bench_ring_all_reduce x4"} <= names
    assert all(j.nproc is None for j in jobs if j.suite != "parallel")


def test_ratio_goal_and_spread():
    r = harness.Ratio.from_rounds("x", [1.3, 1.1, 1.2], peer="p", goal=1.25)
    assert (r.value, r.lo, r.hi, r.met) == (1.2, 1.1, 1.3, False)
    assert harness.Ratio(name="y", value=0.4, peer="p", goal=0.5, higher_is_better=False).met is True
    assert harness.Ratio(name="z", value=3.0, peer="p").met is None
    assert harness.Ratio.from_dict(r.to_dict()) == r


def test_write_results_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKERN_BENCH_RESULTS", str(tmp_path))
    env = harness.environment(contention=0.1, note="n")
    rows = [{"candidate": "a", "median_ms": 2.0, "extra": 1}]
    ratios = [harness.Ratio(name="r", value=2.0, peer="b", goal=1.0)]
    csv_path, json_path = harness.write_results("t", rows, env, ratios)
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == harness.SCHEMA_VERSION and doc["name"] == "t"
    assert list(doc["rows"][0])[:len(harness.SCHEMA)] == list(harness.SCHEMA)
    assert doc["ratios"] == [ratios[0].to_dict()]
    for key in ("model", "vendor", "isa", "cores", "torch_threads"):
        assert key in doc["env"]["cpu"]
    assert {"torch", "triton", "transformers", "peft", "deepspeed"} <= set(doc["env"]["versions"])
    assert doc["env"]["versions"]["torch"]
    assert "loadavg" in doc["env"]["load_after"] and doc["env"]["contention"] == 0.1
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:len(harness.SCHEMA)] == list(harness.SCHEMA) and header[-len(harness.ENV_COLUMNS):] == list(
        harness.ENV_COLUMNS)
    ratio_header = (tmp_path / "t.ratios.csv").read_text().splitlines()[0].split(",")
    assert ratio_header == list(harness.RATIO_FIELDS) + list(harness.ENV_COLUMNS)
    with pytest.raises(ValueError, match="ratio names must be unique"):
        harness.write_results("t2", rows, env, ratios * 2)


def test_compare_flags_moves_outside_the_earlier_noise_band():
    R = harness.Ratio
    before = [("b", R(name="up", value=1.2, lo=1.1, hi=1.3, peer="p")),
              ("b", R(name="same", value=1.2, lo=1.1, hi=1.3, peer="p")),
              ("b", R(name="down", value=0.5, lo=0.45, hi=0.55, peer="p", higher_is_better=False)),
              ("b", R(name="bytes", value=0.5, peer="p", higher_is_better=False))]
    now = [("b", R(name="up", value=1.4, lo=1.35, hi=1.45, peer="p")),
           ("b", R(name="same", value=1.28, lo=1.0, hi=1.5, peer="p")),
           ("b", R(name="down", value=0.6, lo=0.58, hi=0.62, peer="p", higher_is_better=False)),
           ("b", R(name="bytes", value=0.5, peer="p", higher_is_better=False)),
           ("b", R(name="new", value=1.0, peer="p"))]
    verdicts = {k[1]: v for k, (_, v) in bench.compare(now, before).items()}
    assert verdicts == {"up": "better", "same": "within noise", "down": "worse", "bytes": "within noise"}
    now[3] = ("b", R(name="bytes", value=0.51, peer="p", higher_is_better=False))
    assert bench.compare(now, before)[("b", "bytes")][1] == "worse"


def test_runner_end_to_end_with_torchrun_and_compare(tmp_path, capsys):
    d = make_bench_dir(tmp_path, {"ops/bench_fake.py": FAKE.format(decl=""),
                                  "parallel/bench_fake_dist.py": FAKE.format(decl="TORCHRUN_NPROC = (2,)").replace(
                                      'if rank == 0:', 'import torch.distributed as dist\n'
                                      'dist.init_process_group("gloo")\ndist.barrier()\nif rank == 0:')})
    out = tmp_path / "run1"
    assert bench.main(["all", "--quick", "--bench-dir", str(d), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ok         ops/bench_fake" in text and "ok         parallel/bench_fake_dist x2" in text
    assert "4 ratios: 2 met, 2 missed" in text  # per doc: speed-up 1.2 < 1.25 missed, bytes 0.5 <= 0.5 met
    doc = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["ops/bench_fake", "parallel/bench_fake_dist x2"]
    assert all(r["rc"] == 0 for r in doc["runs"])
    by_name = {d["name"]: d for d in doc["results"]}
    assert set(by_name) == {"fake_w1", "fake_w2"}  # WORLD_SIZE=2: started under torchrun with 2 ranks
    assert by_name["fake_w1"]["rows"][0]["quick"] is True and by_name["fake_w2"]["suite"] == "parallel"
    assert doc["env"]["cpu"]["model"] and "load_before" in doc["env"] and "load_after" in doc["env"]
    assert len((out / "ratios.csv").read_text().splitlines()) == 1 + 4
    png = out / "plots" / "ratios_ops.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logs" / "parallel-bench_fake_dist-n2.log").read_text().count("fake bench done on rank") == 2

    # The same benches again, one ratio now outside the first run's 1.1..1.3 band.
    out2 = tmp_path / "run2"
    import os
    os.environ["FAKE_ROUNDS"] = "1.5,1.6,1.7"
    try:
        assert bench.main(["ops", "--quick", "--bench-dir", str(d), "--out", str(out2),
                           "--compare", str(out / "bench.json")]) == 0
    finally:
        del os.environ["FAKE_ROUNDS"]
    text = capsys.readouterr().out
    assert "2 ratios matched, 1 moved outside that run's noise band" in text
    assert "BETTER fake_w1: speed-up over peer" in text


def test_a_failing_or_hanging_bench_fails_the_run_with_its_log(tmp_path, capsys):
    d = make_bench_dir(tmp_path, {"ops/bench_boom.py": "raise RuntimeError('planted failure')\n",
                                  "ops/bench_hang.py": "import time\ntime.sleep(120)\n"})
    rc = bench.main(["ops", "--bench-dir", str(d), "--out", str(tmp_path / "o"), "--timeout", "3", "--no-plots"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "RuntimeError: planted failure" in text  # the log's tail is shown
    assert "FAILED: ops/bench_boom (exit 1)" in text and "FAILED: ops/bench_hang (timed out)" in text


def test_no_bench_folder_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["--bench-dir", str(tmp_path)]) == 2
    assert "not part of an installed package" in capsys.readouterr().err


def test_compare_refuses_a_file_that_is_not_a_results_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="neither a bench.json"):
        bench.load_previous(bad)


def test_every_real_benchmark_takes_quick():
    """`llmkern bench --quick` (make test's smoke run) must reach every script's --quick: the fused-op
    benches define it in bench/ops/_fused.py and ran at full size until they declared TAKES_QUICK."""
    missing = [j.script.name for j in bench.discover(ROOT / "bench", bench.SUITES) if not j.takes_quick]
    assert not missing, f"these benchmarks would run at full size under --quick: {missing}"
