"""The fused-op benches with Liger-Kernel as a peer (bench/ops/_fused.py, bench/ops/bench_*.py).

On CPU: a run says, printed and in its JSON, that the Liger peer was skipped and why, and records no
ratio against it. The Liger code path of every bench (its candidate on private copies of the inputs,
its validation against eager, its ratios and peak memory) runs here too, on tiny shapes, with Liger's
kernels in the bridged Triton interpreter (tests/bench/liger_interpreter.py) standing in for the GPU.
On a GPU (``cuda`` marker): every bench runs ``--quick --device cuda`` and its JSON holds the ratios
against Liger.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "ops"))
import _fused  # noqa: E402
import _liger  # noqa: E402

import liger_kernel.transformers.functional  # noqa: E402,F401 (pinned in requirements.txt: missing is a failure, not a skip)
from liger_interpreter import bridge_interpreter  # noqa: E402

OPS = ("rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy")
# Shapes that take the interpreter well under a second per call: rows not a multiple of 16.
TINY = {"rms_norm": dict(T=5, C=40), "layer_norm": dict(T=5, C=40), "swiglu": dict(T=5, F=40),
        "rope": dict(B=1, Hq=2, Hk=1, T=5, D=16), "cross_entropy": dict(T=9, V=97),
        "fused_linear_cross_entropy": dict(T=9, C=16, V=97)}
MEMORY_GOAL = {"fused_linear_cross_entropy"}  # the ops whose peak memory is held against Liger's


def bench_module(op):
    return importlib.import_module(f"bench_{op}")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """The results folder of an in-process run; torch's thread count restored afterwards (main sets it)."""
    monkeypatch.setenv("LLMKERN_BENCH_RESULTS", str(tmp_path))
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def run_main(op, argv, capsys):
    """_fused.main of bench_<op>.py on its TINY shape, fwd+bwd only (the mode the goals are on)."""
    bench = dataclasses.replace(bench_module(op).BENCH, quick_shapes=[TINY[op]], modes=("fwd+bwd",))
    rc = _fused.main(bench, ["--quick", "--rounds", "1", *argv])
    return rc, capsys.readouterr().out


def test_a_cpu_run_says_liger_was_skipped(results, capsys):
    rc, out = run_main("rms_norm", ["--dtypes", "fp32"], capsys)
    assert rc == 0, out
    reason = _liger.skip_reason("cpu")
    assert reason and "no CUDA device" in reason
    assert f"Liger-Kernel peer: skipped: {reason}" in out
    assert "Liger-Kernel peer skipped (no ratios against it)" in out
    doc = json.loads((results / "rms_norm_quick.json").read_text())
    assert doc["env"]["device"] == "cpu"
    assert doc["env"]["liger"] == {"version": _liger.PIN, "pin": _liger.PIN, "measured": False, "skipped": reason}
    assert all(s["speedup_vs_liger"] == "skipped" for s in doc["env"]["summary"])
    assert not [r for r in doc["ratios"] if r["peer"] == "liger-kernel"]
    assert {r["candidate"] for r in doc["rows"]} == {"eager", "llmkern"}
    assert all(r["device"] == "cpu" for r in doc["rows"])


def test_cuda_without_a_gpu_is_a_clear_error(results, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, out = run_main("swiglu", ["--device", "cuda"], capsys)
    assert rc == 2 and "torch.cuda.is_available() is False" in out


def test_liger_not_importable_is_a_reason(monkeypatch):
    """With --device cuda on a GPU but no liger_kernel the peer is skipped with the install hint."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def missing():
        raise ModuleNotFoundError("No module named 'liger_kernel'")

    monkeypatch.setattr(_liger, "_import", missing)
    reason = _liger.skip_reason("cuda")
    assert "liger_kernel not importable" in reason and f"liger-kernel=={_liger.PIN}" in reason


@pytest.fixture(scope="module")
def liger_on_cpu():
    """Liger's kernels on CPU tensors in the bridged interpreter, and the driver told Liger can run."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels are compiled in this session (a GPU is present): the cuda case covers it")
    with pytest.MonkeyPatch.context() as mp:
        bridge_interpreter(mp)
        mp.setattr(_liger, "skip_reason", lambda device: None)
        yield


@pytest.mark.parametrize("op", OPS)
def test_bench_with_the_liger_peer(op, liger_on_cpu, results, capsys):
    """The Liger candidate of each bench validates against eager, is timed, and its ratios are in the
    JSON: the fwd+bwd speed-up over Liger with the goal 1.0 and, where the goal is memory, the peak."""
    rc, out = run_main(op, ["--dtypes", "fp32"], capsys)
    assert rc == 0, out
    assert "Liger-Kernel peer: measured" in out
    doc = json.loads((results / f"{op}_quick.json").read_text())
    assert doc["env"]["liger"]["measured"] is True and doc["env"]["liger"]["skipped"] is None
    liger_rows = [r for r in doc["rows"] if r["candidate"] == "liger"]
    assert liger_rows and all(r["median_ms"] > 0 and r["validation_rel_err"] is not None for r in liger_rows)
    ratios = {r["name"]: r for r in doc["ratios"] if r["peer"] == "liger-kernel"}
    speed = [r for n, r in ratios.items() if n.endswith("fwd+bwd: speed-up over Liger-Kernel")]
    assert len(speed) == 1 and speed[0]["goal"] == 1.0 and speed[0]["value"] > 0, ratios
    peak = [r for n, r in ratios.items() if n.endswith("peak bytes of fwd+bwd / Liger-Kernel's")]
    if op in MEMORY_GOAL:
        assert len(peak) == 1 and peak[0]["goal"] == 1.0 and not peak[0]["higher_is_better"], ratios
    assert all(isinstance(s["speedup_vs_liger"], float) for s in doc["env"]["summary"] if s["mode"] == "fwd+bwd")


@pytest.mark.parametrize("op", ["rope", "cross_entropy", "swiglu"])
def test_liger_writes_only_its_own_copies(op, liger_on_cpu):
    """Liger writes over q/k (rope), the logits (cross_entropy), the saved gate/up (swiglu) and the grad
    outputs: after its candidate ran, the other candidates still see the original inputs (eager's output
    is unchanged, and llmkern still validates)."""
    case = bench_module(op).make_case(dtype=torch.float32, compiled=False, device="cpu", liger=True, **TINY[op])
    before = case.calls["fwd"]["eager"]()
    before = [t.clone() for t in before] if isinstance(before, (tuple, list)) else [before.clone()]
    for _ in range(2):
        case.calls["fwd+bwd"]["liger"]()
        case.calls["fwd"]["liger"]()
    after = case.calls["fwd"]["eager"]()
    after = after if isinstance(after, (tuple, list)) else [after]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert case.validate("llmkern") <= case.tolerance


@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_bench_on_cuda_holds_the_liger_ratios(op, tmp_path):
    """`bench_<op>.py --quick --device cuda`: llmkern's Triton kernels and Liger's, both validated against
    eager, and the ratios against Liger in the JSON."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ops" / f"bench_{op}.py"), "--quick", "--device", "cuda"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=dict(os.environ, LLMKERN_BENCH_RESULTS=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / f"{op}_cuda_quick.json").read_text())
    assert doc["env"]["device"] == "cuda" and doc["env"]["liger"]["measured"] is True, doc["env"]["liger"]
    assert {r["candidate"] for r in doc["rows"]} >= {"eager", "llmkern", "liger"}
    names = [r["name"] for r in doc["ratios"] if r["peer"] == "liger-kernel"]
    n_cases = len(bench_module(op).BENCH.quick_shapes) * 2  # fp32 and bf16
    assert sum(n.endswith("fwd+bwd: speed-up over Liger-Kernel") for n in names) == n_cases, names
    if op in MEMORY_GOAL:
        assert sum(n.endswith("peak bytes of fwd+bwd / Liger-Kernel's") for n in names) == n_cases, names


def test_llmkern_bench_passes_device_to_the_fused_op_benches():
    """`llmkern bench --device cuda` reaches every fused-op bench (TAKES_DEVICE) and no other script."""
    from llmkern import bench

    jobs = {j.script.stem: j for j in bench.discover(ROOT / "bench", bench.SUITES)}
    assert {n for n, j in jobs.items() if j.takes_device} == {f"bench_{op}" for op in OPS}
    assert bench.command(jobs["bench_rms_norm"], True, "cuda")[-3:] == ["--quick", "--device", "cuda"]
    assert "--device" not in bench.command(jobs["bench_rms_norm"], True, "cpu")
    assert "--device" not in bench.command(jobs["bench_lora"], True, "cuda")
    assert bench.parse_args(["ops", "--device", "cuda"]).device == "cuda"


@pytest.mark.cuda
def test_cuda_peak_is_what_the_call_allocates():
    """peak_of on CUDA: the caching allocator's peak during the call, less what was live before it."""
    held = torch.empty(1 << 20, device="cuda")  # live before the call: not counted

    def call():
        a = torch.empty(1 << 22, device="cuda")  # 16 MiB, freed before the 8 MiB below
        del a
        return torch.empty(1 << 21, device="cuda")

    peak = _fused.peak_of(call, "cuda")
    assert 16 << 20 <= peak < (16 << 20) + (2 << 20), peak
    del held
