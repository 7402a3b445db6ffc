"""Builds the emulator test programs in tests/emu/kernels once and runs them (used by conftest.py).

Each program is compiled by g++ with the flags setup.py uses for llmkern._C_emu, against csrc/emu, and
cached under $TMPDIR/llmkern-emu-tests keyed by a hash of the sources, the emulator headers and the
flags, so a rerun without changes compiles nothing.
"""
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = Path(__file__).parent / "kernels"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
CACHE = Path(tempfile.gettempdir()) / "llmkern-emu-tests"
SCHEDULES = ["forward", "reverse", "random:12345"]

TORCH_DIR = Path(torch.__file__).parent


def _nccl_include():
    import nvidia.nccl  # the wheel torch brings; only for the include path order of the real build

    return Path(list(nvidia.nccl.__path__)[0]) / "include"


BASE_FLAGS = ["-std=c++20", "-fopenmp", "-march=native", "-ffp-contract=fast", "-Wall", "-Wno-unused-function"]
# Same order as setup.py: the stand-ins first, so <cuda_runtime.h>, <mma.h> and <nccl.h> are ours.
INCLUDES = [ROOT / "csrc/emu", ROOT / "csrc/include", CUDA_HOME / "include", _nccl_include(), TORCH_DIR / "include"]
LINK = [f"-L{TORCH_DIR / 'lib'}", "-lc10", f"-Wl,-rpath,{TORCH_DIR / 'lib'}", "-pthread"]
RELEASE = ["-O3"]
ASAN = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-DCUEMU_SHARED_STATIC"]


def _digest(source: Path, flags):
    h = hashlib.sha256()
    for f in sorted((ROOT / "csrc/emu").glob("*")) + sorted((ROOT / "csrc/include/llmkern").glob("*")) + [
        KERNELS / "harness.h",
        source,
    ]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def build(name: str, opt=RELEASE) -> Path:
    """Compiles tests/emu/kernels/<name>.cu (as C++) into a cached executable and returns its path."""
    source = KERNELS / f"{name}.cu"
    flags = BASE_FLAGS + opt
    exe = CACHE / f"{name}-{_digest(source, flags)}"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".tmp{os.getpid()}")
    cmd = ["g++", *flags, "-x", "c++", str(source), *[f"-I{i}" for i in INCLUDES], "-o", str(tmp), *LINK]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"compiling {source.name} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(tmp, exe)
    return exe


class Program:
    def __init__(self, exe: Path):
        self.exe = exe

    def run(self, case: str, schedule="forward", timeout=60, check=True, **env):
        e = dict(os.environ, LLMKERN_EMU_SCHEDULE=schedule, **{k: str(v) for k, v in env.items()})
        r = subprocess.run([str(self.exe), case], capture_output=True, text=True, timeout=timeout, env=e)
        if check:
            assert r.returncode == 0, f"{self.exe.name} {case} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r

    def results(self, case: str, schedule="forward", **env):
        """The RESULT lines of a case as dicts; fails if the case raised a kernel error."""
        out = self.run(case, schedule, **env).stdout
        assert "KERNEL_ERROR" not in out, out
        rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in out.splitlines() if line.startswith("RESULT")]
        assert rows, out
        return rows

    def kernel_error(self, case: str, schedule="forward", **env) -> str:
        """The message of the kernel error a case must raise."""
        out = self.run(case, schedule, **env).stdout
        m = re.search(r"^KERNEL_ERROR: (.*)$", out, re.M)
        assert m, f"{case} under {schedule}: expected a kernel error, got:\n{out}"
        return m.group(1)

