"""What the Triton optimizer kernels (fused_adamw, fused_sgd, multi_tensor_sumsq) share: the block
size, the store of an fp32 register value into a 16- or 32-bit state, and the AOT dtype names.

One launch per tensor: Triton has no portable way to walk a table of raw pointers of different
dtypes (and the interpreter, which the CPU tests use, cannot cast integers to pointers), so the
multi-tensor launch is the CUDA kernels' job (csrc/include/llmkern/multi_tensor_apply.cuh). The
argument checks are the ops layer's (llmkern/ops/_multi_tensor.py), made before any launch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE, AotConfig, variant

TL = TL_DTYPE
"""torch dtype -> Triton type name, for the AOT signatures."""

# BLOCK=1024 elements, 4 warps: each thread moves 8 fp32 values per array (two 16-byte vectors), the
# usual choice for a bandwidth-bound elementwise kernel on A100/H100.
BLOCK = 1024


@triton.jit
def to_storage(x, ptr):
    """fp32 -> the element type of ptr, rounding to nearest even. bf16 is rounded by hand: the
    interpreter truncates on .to(tl.bfloat16) (504 of 1024 randn values differed from torch), and
    on GPUs the three integer ops are free in these memory-bound kernels. NaN stays NaN."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


def aot_variant(kernel, pointers: dict, labels: dict, scalars: dict, **constexprs) -> AotConfig:
    """The AotConfig of an optimizer kernel at BLOCK, 4 warps, 3 stages: `pointers` maps each tensor
    argument to its torch dtype, `scalars` the others to their Triton types; `labels` names the dtypes
    in the report ({"p": fp32, "copy": None} -> "p=fp32,copy=-")."""
    return variant(kernel, dict(constexprs, BLOCK=BLOCK, num_warps=4, num_stages=3),
                   types={**{a: f"*{TL[d]}" for a, d in pointers.items()}, **scalars},
                   dtype=",".join(f"{k}={TL[d] if d is not None else '-'}" for k, d in labels.items()))
