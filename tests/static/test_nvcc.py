"""Static check of the CUDA kernels: nvcc -Xptxas -v for sm_80 and sm_90, no spills in csrc/**/*.cu.

Needs nvcc (skipped without it), no GPU. A .cu with torch headers takes about a minute; results are
cached in build/kernel_report/ by a hash of the source, csrc/include and the flags.
"""
import shutil
from pathlib import Path

import pytest

from llmkern import kernel_report as kr

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


def test_shipped_cuda_kernels_do_not_spill():
    sources = sorted(ROOT.glob("csrc/**/*.cu"))
    if not sources:
        pytest.skip("no csrc/**/*.cu yet")
    rows = kr.nvcc_report()
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    bad = kr.spilling(rows)
    assert not bad, "register spills:\n" + kr.format_report(bad)


def test_fixture_with_launch_header_compiles_without_spills():
    rows = kr.nvcc_report([FIXTURES / "launch_ok.cu"])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all("axpy_kernel<float>" in r["kernel"] for r in rows), rows  # demangled
    assert all(r["registers"] > 0 for r in rows) and not kr.spilling(rows)


def test_planted_spill_is_detected():
    rows = kr.nvcc_report([FIXTURES / "spill.cu"])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert len(kr.spilling(rows)) == 2, kr.format_report(rows)
