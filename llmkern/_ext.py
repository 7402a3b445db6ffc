"""Loads the compiled extensions once, quietly, and remembers why one is missing.

Importing llmkern never prints a traceback: a missing or broken extension is recorded here and
reported by `llmkern info` and by the backend that needs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch  # noqa: F401  (loads libtorch/libc10, which the extensions link against, before them)

_status: dict[str, tuple[object | None, str]] = {}

EXTENSIONS = {
    "_C": "CPU C++ kernels (OpenMP)",
    "_C_cuda": "CUDA kernels + NCCL ring (nvcc build)",
    "_C_emu": "CUDA sources compiled for the CPU under csrc/emu",
}


def load(name: str):
    """Import llmkern.<name>; return the module or None. The reason for a failure is kept."""
    if name not in _status:
        # _C_cuda is imported without a GPU too (it needs none to load), so `llmkern info` can say it was built.
        try:
            # An editable install of another checkout (its import finder maps `llmkern` to that
            # tree) can resolve llmkern.<name> to a binary built from other sources. Its op
            # registrations run at load time and abort the process (a C++ error, not an exception)
            # when its kernel signatures differ from this tree's schemas, so it is never imported.
            spec = importlib.util.find_spec(f"llmkern.{name}")
            here = Path(__file__).resolve().parent
            if spec is not None and spec.origin and Path(spec.origin).resolve().parent != here:
                _status[name] = (None, f"not built in this source tree ({here}); the copy at {spec.origin} "
                                       f"belongs to another checkout and is not loaded")
                return None
            mod = importlib.import_module(f"llmkern.{name}")
            _status[name] = (mod, "built and imported")
        except ImportError as e:
            msg = str(e)
            if "No module named" in msg:
                msg = "not built (see setup.py: _C always; _C_cuda needs nvcc; _C_emu needs CUDA headers)"
            _status[name] = (None, msg)
        except Exception as e:  # a broken build must not break `import llmkern`
            _status[name] = (None, f"import failed: {type(e).__name__}: {e}")
    return _status[name][0]


def status(name: str) -> str:
    load(name)
    return _status[name][1]


def available(name: str) -> bool:
    return load(name) is not None
