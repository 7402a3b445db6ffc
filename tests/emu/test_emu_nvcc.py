"""The emulator's test kernels also compile with nvcc for sm_90, without csrc/emu on the include path
(the nvcc branch of llmkern/launch.cuh). Slow: torch's CUDA headers take minutes on 2 cores (the two
compiles run beside the folder's other builds, emu_build.prefetch_for)."""
import pytest

from emu_build import nvcc_compile, nvcc_path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_ops", "wmma"])
def test_compiles_with_nvcc(program, name):
    if nvcc_path() is None:
        pytest.skip("nvcc not found")
    rc, out = nvcc_compile(name)
    assert rc == 0, out[-6000:]
    assert "csrc/emu" not in out
    assert " 0 bytes spill stores" in out
