"""Backends as data, and the one function that picks among them.

Each backend says why it refuses an input (xformers' not_supported_reasons); nothing falls back
silently. The choice is, in order: the `backend=` argument, the LLMKERN_BACKEND environment
variable, then the first backend in PREFERENCE that accepts every input.

  cpu     C++ kernels in llmkern._C (OpenMP), CPU tensors
  cuda    our CUDA kernels in llmkern._C_cuda, CUDA tensors
  triton  Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  emu     the CUDA kernels compiled for the CPU (llmkern._C_emu), CPU tensors; for tests
  ref     pure PyTorch, any device; the oracle
"""
from __future__ import annotations

import os
import warnings
from typing import Literal, Mapping, Sequence, Union

import torch

from llmkern import _ext

Backend = Literal["cpu", "cuda", "triton", "emu", "ref"]
BACKENDS: tuple[Backend, ...] = ("cpu", "cuda", "triton", "emu", "ref")
# Automatic choice never picks "emu" (it is a test vehicle, ~1000x slower than "cpu").
PREFERENCE: dict[str, tuple[Backend, ...]] = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}


class BackendRefused(RuntimeError):
    """A backend that was asked for by name cannot run these inputs; the message says why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton ships with torch's CUDA build
        return f"triton is not importable ({e})"
    return None


DTypes = Union[Sequence[torch.dtype], Mapping[str, Sequence[torch.dtype]]]


def not_supported_reasons(backend: Backend, tensors: Sequence[torch.Tensor], dtypes: DTypes,
                          unavailable: Mapping[str, str] | None = None) -> list[str]:
    """Why `backend` cannot run an op on these tensors; empty when it can. `dtypes` is one list for
    every backend or a per-backend mapping; `unavailable` maps a backend to why the op's kernels
    for it could not be loaded."""
    reasons: list[str] = []
    if unavailable and backend in unavailable:
        reasons.append(f"its kernels are unavailable: {unavailable[backend]}")
    if isinstance(dtypes, Mapping):
        dtypes = dtypes.get(backend, ())
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors are on different device types {sorted(devices)}")
    dev = next(iter(devices)) if devices else "cpu"
    for t in tensors:
        if t.dtype not in dtypes:
            reasons.append(f"dtype {t.dtype} is not one of {[str(d) for d in dtypes]}")
            break
    if backend == "ref":
        return reasons
    if backend in ("cpu", "emu"):
        if dev != "cpu":
            reasons.append(f"needs CPU tensors, got {dev}")
        ext = "_C" if backend == "cpu" else "_C_emu"
        if not _ext.available(ext) and not (unavailable and backend in unavailable):
            reasons.append(f"llmkern.{ext}: {_ext.status(ext)}")
    elif backend == "cuda":
        if dev != "cuda":
            reasons.append(f"needs CUDA tensors, got {dev}")
        if not _ext.available("_C_cuda"):
            reasons.append(f"llmkern._C_cuda: {_ext.status('_C_cuda')}")
    elif backend == "triton":
        r = _triton_reason()
        if r:
            reasons.append(r)
        if dev == "cpu" and not triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
        elif dev not in ("cpu", "cuda"):
            reasons.append(f"needs CUDA tensors, got {dev}")
    else:
        reasons.append(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return reasons


def choose(op: str, tensors: Sequence[torch.Tensor], dtypes: DTypes, backend: Backend | None = None,
           supported: Sequence[Backend] = BACKENDS, unavailable: Mapping[str, str] | None = None) -> Backend:
    """Pick the backend for one call of `op`. A named backend that refuses raises BackendRefused;
    an automatic choice that skips a preferred backend warns once with the reason."""
    requested = backend or os.environ.get("LLMKERN_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {requested!r}; expected one of {BACKENDS}")
        if requested not in supported:
            raise BackendRefused(f"{op}: backend {requested!r} is not implemented for this op "
                                 f"(implemented: {list(supported)})")
        reasons = not_supported_reasons(requested, tensors, dtypes, unavailable)
        if reasons:
            raise BackendRefused(f"{op}: backend {requested!r} refused: " + "; ".join(reasons))
        return requested
    dev = tensors[0].device.type if tensors else "cpu"
    skipped = []
    for b in PREFERENCE.get(dev, ("ref",)):
        if b not in supported:
            continue
        reasons = not_supported_reasons(b, tensors, dtypes, unavailable)
        if not reasons:
            if skipped:
                _warn_once(op, b, skipped)
            return b
        skipped.append((b, reasons))
    raise BackendRefused(f"{op}: no backend accepts these inputs: " +
                         "; ".join(f"{b}: {', '.join(r)}" for b, r in skipped))


# The extension that carries each compiled backend's kernels, and the op namespace it registers.
_COMPILED: dict[str, tuple[str, str]] = {"cpu": ("_C", "llmkern"), "emu": ("_C_emu", "llmkern_emu")}


def register_compiled_op(name: str, fake, backends: Sequence[Backend] = ("cpu", "emu")) -> dict[str, str]:
    """Registers `fake` for ``<ns>::<name>`` in every compiled namespace that defines the op, and
    returns, per backend, why its kernels are unavailable (the `unavailable` of :func:`choose`).
    The CUDA kernels attach to the schema that _C defines, so "cuda" is unavailable when "cpu" is."""
    return _for_compiled(name, backends, lambda ns: torch.library.register_fake(f"{ns}::{name}")(fake))


def register_autograd_op(name: str, fake, backward_name: str, fake_backward, make_backward, setup_context,
                         define_triton=None) -> dict[str, str]:
    """For an op with a backward op of its own (``<ns>::<name>`` and ``<ns>::<backward_name>``):
    registers both fakes and the autograd formula ``make_backward(ns)`` in every compiled namespace
    that defines the op, and in ``llmkern_triton`` once ``define_triton()`` has defined the Triton
    ops there. Returns, per backend, why its kernels are unavailable, as register_compiled_op."""

    def register(ns: str) -> None:
        torch.library.register_fake(f"{ns}::{name}")(fake)
        torch.library.register_fake(f"{ns}::{backward_name}")(fake_backward)
        torch.library.register_autograd(f"{ns}::{name}", make_backward(ns), setup_context=setup_context)

    unavailable = _for_compiled(name, ("cpu", "emu"), register)
    if "cpu" not in unavailable:
        _ext.available("_C_cuda")  # its CUDA kernels attach to the llmkern ops that _C defines
    if define_triton is not None:
        try:
            define_triton()
            register("llmkern_triton")
        except Exception as e:  # triton missing or its kernels failed to import: say so, never crash
            unavailable["triton"] = f"{type(e).__name__}: {e}"
    return unavailable


def _for_compiled(name: str, backends: Sequence[Backend], register) -> dict[str, str]:
    """Calls ``register(ns)`` for every compiled backend whose extension defines ``<ns>::<name>``;
    returns why the others are unavailable ("cuda" shares "cpu"'s reason: it needs _C's schema)."""
    unavailable: dict[str, str] = {}
    for b in backends:
        ext, ns = _COMPILED[b]
        if not _ext.available(ext):
            unavailable[b] = f"llmkern.{ext}: {_ext.status(ext)}"
        elif not hasattr(getattr(torch.ops, ns), name):
            unavailable[b] = f"llmkern.{ext} was built without {ns}::{name} (rebuild it)"
        else:
            register(ns)
    if "cpu" in unavailable:
        unavailable["cuda"] = unavailable["cpu"]
    return unavailable


_warned: set[tuple[str, str, str]] = set()


def _warn_once(op: str, chosen: str, skipped) -> None:
    text = "; ".join(f"{b} refused ({', '.join(r)})" for b, r in skipped)
    key = (op, chosen, text)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"llmkern.{op}: using the {chosen!r} backend because {text}", RuntimeWarning,
                      stacklevel=3)
