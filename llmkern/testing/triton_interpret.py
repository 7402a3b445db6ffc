"""Run Triton kernels on CPU tensors with the Triton interpreter (TRITON_INTERPRET=1).

When the variable is read (triton 3.8.0, checked in triton/runtime/jit.py and knobs.py):
`triton.knobs.runtime.interpret` reads TRITON_INTERPRET from the environment each time it is
asked, but it is asked once per kernel, by the `@triton.jit` decorator: with it set the decorator
returns an `InterpretedFunction`, otherwise a `JITFunction` that needs a GPU driver to launch.
So the variable must be set before the module that defines a kernel is imported; setting it at
launch time changes nothing for kernels that already exist. tests/conftest.py therefore calls
`enable_triton_interpreter()` at its own import time, before pytest imports any test module, on
machines without a GPU. `is_interpreted(kernel)` tells a test which kind it got.

Two interpreter gaps are patched here (both idempotent, both applied only under the interpreter):

* `tl.dot` on bf16 operands. The interpreter stores bf16 as uint16 bit patterns and its
  `create_dot` calls np.matmul on them, multiplying the integers (upstream triton-lang/triton
  #11584): 16 x 16 x 16 randn gives errors of ~2.5e10. We widen the bit patterns to fp32
  (`(u16.astype(u32) << 16).view(f32)`, exact: bf16 is the top half of an fp32) before the
  matmul. The patch is applied only if a 1x1 probe (1.0 * 1.0) shows the bug, so it switches
  itself off once triton is fixed.
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
