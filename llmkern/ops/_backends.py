"""Backends as data, the one function that picks among them, and the one registration path.

Each backend says why it refuses an input (xformers' not_supported_reasons); nothing falls back
silently. The choice is, in order: the `backend=` argument, the LLMKERN_BACKEND environment
variable, then the first backend in PREFERENCE that accepts every input.

  backend  kernels (LIBRARIES)                op namespace     tensors
  cpu      llmkern._C: C++, OpenMP            llmkern          CPU
  cuda     llmkern._C_cuda: our CUDA kernels  llmkern          CUDA (kernels attached to _C's schemas)
  emu      llmkern._C_emu: the CUDA kernels   llmkern_emu      CPU; a test vehicle
           compiled for the CPU (csrc/emu)
  triton   triton_kernels/<op>.py             llmkern_triton   CUDA, or CPU under TRITON_INTERPRET=1
  ref      <op>_ref, pure PyTorch             -                any; the oracle

Adding an op, rms_norm as the example:
  1. csrc/ops/rms_norm.cpp: the schema of rms_norm (and _rms_norm_backward), the only copy: every
     other namespace's op is defined from it (schema()); tests/ops/test_schemas.py compares them.
  2. The kernels: csrc/ops/cpu/rms_norm_kernel.cpp (LLMKERN_CPU_IMPL), csrc/ops/cuda/
     rms_norm_kernel.cu (LLMKERN_DEVICE_IMPL; also built for llmkern_emu), triton_kernels/rms_norm.py.
  3. llmkern/ops/rms_norm.py: rms_norm_ref; a fake per schema; the autograd formula; a function that
     imports the Triton launchers and returns {op name: implementation} (a missing triton then
     becomes a reason, not an ImportError); one call
         UNAVAILABLE = register_op("rms_norm", fake=..., backward=Backward(...), triton=...)
     and the public function: check the inputs, b = choose("rms_norm", tensors, DTYPES, backend),
     then run("rms_norm", b, rms_norm_ref, *args): rms_norm_ref for "ref", else op("rms_norm", b).
  4. Export rms_norm and rms_norm_ref from llmkern/ops/__init__.py; tests in tests/ops/test_rms_norm.py.
Registrations made per namespace later (vmap) loop over namespaces(name).

Autocast: ``register_op(..., autocast=policy)`` registers an AutocastCPU and an AutocastCUDA kernel for
the op in every namespace; the public function's first line is
``args = autocast(name, *args)``, so that its checks, the backend choice and ``ref`` see the dtypes the
kernels will run in. The policies (AutocastPolicy), chosen per op kind as torch's own ops are:
  "lower"  GEMM-like ops (lora_linear, adapter_bottleneck): fp32/fp16/bf16 inputs are cast to the
           autocast dtype (bf16 on the CPU, fp16 or bf16 on CUDA) and the kernels accumulate in fp32,
           as nn.Linear under autocast runs cuBLAS/oneDNN in bf16 with an fp32 accumulator.
  "fp32"   norms and losses (rms_norm, layer norms, cross_entropy): fp16/bf16 inputs are cast to fp32
           and the op returns fp32, as torch's autocast does for layer_norm and cross_entropy; a module
           that must return its input's dtype (HF's LlamaRMSNorm returns weight * x.to(input_dtype))
           casts the result back itself.
  "promote" elementwise ops over several tensors (swiglu, rope): inputs of mixed float dtypes are cast
           to the widest of them, as torch's autocast "promote" list (cat, stack, addcmul) does; a
           single-dtype call runs unchanged.
fp64 inputs are never cast (torch's autocast leaves fp64 alone too). Inside an autocast kernel autocast
is off for the op; its backward gets no autocast kernel, and runs on the cast tensors the forward saved.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import torch

from llmkern import _ext

Backend = Literal["cpu", "cuda", "triton", "emu", "ref"]
BACKENDS: tuple[Backend, ...] = ("cpu", "cuda", "triton", "emu", "ref")
# Automatic choice never picks "emu" (it is a test vehicle, ~1000x slower than "cpu").
PREFERENCE: dict[str, tuple[Backend, ...]] = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

LIBRARIES: dict[str, tuple[str | None, str]] = {
    "cpu": ("_C", "llmkern"), "cuda": ("_C_cuda", "llmkern"), "emu": ("_C_emu", "llmkern_emu"),
    "triton": (None, "llmkern_triton")}
"""Backend -> (the extension llmkern.<ext> that carries its kernels, None for Python; its op namespace).
The schemas are C++'s (csrc/ops/<op>.cpp), defined by _C under llmkern and by _C_emu under llmkern_emu."""

FP32_FP16_BF16 = (torch.float32, torch.float16, torch.bfloat16)
FP32_FP16_BF16_FP64 = FP32_FP16_BF16 + (torch.float64,)


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
    if backend in ("cpu", "emu", "cuda"):
        want = "cuda" if backend == "cuda" else "cpu"
        if dev != want:
            reasons.append(f"needs {want.upper()} tensors, got {dev}")
        ext = LIBRARIES[backend][0]
        if not _ext.available(ext) and not (unavailable and backend in unavailable and backend != "cuda"):
            reasons.append(f"llmkern.{ext}: {_ext.status(ext)}")
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
    an automatic choice that skips a preferred backend warns once with the reason. `unavailable`
    defaults to what register_op recorded for `op`."""
    if unavailable is None:
        unavailable = REGISTERED.get(op)
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


def op(name: str, backend: Backend) -> torch._ops.OpOverloadPacket:
    """The dispatcher op that runs `name` on `backend`: torch.ops.<namespace>.<name>. "ref" has none: the
    op's module calls its <op>_ref."""
    if backend not in LIBRARIES:
        raise ValueError(f"{name}: backend {backend!r} has no dispatcher op; expected one of {tuple(LIBRARIES)} "
                         f"(ref is the op's <op>_ref, called by its module)")
    return getattr(getattr(torch.ops, LIBRARIES[backend][1]), name)


def run(name: str, backend: Backend, ref: Callable, *args):
    """Runs `name` on the chosen backend: `ref` for "ref", else its dispatcher op. `args` went through
    autocast() first; `ref` then runs with autocast off, as the dispatcher's autocast kernel runs the op."""
    if backend != "ref":
        return op(name, backend)(*args)
    with _autocast_off(args):
        return ref(*args)


def schema(name: str) -> str:
    """The schema of `name` as C++ defines it (csrc/ops/<op>.cpp), without its namespace:
    ``"lora_linear(Tensor x, ...) -> (Tensor, Tensor)"``. Read from llmkern (llmkern._C), or from
    llmkern_emu when only _C_emu is built."""
    for backend in ("cpu", "emu"):
        ext, ns = LIBRARIES[backend]
        if _ext.available(ext) and hasattr(getattr(torch.ops, ns), name):
            return str(getattr(getattr(torch.ops, ns), name).default._schema).split("::", 1)[1]
    raise RuntimeError(f"no compiled extension defines {name} (llmkern._C: {_ext.status('_C')}; llmkern._C_emu: "
                       f"{_ext.status('_C_emu')}), and its schema is defined only there")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Backward:
    """The autograd of an op whose backward is an op of its own, ``_<op>_backward``."""

    name: str
    """The backward op ("_lora_linear_backward"); its schema sits beside the forward's in C++."""
    fake: Callable
    """Its fake (meta) function."""
    formula: Callable[[str], Callable]
    """formula(namespace) -> backward(ctx, *grads), which calls torch.ops.<namespace>.<name>."""
    setup_context: Callable
    """What the forward saves for the formula (torch.library.register_autograd's setup_context)."""


AutocastPolicy = Literal["lower", "fp32", "promote"]
"""How an op runs under torch.autocast (see the module docstring): "lower" casts to the autocast dtype,
"fp32" to fp32, "promote" to the widest float dtype among the inputs."""
AUTOCAST: dict[str, AutocastPolicy] = {}
"""Op name -> its autocast policy, as register_op registered it."""
_AUTOCAST_DEVICES = ("cpu", "cuda")
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


def _autocast_target(policy: AutocastPolicy, device_type: str, args) -> torch.dtype | None:
    """The dtype the op's float inputs on `device_type` are cast to, or None for no cast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    if policy == "fp32":
        return torch.float32
    dtypes = {t.dtype for t in _tensors(args) if t.device.type == device_type and t.dtype in _CASTABLE}
    if len(dtypes) < 2:
        return None
    return torch.float32 if torch.float32 in dtypes else torch.float16 if torch.float16 in dtypes else torch.bfloat16


def _cast(a, device_type: str, dtype: torch.dtype):
    if isinstance(a, torch.Tensor):
        return a.to(dtype) if a.device.type == device_type and a.dtype in _CASTABLE else a
    if isinstance(a, (list, tuple)):
        return type(a)(_cast(v, device_type, dtype) for v in a)
    return a


def _cast_args(policy: AutocastPolicy, device_type: str, args: tuple) -> tuple:
    dtype = _autocast_target(policy, device_type, args)
    return args if dtype is None else tuple(_cast(a, device_type, dtype) for a in args)


def autocast(name: str, *args: Any) -> tuple:
    """`args` cast as `name`'s autocast kernel will cast them (identity when autocast is off on their
    device or the op has no policy). The public function calls it first, so that its checks, the
    backend choice and `ref` see the dtypes the kernels run in."""
    policy = AUTOCAST.get(name)
    if policy is None:
        return args
    for dev in {t.device.type for t in _tensors(args)} & set(_AUTOCAST_DEVICES):
        args = _cast_args(policy, dev, args)
    return args


class _autocast_off:
    """Turns autocast off on the devices of `args` for the `ref` path (a no-op when it is off)."""

    def __init__(self, args):
        self._ctx = [torch.autocast(d, enabled=False) for d in sorted({t.device.type for t in _tensors(args)})
                     if d in _AUTOCAST_DEVICES and torch.is_autocast_enabled(d)]

    def __enter__(self):
        for c in self._ctx:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)


_autocast_libraries: dict[str, torch.library.Library] = {}


def _register_autocast(ns: str, name: str, policy: AutocastPolicy) -> None:
    """An Autocast<Device> kernel for <ns>::<name>: casts the inputs by `policy`, then redispatches
    below autocast (torch.library.register_autocast casts to one fixed dtype; this reads the autocast
    dtype of the call). Also registered as the op's Python kernel for that key, which the tracers
    (torch.compile, make_fx) dispatch to."""
    lib = _autocast_libraries.get(ns)
    if lib is None:
        lib = _autocast_libraries[ns] = torch.library.Library(ns, "IMPL")
    overload = getattr(getattr(torch.ops, ns), name).default
    for dev in _AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(dev)
        key = getattr(torch._C.DispatchKey, key_name)

        def py_kernel(*args, _dev=dev, _key=key):
            # Cast first: autocast's "enabled" is the absence of its key from the excluded set, so
            # inside the guard torch.is_autocast_enabled() reads False.
            args = _cast_args(policy, _dev, args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*args)

        if overload.has_kernel_for_dispatch_key(key):
            overload.py_kernels.pop(key)
        overload.py_impl(key)(py_kernel)
        lib.impl(name, lambda _keyset, *args, _k=py_kernel: _k(*args), key_name, with_keyset=True)


REGISTERED: dict[str, dict[str, str]] = {}
"""Op name -> per backend, why its kernels are unavailable (the `unavailable` of choose())."""
_NAMESPACES: dict[str, list[str]] = {}
_triton_library: torch.library.Library | None = None


def register_op(name: str, *, fake: Callable, backward: Backward | None = None,
                triton: Callable[[], Mapping[str, Callable]] | None = None,
                autocast: AutocastPolicy | None = None) -> dict[str, str]:
    """Registers `fake` (and the autograd of `backward`) for `name` in every namespace that carries it,
    after defining it under llmkern_triton from C++'s schema when `triton` is given: ``triton()``
    imports the Triton launchers and returns {op name: implementation} for `name` (and its backward).
    `autocast` registers the op's autocast kernels with that policy (module docstring); its backward
    gets none: it runs on the tensors the forward saved, already cast (a backward run inside an
    autocast region must not recast lora_linear's fp32 xa). Returns, per backend, why its kernels are
    unavailable; REGISTERED[name] keeps it."""
    if autocast is not None:
        if autocast not in ("lower", "fp32", "promote"):
            raise ValueError(f"register_op({name!r}): autocast must be 'lower', 'fp32' or 'promote', got {autocast!r}")
        AUTOCAST[name] = autocast

    def register(ns: str) -> None:
        torch.library.register_fake(f"{ns}::{name}")(fake)
        if backward is not None:
            torch.library.register_fake(f"{ns}::{backward.name}")(backward.fake)
            torch.library.register_autograd(f"{ns}::{name}", backward.formula(ns),
                                            setup_context=backward.setup_context)
        if autocast is not None:
            _register_autocast(ns, name, autocast)
        _NAMESPACES.setdefault(name, []).append(ns)

    unavailable: dict[str, str] = {}
    for b in ("cpu", "emu"):
        ext, ns = LIBRARIES[b]
        if not _ext.available(ext):
            unavailable[b] = f"llmkern.{ext}: {_ext.status(ext)}"
        elif not hasattr(getattr(torch.ops, ns), name):
            unavailable[b] = f"llmkern.{ext} was built without {ns}::{name} (rebuild it)"
        else:
            register(ns)
    if "cpu" in unavailable:
        unavailable["cuda"] = unavailable["cpu"]  # the CUDA kernels attach to the schema _C defines
    else:
        _ext.available("_C_cuda")  # loads them
    if triton is None:
        unavailable["triton"] = "not implemented for this op"
    else:
        try:
            _define_triton(triton())
            register(LIBRARIES["triton"][1])
        except Exception as e:  # triton missing, its kernels failed to import, or no schema: say so
            unavailable["triton"] = f"{type(e).__name__}: {e}"
    REGISTERED[name] = unavailable
    return unavailable


def _define_triton(impls: Mapping[str, Callable]) -> None:
    """Defines each op of `impls` under llmkern_triton with C++'s schema and its implementation for
    CPU tensors (the interpreter) and CUDA tensors."""
    global _triton_library
    if _triton_library is None:
        _triton_library = torch.library.Library(LIBRARIES["triton"][1], "FRAGMENT")
    schemas = {n: schema(n) for n in impls}  # all or nothing: a missing schema defines none
    for n, impl in impls.items():
        _triton_library.define(schemas[n])
        for key in ("CPU", "CUDA"):
            _triton_library.impl(n, impl, key)


def namespaces(name: str) -> tuple[str, ...]:
    """The namespaces in which `name` is registered on this machine (llmkern, llmkern_emu,
    llmkern_triton): where a per-namespace registration (autocast, vmap) goes."""
    return tuple(_NAMESPACES.get(name, ()))


_warned: set[tuple[str, str, str]] = set()


def _warn_once(op: str, chosen: str, skipped) -> None:
    text = "; ".join(f"{b} refused ({', '.join(r)})" for b, r in skipped)
    key = (op, chosen, text)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"llmkern.{op}: using the {chosen!r} backend because {text}", RuntimeWarning,
                      stacklevel=3)
