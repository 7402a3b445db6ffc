"""Run Triton kernels on CPU tensors with the Triton interpreter (TRITON_INTERPRET=1).

When the variable is read (triton 3.8.0, checked in triton/runtime/jit.py and knobs.py):
`triton.knobs.runtime.interpret` reads TRITON_INTERPRET from the environment each time it is
asked, but it is asked once per kernel, by the `@triton.jit` decorator: with it set the decorator
returns an `InterpretedFunction`, otherwise a `JITFunction` that needs a GPU driver to launch.
So the variable must be set before the module that defines a kernel is imported; setting it at
launch time changes nothing for kernels that already exist. tests/conftest.py therefore calls
`enable_triton_interpreter()` at its own import time, before pytest imports any test module, on
machines without a GPU. `is_interpreted(kernel)` tells a test which kind it got.

Three interpreter gaps are patched here (all idempotent, all applied only under the interpreter):

* `tl.dot` on bf16 operands. The interpreter stores bf16 as uint16 bit patterns and its
  `create_dot` calls np.matmul on them, multiplying the integers (upstream triton-lang/triton
  #11584): 16 x 16 x 16 randn gives errors of ~2.5e10. We widen the bit patterns to fp32
  (`(u16.astype(u32) << 16).view(f32)`, exact: bf16 is the top half of an fp32) before the
  matmul. The patch is applied only if a 1x1 probe (1.0 * 1.0) shows the bug, so it switches
  itself off once triton is fixed.
* fp32 -> bf16 casts (`x.to(tl.bfloat16)`). The interpreter truncates the mantissa (its
  `cast_impl` passes no rounding mode to `_convert_float`), where compiled kernels round to nearest
  even: 1.0040 became 1.0 instead of 1.0078, a full bf16 ulp on about half of all outputs, which
  fails the 2x rule of a kernel that rounds once. The cast is replaced by round-to-nearest-even on
  the fp32 bit patterns (NaN stays NaN), applied only if a probe (1 + 2^-8 + 2^-10) shows the bug.
* `@triton.autotune`. The autotuner times each config with `driver.active.get_benchmarker()`,
  and with no GPU there is no active driver ("0 active drivers"). Under the interpreter timings
  mean nothing, so the benchmarker is a stub returning the same time for every config; the
  autotuner's min() then keeps the first config, which is the one the kernel runs with.
* Bounds. The interpreter turns a pointer into a raw host address and loads or stores through it
  (triton/runtime/interpreter.py: `_interpreter.load/store`), so a wrong mask reads a neighbour's
  memory silently or, far enough out, kills the process: a planted unmasked store aborted the
  whole pytest run (issue 10: rc 134; 139, SIGSEGV, for the store in
  tests/testing/test_triton_bounds.py). Every masked-in address of a load, store or atomic is now
  checked, before the access, against the tensor arguments of the launch: all addresses of one
  access must lie in the bytes of one argument (its view, from its lowest to its highest
  element), or the launch raises IndexError naming the kernel, the program id and the argument,
  which the test reports as one failure. The check costs two numpy reductions per access (the
  min and max address): over tests/ops/test_*triton*.py, 34,310 checked accesses took 10.2 s of a
  651 s run (1.6%; a machine loaded ~13 on 2 cores), and the run's CPU time went from 82 s to 86 s.
"""
from __future__ import annotations

import os

import numpy as np

_patched = False


def enable_triton_interpreter() -> None:
    """Make `@triton.jit` kernels defined from now on run in the interpreter on CPU tensors.

    Sets TRITON_INTERPRET=1 (in os.environ, so spawned children inherit it, and in triton.knobs)
    and applies the bf16 `tl.dot` and autotune patches. Kernels decorated before this call stay
    compiled kernels: call it before importing kernel modules (conftest does). Idempotent.
    """
    global _patched
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    triton.knobs.runtime.interpret = True
    if not _patched:
        _patch_bf16_dot()
        _patch_bf16_cast()
        _patch_autotune_benchmarker()
        _patch_bounds_check()
        _patched = True


def is_interpreted(kernel) -> bool:
    """True when `kernel` (a @triton.jit or @triton.autotune object) will run in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def _bf16_as_f32(handle):
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if getattr(handle.dtype, "scalar", handle.dtype) != tl.bfloat16:
        return handle
    widened = (handle.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return TensorHandle(widened, tl.float32)


def _bf16_dot_is_broken(builder_cls) -> bool:
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    one = TensorHandle(np.array([[0x3F80]], dtype=np.uint16), tl.bfloat16)  # bf16 1.0
    acc = TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    out = builder_cls.create_dot(builder_cls(), one, one, acc, None, None)
    return float(out.data[0, 0]) != 1.0  # the bug gives 0x3F80 ** 2 = 264257536


def _patch_bf16_dot() -> None:
    from triton.runtime import interpreter

    cls = interpreter.InterpreterBuilder
    if getattr(cls.create_dot, "_llmkern_bf16", False) or not _bf16_dot_is_broken(cls):
        return
    original = cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _bf16_as_f32(a), _bf16_as_f32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._llmkern_bf16 = True
    cls.create_dot = create_dot


def _f32_to_bf16_rtne(data):
    """bf16 bit patterns (uint16) of fp32 values, rounded to nearest even as the GPU rounds."""
    import numpy as np

    u = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)


def _patch_bf16_cast() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.interpreter import TensorHandle

    cls = interpreter.InterpreterBuilder
    if getattr(cls.cast_impl, "_llmkern_bf16", False):
        return
    probe = TensorHandle(np.array([1.0 + 2.0 ** -8 + 2.0 ** -10], dtype=np.float32), tl.float32)
    if int(cls.cast_impl(cls(), probe, tl.bfloat16).data[0]) == 0x3F81:  # rounded up: no bug
        return
    original = cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_f32_to_bf16_rtne(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._llmkern_bf16 = True
    cls.cast_impl = cast_impl
    # The create_* casts are lambdas that look up self.cast_impl at call time: they pick this up.


def _stub_benchmarker(kernel_call, quantiles=None, **kwargs):
    """Every config 'takes' 1.0 ms; the kernel is not run (it runs once, after the choice)."""
    return [1.0, 1.0, 1.0] if quantiles is not None else 1.0


def _patch_autotune_benchmarker() -> None:
    import triton
    from triton.runtime import autotuner

    cls = autotuner.Autotuner
    if getattr(cls, "_llmkern_stub", False):
        return
    original = cls.__dict__["do_bench"]  # a functools.cached_property in 3.8.0

    def do_bench(self):
        if triton.knobs.runtime.interpret:
            return _stub_benchmarker
        return original.__get__(self, cls)

    cls.do_bench = property(do_bench)
    cls._llmkern_stub = True


class _Launch:
    """The kernel being interpreted and the byte range of each tensor argument (set per launch)."""

    kernel: str = ""
    ranges: list[tuple[str, int, int]] = []
    active: bool = False


def _byte_range(t) -> tuple[int, int]:
    """[first, end) bytes of tensor t's elements: its view, whatever the strides (empty: [p, p))."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    hi = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()


def _tensor_ranges(name, arg, out):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if hasattr(arg, "data_ptr"):
        from triton.runtime.interpreter import _unwrap_tensor

        out.append((name, *_byte_range(_unwrap_tensor(arg))))
    elif isinstance(arg, TensorDescriptor):
        _tensor_ranges(name, arg.base, out)
    elif isinstance(arg, tuple):
        for i, a in enumerate(arg):
            _tensor_ranges(f"{name}[{i}]", a, out)


def _check_access(kind: str, ptrs, mask) -> None:
    """Raise IndexError unless every address `mask` lets through lies in one tensor argument."""
    if not _Launch.active:
        return
    addr = ptrs.data
    if mask is not None:  # an int1 mask may be held as 0/1 integers: index with it as bools
        addr = addr[np.broadcast_to(mask.data.astype(bool, copy=False), addr.shape)]
    if addr.size == 0:
        return
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    lo, hi = int(addr.min()), int(addr.max()) + width
    if any(start <= lo and hi <= end for _, start, end in _Launch.ranges):
        return
    _raise_out_of_bounds(kind, addr, width)


def _raise_out_of_bounds(kind: str, addr, width: int):
    from triton.runtime.interpreter import interpreter_builder

    addr = addr.astype(np.int64)  # host addresses are < 2^63

    def inside(start, end):
        return (addr >= start) & (addr + width <= end)

    where = f"Triton kernel '{_Launch.kernel}' at program_id {tuple(interpreter_builder.grid_idx)}"
    if not _Launch.ranges:
        raise IndexError(f"out-of-bounds {kind} in {where}: it has no tensor argument to address")
    # The argument the access meant: the one holding most of its addresses, else the nearest below.
    counts = [int(inside(start, end).sum()) for _, start, end in _Launch.ranges]
    if max(counts) > 0:
        i = counts.index(max(counts))
    else:
        below = [(int(addr.min()) - start, j) for j, (_, start, _e) in enumerate(_Launch.ranges)
                 if start <= int(addr.min())]
        i = min(below)[1] if below else 0
    name, start, end = _Launch.ranges[i]
    out = addr[~inside(start, end)]
    first = int(out[0]) - start
    raise IndexError(
        f"out-of-bounds {kind} in {where}: {out.size} of {addr.size} addresses the mask lets through lie "
        f"outside tensor argument '{name}' ({end - start} bytes); the first is at byte offset {first} "
        f"from its start. A missing or wrong mask? (bounds check: llmkern/testing/triton_interpret.py)")


def _patch_bounds_check() -> None:
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(executor, "_llmkern_bounds", False):
        return
    init_args, call = executor._init_args_hst, executor.__call__
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def _init_args_hst(self, args_dev, kwargs):
        # The host copies are what the kernel addresses (the same memory for CPU tensors).
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges = []
        for name, arg in [*zip(self.arg_names, args_hst), *kwargs_hst.items()]:
            _tensor_ranges(name, arg, ranges)
        _Launch.kernel, _Launch.ranges, _Launch.active = self.fn.__name__, ranges, True
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            _Launch.active = False

    def create_masked_load(self, ptrs, mask, other, *rest):
        _check_access("load", ptrs, mask)
        return load(self, ptrs, mask, other, *rest)

    def create_masked_store(self, ptrs, value, mask, *rest):
        _check_access("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    def create_atomic_rmw(self, op, ptr, val, mask, *rest):
        _check_access("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *rest)

    def create_atomic_cas(self, ptr, cmp, val, *rest):
        _check_access("atomic", ptr, None)
        return cas(self, ptr, cmp, val, *rest)

    executor._init_args_hst, executor.__call__ = _init_args_hst, __call__
    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = create_atomic_rmw, create_atomic_cas
    executor._llmkern_bounds = True
