"""Builds the emulator test programs in tests/emu/kernels once and runs them (used by conftest.py).

Each program is compiled by g++ with the flags setup.py uses for llmkern._C_emu, against csrc/emu, and
cached under $TMPDIR/llmkern-emu-tests keyed by a hash of the sources, the emulator headers and the
flags, so a rerun without changes compiles nothing.

A compile is one single-threaded process, and the test run is one process: compiled one after another,
the nine builds of this folder (the nvcc ones with torch's headers take 141 s and 55 s) kept one of the
two cores idle for about 6 minutes. `prefetch` starts the builds the selected tests need, os.cpu_count()
at a time, when the first of them asks for one; `build`, `nvcc_compile` and the torch_ops extension then
wait for theirs.
"""
import concurrent.futures
import hashlib
import os
import re
import shutil
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


class CompileError(Exception):
    pass


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_FUTURES: dict[tuple, concurrent.futures.Future] = {}


def prefetch(jobs) -> None:
    """Starts each (key, function) job in the background, longest first as given; a key already started
    is skipped. `_wait(key, function)` returns the job's result (or runs it, if never started)."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                                      thread_name_prefix="emu-build")
    for key, fn in jobs:
        if key not in _FUTURES:
            _FUTURES[key] = _POOL.submit(fn)


def _wait(key, fn):
    if key not in _FUTURES:
        prefetch([(key, fn)])
    return _FUTURES[key].result()


def build(name: str, opt=RELEASE) -> Path:
    """Compiles tests/emu/kernels/<name>.cu (as C++) into a cached executable and returns its path."""
    try:
        return _wait(*_gxx_job(name, opt))
    except CompileError as e:
        pytest.fail(str(e))


def _gxx_job(name: str, opt=RELEASE):
    """The (key, function) of a g++ build: `build` waits on the key the prefetch table started."""
    return ("g++", name, tuple(opt)), lambda: _compile(name, opt)


def _nvcc_job(name: str):
    return ("nvcc", name), lambda: _nvcc(name)


def _compile(name: str, opt) -> Path:
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
        raise CompileError(f"compiling {source.name} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(tmp, exe)
    return exe


NVCC_FLAGS = ["-std=c++20", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v"]


def nvcc_path() -> str | None:
    nvcc = CUDA_HOME / "bin/nvcc"
    return str(nvcc) if nvcc.exists() else shutil.which("nvcc")


def nvcc_compile(name: str) -> tuple[int, str]:
    """nvcc's return code and its output (ptxas's report included) for tests/emu/kernels/<name>.cu compiled
    for sm_90 without csrc/emu on the include path; a success is cached by a stamp file."""
    return _wait(*_nvcc_job(name))


def _nvcc(name: str) -> tuple[int, str]:
    import nvidia.cu13

    source = KERNELS / f"{name}.cu"
    stamp = CACHE / f"{name}-nvcc-{_digest(source, NVCC_FLAGS)}.ok"
    if stamp.exists():
        return 0, stamp.read_text()
    includes = [ROOT / "csrc/include", TORCH_DIR / "include", TORCH_DIR / "include/torch/csrc/api/include",
                CUDA_HOME / "include", list(nvidia.cu13.__path__)[0] + "/include", _nccl_include()]
    out = CACHE / f"{name}-nvcc.o"
    cmd = [nvcc_path(), *NVCC_FLAGS, "-c", "-x", "cu", str(source), *[f"-I{i}" for i in includes], "-o", str(out)]
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode == 0 and "csrc/emu" not in text and " 0 bytes spill stores" in text:
        stamp.write_text(text)
    return r.returncode, text


def torch_ops_extension():
    """tests/emu/kernels/torch_ops.cu compiled as C++ into a torch extension (as llmkern._C_emu is) and
    loaded: its ops are under torch.ops.cuemu_test."""
    return _wait(("torch_ops",), _torch_ops)  # the key of MODULE_BUILDS["test_emu_torch.py"]


def _torch_ops():
    from torch.utils.cpp_extension import load

    source = KERNELS / "torch_ops.cu"
    build_dir = CACHE / f"torch_ops-{_digest(source, BASE_FLAGS)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # A .cu source would be handed to nvcc: compile it as C++ through a one-line wrapper, as setup.py does.
    wrapper = build_dir / "torch_ops_emu.cpp"
    text = f'#include "{source}"\n'
    if not wrapper.exists() or wrapper.read_text() != text:  # a new mtime would make ninja rebuild
        wrapper.write_text(text)
    os.environ.setdefault("MAX_JOBS", "1")
    load(
        name="cuemu_torch_ops",
        sources=[str(wrapper)],
        extra_include_paths=[str(p) for p in INCLUDES[:4]],  # torch's own come from load()
        extra_cflags=["-O2", "-DLLMKERN_EMU=1", *BASE_FLAGS[1:]],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.cuemu_test


# What each test module of this folder builds, the longest first (seconds on 2 idle cores): the builds
# `prefetch_for` starts for the modules a run selected.
MODULE_BUILDS = {
    "test_emu_nvcc.py": [_nvcc_job("torch_ops"), _nvcc_job("wmma")],
    "test_emu_torch.py": [(("torch_ops",), _torch_ops)],
    "test_emu_nccl.py": [_gxx_job("nccl_ring")],
    "test_emu_block.py": [_gxx_job("matmul"), _gxx_job("matmul", RELEASE + ["-DCUEMU_UCONTEXT"])],
    "test_emu_asan.py": [_gxx_job("oob", ASAN)],
    "test_emu_warp.py": [_gxx_job("reduce"), _gxx_job("wmma")],
}


def prefetch_for(module_names) -> None:
    """Starts the builds of the selected test modules: nvcc's first (the longest), when nvcc exists."""
    jobs = [j for m, module_jobs in MODULE_BUILDS.items() if m in module_names for j in module_jobs
            if j[0][0] != "nvcc" or nvcc_path() is not None]
    # the two nvcc compiles are the longest: interleave so that one starts on each core
    jobs.sort(key=lambda j: j[0][0] != "nvcc")
    prefetch(jobs)


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

