"""The emulator's test kernels also compile with nvcc for sm_90, without csrc/emu on the include path
(the nvcc branch of llmkern/launch.cuh). Slow: torch's CUDA headers take minutes on 2 cores."""
import shutil
import subprocess

import pytest

from emu_build import CACHE, CUDA_HOME, KERNELS, ROOT, TORCH_DIR, _digest, _nccl_include


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_ops", "wmma"])
def test_compiles_with_nvcc(name):
    nvcc = CUDA_HOME / "bin/nvcc"
    if not nvcc.exists() and shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    import nvidia.cu13

    source = KERNELS / f"{name}.cu"
    flags = ["-std=c++20", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
    stamp = CACHE / f"{name}-nvcc-{_digest(source, flags)}.ok"
    if stamp.exists():
        return
    includes = [ROOT / "csrc/include", TORCH_DIR / "include", TORCH_DIR / "include/torch/csrc/api/include",
                CUDA_HOME / "include", list(nvidia.cu13.__path__)[0] + "/include", _nccl_include()]
    out = CACHE / f"{name}-nvcc.o"
    cmd = [str(nvcc) if nvcc.exists() else "nvcc", *flags, "-c", "-x", "cu", str(source),
           *[f"-I{i}" for i in includes], "-o", str(out)]
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "csrc/emu" not in r.stderr
    assert " 0 bytes spill stores" in r.stdout + r.stderr
    stamp.write_text(r.stdout + r.stderr)
