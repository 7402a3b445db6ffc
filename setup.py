"""Builds llmkern's three extensions against the torch installed in the environment.

- llmkern._C       CPU kernels (csrc/ops/*.cpp schemas + csrc/ops/cpu/*.cpp), always built.
- llmkern._C_cuda  CUDA kernels (csrc/ops/cuda/*.cu), built when nvcc is found.
- llmkern._C_emu   the same .cu sources compiled by g++ against csrc/emu (CUDA-on-CPU emulation),
                   registered under the op namespace `llmkern_emu` so tests can run them on CPU tensors.

Switches:
- LLMKERN_CUDA=auto|0|1: auto builds _C_cuda when nvcc is found and _C_emu when the CUDA headers are;
  1 makes a missing nvcc an error; 0 compiles no CUDA source at all, _C only (what `make demo`
  needs: 11 of the 30 compile units, and none of the 7 nvcc ones).
- LLMKERN_DEBUG=1: -O0 -g, plus ASan for the emulated build.

Build with `pip install --no-build-isolation [-e] .`: an isolated build would compile against a
second torch that pip installs into a temporary environment, not the one the extensions load into.
"""
import glob
import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit("llmkern compiles its extensions against the torch installed in this environment, and torch is not "
             "importable here. Install torch first, then build without isolation: "
             "pip install --no-build-isolation .")

ROOT = Path(__file__).parent.resolve()
CUDA = os.environ.get("LLMKERN_CUDA", "auto")
DEBUG = os.environ.get("LLMKERN_DEBUG", "0") == "1"
if CUDA not in ("auto", "0", "1"):
    sys.exit(f"LLMKERN_CUDA must be auto, 0 or 1, got {CUDA!r}")

# sm_80 and sm_90 SASS plus sm_90 PTX for newer GPUs. Without this, torch compiles for every arch it
# knows when no GPU is visible, which takes several times longer.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
# ccache: torch's build prefixes ccache (or sccache) to every compile itself when it is on PATH.
# Setting CXX="ccache g++" as well breaks the build (ninja then runs `ccache 'ccache g++'`).

if "CUDA_HOME" not in os.environ and shutil.which("nvcc") is not None:
    # /usr/local/bin/nvcc is a wrapper script here; torch would guess CUDA_HOME=/usr/local, which has
    # no CUDA headers. Prefer the toolkit folder /usr/local/cuda when it exists.
    for guess in (Path(os.path.realpath(shutil.which("nvcc"))).parent.parent, Path("/usr/local/cuda")):
        if (guess / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(guess)
            break

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def nvidia_wheel_dir(name):
    """Include/lib folders of the nvidia-* wheels that torch brings (cuBLAS headers, NCCL)."""
    for site in sys.path:
        d = Path(site) / "nvidia" / name
        if d.is_dir():
            return d
    return None


include = [str(ROOT / "csrc" / "include")]
opt = ["-O0", "-g"] if DEBUG else ["-O3"]
# -march=native: the package is built from source on the machine that runs it (as DeepSpeed's
# cpu_adam is), so AVX2/AVX-512 are used where present. -ffp-contract=fast lets g++ form FMAs.
# -fno-math-errno: with errno semantics g++ cannot vectorize a loop that calls sqrtf (the fused
# AdamW CPU step stayed scalar and ran 3.3x slower than torch's fused AdamW). No llmkern code reads errno.
cxx = opt + ["-std=c++20", "-fopenmp", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-Wall",
             "-Wno-unused-function"]
schemas = glob.glob(str(ROOT / "csrc/ops/*.cpp"))
module = [str(ROOT / "csrc/module.cpp")]  # PyInit_<name>, compiled into each extension

ext_modules = [
    CppExtension(
        "llmkern._C",
        rel(module + schemas + glob.glob(str(ROOT / "csrc/ops/cpu/*.cpp")) + glob.glob(str(ROOT / "csrc/comm/*.cpp"))),
        include_dirs=include,
        extra_compile_args={"cxx": cxx + ["-DLLMKERN_NS=llmkern"]},
        extra_link_args=["-fopenmp"],
    )
]

# The emulated build: each .cu is compiled as C++ through a one-line wrapper, because a .cu source
# would be handed to nvcc. The emulation headers come first on the include path.
cu_sources = sorted(glob.glob(str(ROOT / "csrc/ops/cuda/*.cu")) + glob.glob(str(ROOT / "csrc/comm/*.cu")))
emu_dir = ROOT / "build" / "emu_wrappers"
emu_dir.mkdir(parents=True, exist_ok=True)
emu_wrappers = []
for cu in cu_sources:
    w = emu_dir / (Path(cu).stem + "_emu.cpp")
    text = f'#include "{cu}"\n'
    if not w.exists() or w.read_text() != text:
        w.write_text(text)
    emu_wrappers.append(str(w))
cuda_inc = [str(Path(CUDA_HOME) / "include")] if CUDA_HOME else []
nccl = nvidia_wheel_dir("nccl")
emu_inc = [str(ROOT / "csrc/emu")] + include + cuda_inc + ([str(nccl / "include")] if nccl else [])
emu_flags = ["-DLLMKERN_NS=llmkern_emu", "-DLLMKERN_EMU=1", "-DLLMKERN_DEVICE_KEY=CPU", "-Wno-unknown-pragmas"]
emu_link = ["-fopenmp"]
if DEBUG:
    emu_flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-DCUEMU_SHARED_STATIC"]
    emu_link += ["-fsanitize=address,undefined"]
if CUDA != "0" and emu_wrappers and cuda_inc and (ROOT / "csrc/emu/cuemu.h").exists():
    ext_modules.append(
        CppExtension(
            "llmkern._C_emu",
            rel(module + schemas + emu_wrappers + glob.glob(str(ROOT / "csrc/emu/*.cpp"))),
            include_dirs=emu_inc,
            extra_compile_args={"cxx": cxx + emu_flags},
            extra_link_args=emu_link,
        )
    )

nvcc_found = CUDA_HOME is not None and shutil.which(str(Path(CUDA_HOME) / "bin" / "nvcc")) is not None
if CUDA == "1" and not nvcc_found:
    sys.exit("LLMKERN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
if CUDA != "0" and nvcc_found and cu_sources:
    cu13 = nvidia_wheel_dir("cu13")
    ext_modules.append(
        CUDAExtension(
            "llmkern._C_cuda",
            rel(module + cu_sources),
            include_dirs=include + ([str(cu13 / "include")] if cu13 else []) + ([str(nccl / "include")] if nccl else []),
            library_dirs=[str(nccl / "lib")] if nccl else [],
            # Only libnccl.so.2 ships in the wheel (no unversioned symlink), hence -l:.
            extra_link_args=(["-l:libnccl.so.2", f"-Wl,-rpath,{nccl / 'lib'}"] if nccl else []),
            extra_compile_args={
                "cxx": opt + ["-std=c++20", "-DLLMKERN_NS=llmkern", "-DLLMKERN_DEVICE_KEY=CUDA", "-DLLMKERN_CUDA_BUILD"],
                "nvcc": opt + ["-std=c++20", "-DLLMKERN_NS=llmkern", "-DLLMKERN_DEVICE_KEY=CUDA",
                               "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    )

def torch_key() -> str:
    """Names the torch the objects are compiled against: its version and where it is installed."""
    where = f"{torch.__version__}|{Path(torch.__file__).resolve().parent}"
    return f"torch-{torch.__version__.split('+')[0]}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


class Build(BuildExtension):
    """Objects go to build/temp/<torch>/<extension> for every build, editable (`pip install -e .`, whose
    default is a fresh temporary folder every time) or not (`pip install --no-build-isolation .`), so
    ninja recompiles only the sources that changed. The torch key keeps a build against another torch
    (an isolated build's temporary one, whose include paths differ) from overwriting these objects: one
    unkeyed folder made a non-editable install of the clone and the next `make build` recompile
    everything (685 s, then 597 s on 2 cores). An editable and a non-editable build against the same
    torch run the same compile commands (the venv's empty include/ folder is dropped, it was the only
    difference), so tests/test_install.py links the objects `make build` compiled instead of compiling
    _C again (4.3 min of the suite on 2 cores). One folder per extension: _C and _C_emu compile the same
    module.cpp and schema files with different -DLLMKERN_NS."""

    def finalize_options(self):
        super().finalize_options()
        # setuptools adds <venv>/include in a virtualenv; it holds no file unless a package put headers there
        venv_include = Path(sys.exec_prefix) / "include"
        if sys.exec_prefix != sys.base_exec_prefix and not any(f.is_file() for f in venv_include.rglob("*")):
            self.include_dirs = [d for d in self.include_dirs if Path(d) != venv_include]

    def build_extension(self, ext):
        shared = self.build_temp
        self.build_temp = str(ROOT / "build" / "temp" / torch_key() / ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


setup(ext_modules=ext_modules, cmdclass={"build_ext": Build})
