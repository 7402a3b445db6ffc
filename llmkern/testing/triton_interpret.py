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
"""
from __future__ import annotations

import os

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
