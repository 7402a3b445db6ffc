"""Every CUDA kernel in the repo has a test that runs it under the emulator.

Adding a `__global__` kernel without registering its emulated test here fails this test; so does
registering a test that does not exist or does not run the emulated backend.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# kernel name -> (test file, test function) that runs it on CPU tensors under csrc/emu.
EMULATED_TESTS = {
    "lora_rows_dot_kernel": ("tests/ops/test_lora_linear.py", "test_backends"),
    "lora_add_lowrank_kernel": ("tests/ops/test_lora_linear.py", "test_backends"),
    "lora_wgrad_kernel": ("tests/ops/test_lora_linear.py", "test_backends"),
    "adapter_fwd_rows_kernel": ("tests/ops/test_adapter_bottleneck.py", "test_emu"),
    "adapter_bwd_rows_kernel": ("tests/ops/test_adapter_bottleneck.py", "test_emu"),
    "adapter_wgrad_kernel": ("tests/ops/test_adapter_bottleneck.py", "test_emu"),
    "adapter_colgrad_kernel": ("tests/ops/test_adapter_bottleneck.py", "test_emu"),
    "fused_adamw_kernel": ("tests/ops/test_fused_adamw.py", "test_matches_fp64_reference"),
    "fused_sgd_kernel": ("tests/ops/test_fused_sgd.py", "test_matches_fp64_reference"),
    "ring_reduce_kernel": ("tests/parallel/test_nccl_ring.py", "test_ring_matches_fp64_reference"),
    "multi_tensor_sumsq_kernel": ("tests/ops/test_multi_tensor_sumsq.py", "test_emulated_kernel_is_schedule_independent"),
    "sumsq_finalize_kernel": ("tests/ops/test_multi_tensor_sumsq.py", "test_emulated_kernel_is_schedule_independent"),
}
# Only csrc/ is scanned: the emulator's own test kernels (tests/emu/kernels) are run by tests/emu directly.


def kernels_in_sources():
    found = {}
    # .cuh too: a kernel defined in a header (csrc/comm/ring_reduce.cuh) is compiled wherever it is included.
    for cu in sorted([*ROOT.glob("csrc/**/*.cu"), *ROOT.glob("csrc/**/*.cuh")]):
        for name in re.findall(r"__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+(\w+)", cu.read_text()):
            found[name] = cu.relative_to(ROOT).as_posix()
    return found


def test_sources_have_kernels():
    assert "lora_rows_dot_kernel" in kernels_in_sources()


@pytest.mark.parametrize("kernel,source", sorted(kernels_in_sources().items()))
def test_kernel_has_emulated_test(kernel, source):
    assert kernel in EMULATED_TESTS, (f"CUDA kernel {kernel} ({source}) has no emulated test: add a test that "
                                      f"runs it with backend='emu' and register it in EMULATED_TESTS")
    path, func = EMULATED_TESTS[kernel]
    text = (ROOT / path).read_text()
    assert re.search(rf"^def {func}\(", text, re.M), f"{path} has no test function {func}"
    body = text[text.index(f"def {func}("):]
    body = body[:body.find("\ndef ", 1)] if "\ndef " in body[1:] else body
    uses_emu = '"emu"' in text and ("backend" in body or "llmkern_emu" in body)
    assert uses_emu, f"{path}::{func} does not run the emulated backend"


def test_registry_has_no_stale_entries():
    stale = set(EMULATED_TESTS) - set(kernels_in_sources())
    assert not stale, f"EMULATED_TESTS names kernels that no longer exist: {sorted(stale)}"
