"""Liger-Kernel's Triton kernels in the Triton interpreter (triton 3.8) on CPU tensors, for the tests of
the fused-op benches' Liger adapters (test_liger_adapters.py, test_liger_benches.py).

The interpreter runs llmkern's own kernels as they are (they do fp32 math on fp32 scalars); Liger's
kernels hit three gaps of it, which :func:`bridge_interpreter` closes for the duration of a
monkeypatch context:

- a Python float kernel argument stays a Python float, where a compiled kernel gets an fp32 scalar:
  Liger's ``eps.to(tl.float32)`` (rms_norm, layer_norm) and ``gate_multiplier.to(tl.float32)``
  (swiglu) fail with "'float' object has no attribute 'to'". The bridge passes an fp32 scalar, as
  the compiler does.
- ``triton.language.extra.libdevice`` functions are stubs the interpreter does not replace (they
  return None): Liger's rms_norm and layer_norm import ``rsqrt``, geglu and cross_entropy ``tanh``
  from there. The bridge puts tl.math.rsqrt and a sigmoid-based tanh in their place.
- bf16 values are kept as their uint16 bits, and arithmetic on two bf16 operands runs on those
  integers: Liger's rope (its math is in the input dtype) and rms_norm's Llama-casting backward (the
  weight gradient's products in bf16) give garbage (1e38, NaN). The bridge computes bf16 arithmetic
  in fp32 and rounds the result to bf16 to nearest even, as the GPU does.

cross_entropy and fused_linear_cross_entropy (fp32 math) run without the bridge.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _rsqrt(x):
    return tl.math.rsqrt(x)


LIBDEVICE = {"tanh": _tanh, "rsqrt": _rsqrt}
"""libdevice functions Liger's ops import -> interpreter-runnable replacements (fp32 math either way)."""


def bridge_interpreter(mp: pytest.MonkeyPatch) -> list[str]:
    """Closes the three gaps (module docstring) through ``mp``; returns the liger module.function
    names whose libdevice import was replaced. Import liger_kernel first."""
    import triton.runtime.interpreter as interp

    implicit_cvt = interp._implicit_cvt

    def fp32_scalars(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return implicit_cvt(arg)

    mp.setattr(interp, "_implicit_cvt", fp32_scalars)

    def widened(data):  # bf16 as the interpreter stores it (uint16 bits) -> fp32 values
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16).float().numpy()

    def narrowed(data):  # fp32 values -> bf16 bits, rounded to nearest even as the GPU does
        return torch.from_numpy(np.ascontiguousarray(data)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    binary_op, unary_op = interp.InterpreterBuilder.binary_op, interp.InterpreterBuilder.unary_op

    def bf16_binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar != tl.bfloat16 or rhs.dtype.scalar != tl.bfloat16:
            return binary_op(self, lhs, rhs, op)
        out = op(widened(lhs.data), widened(rhs.data))
        return interp.TensorHandle(narrowed(out) if out.dtype == np.float32 else out, tl.bfloat16)

    def bf16_unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return unary_op(self, arg, op)
        return interp.TensorHandle(narrowed(op(widened(arg.data))), tl.bfloat16)

    mp.setattr(interp.InterpreterBuilder, "binary_op", bf16_binary_op)
    mp.setattr(interp.InterpreterBuilder, "unary_op", bf16_unary_op)
    replaced = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("liger_kernel.ops.") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if attr in LIBDEVICE and getattr(value, "__module__", "").startswith("triton.language.extra"):
                mp.setattr(mod, attr, LIBDEVICE[attr])
                replaced.append(f"{name}.{attr}")
    return replaced

