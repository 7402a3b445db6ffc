"""Shared pytest setup: markers, the device fixture, per-test seeding, the Triton interpreter.

Markers (declared in pyproject.toml):
  cuda         the test needs a GPU; skipped automatically when torch.cuda.is_available() is False.
  slow         long-running; runs by default (make test), deselect with -m "not slow".
  distributed  spawns gloo ranks through llmkern.testing.run_distributed.

The `device` parameter gives "cpu" to every test that takes it, plus "cuda" when the test is marked
`cuda`; without a GPU the "cuda" case is skipped and the "cpu" case still runs. A `cuda`-marked test
that does not take `device` is skipped whole. Use it as `def test_x(device): ...`.

Another CPU's GEMM summation order, for checking that numerical tests do not depend on this one
(tolerances.py's docstring): LLMKERN_TEST_MKLDNN=0 turns oneDNN off (bf16/fp16 matmuls take
another kernel), OMP_NUM_THREADS=1 changes how MKL splits long fp32 reductions, and MKL_CBWR=AVX2
or COMPATIBLE makes MKL run the code path of an AVX2-only (e.g. AMD) or a generic x86 CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from llmkern.testing import enable_triton_interpreter

# The interpreter has to be on before any module defining @triton.jit kernels is imported (the
# decorator decides between compiled and interpreted kernels; see llmkern/testing/triton_interpret.py).
# conftest.py is imported before pytest collects any test module, so this is the place. With a GPU,
# compiled kernels are tested instead, unless TRITON_INTERPRET=1 is set explicitly.
_INTERPRET = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRET:
    enable_triton_interpreter()

_SEED = 0

if os.environ.get("LLMKERN_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False


_NO_GPU = "cuda marker: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests without a GPU, except the "cpu" case of those that take `device`."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=_NO_GPU)
    for item in items:
        if item.get_closest_marker("cuda") is None:
            continue
        params = getattr(item, "callspec", None)
        if params is None or params.params.get("device", "cuda") == "cuda":
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    explicit = any("device" in (m.args[0] if isinstance(m.args[0], (list, tuple)) else m.args[0].split(","))
                   for m in metafunc.definition.iter_markers("parametrize"))
    if "device" in metafunc.fixturenames and not explicit:  # a test may still list its own devices
        cuda = metafunc.definition.get_closest_marker("cuda") is not None
        metafunc.parametrize("device", ["cpu", "cuda"] if cuda else ["cpu"])


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it, so a failure reproduces
    when the test is run alone. No flaky reruns: a test that fails on one seed is a real failure."""
    torch.manual_seed(_SEED)
    yield


@pytest.fixture
def triton_interpret():
    """Kernels defined in this session run in the Triton interpreter on CPU tensors.

    Skips with a reason when the interpreter could not be enabled in time (a GPU is present and
    TRITON_INTERPRET=1 was not set: then kernel modules were imported as compiled kernels)."""
    pytest.importorskip("triton")
    if not _INTERPRET:
        pytest.skip("a GPU is present: Triton kernels are compiled, not interpreted "
                    "(set TRITON_INTERPRET=1 to interpret them)")
    enable_triton_interpreter()  # idempotent; re-asserts the env var in case a test cleared it
    yield
