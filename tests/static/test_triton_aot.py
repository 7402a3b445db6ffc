"""Static check of the Triton kernels: every AOT_CONFIGS variant compiles for sm_80 and sm_90 with no spills.

Needs no GPU: triton.compile on an ASTSource for GPUTarget("cuda", 80|90, 32), ptxas -v log parsed by
llmkern.kernel_report. A cold run compiles ~230 variants (a few minutes on 2 cores); results are cached
in build/kernel_report/ by source hash, so later runs take about a second.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmkern import kernel_report as kr
from llmkern.triton_kernels import (_aot, adapter_bottleneck, cross_entropy, fused_adamw, fused_linear_cross_entropy,
                                    fused_sgd, layer_norm, lora_linear, multi_tensor_sumsq, rms_norm, rope, swiglu)

MODULES = (adapter_bottleneck, fused_adamw, fused_sgd, lora_linear, multi_tensor_sumsq, rms_norm, layer_norm, swiglu,
           rope, cross_entropy, fused_linear_cross_entropy)

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows():
    return kr.triton_report()


def test_every_shipped_variant_is_reported(rows):
    got = {(r["kernel"], r["config"], r["arch"]) for r in rows}
    for c in (c for m in MODULES for c in m.AOT_CONFIGS):
        assert isinstance(c, _aot.AotConfig)
        for arch in ("sm_80", "sm_90a"):
            assert (c.kernel.__name__, c.name, arch) in got
    assert all(r["registers"] and r["registers"] <= 255 for r in rows)


def test_shipped_triton_kernels_do_not_spill(rows):
    bad = kr.spilling(rows)
    assert not bad, "register spills:\n" + kr.format_report(bad)


def test_shared_memory_fits_sm80(rows):
    # sm_80 allows 163 KiB of dynamic shared memory per block (sm_90: 227 KiB).
    assert max(r["shared_bytes"] for r in rows) <= 163 * 1024


def test_planted_spill_is_detected():
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(FIXTURES / "triton_spill.py"), "80"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["spill_stores"] > 0 and row["spill_loads"] > 0, row


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function 'bar' for 'sm_90'
ptxas info    : Function properties for bar
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    assert kr.parse_ptxas_log(log) == [
        {"kernel": "_Z3fooPf", "arch": "sm_80", "registers": 40, "spill_stores": 8, "spill_loads": 4,
         "shared_bytes": 1024},
        {"kernel": "bar", "arch": "sm_90", "registers": 12, "spill_stores": 0, "spill_loads": 0,
         "shared_bytes": 0},
    ]
    assert "| _Z3fooPf" in kr.format_report([{"config": "c", **r} for r in kr.parse_ptxas_log(log)])
