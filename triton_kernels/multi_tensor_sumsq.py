"""Triton kernel of llmkern::multi_tensor_sumsq (schema: csrc/ops/multi_tensor_sumsq.cpp).

fp32 only for short runs of squares, as the CPU and CUDA kernels: each of a program's 1024 lanes sums
64 squares of its 64Ki-element chunk in fp32, the lanes are summed in double into the chunk's
partial, and the partials are summed in double by one torch reduction on the device (no host
sync); the result is rounded to float32 once. No atomics, so the result does
not depend on the order programs finish. One launch per tensor, as for fused_adamw (see there).
A non-finite element makes the sum inf or nan, which is the optimizers' overflow flag.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from llmkern.triton_kernels.fused_adamw import _TL

# CHUNK = 64Ki elements per program, as the CUDA kernel's chunk (csrc/include/llmkern/
# multi_tensor_apply.cuh): the partials are 1/65536 of the input. BLOCK = 1024 elements per
# iteration, 4 warps: 8 values per thread per load, 16-byte vector loads of fp32.
CHUNK = 65536
BLOCK = 1024


@triton.jit
def _multi_tensor_sumsq_fwd_kernel(x_ptr, n, partial_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK  # int64: a tensor may pass 2^31 elements
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, CHUNK, BLOCK):
        offs = start + k + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid, tl.sum(acc.to(tl.float64), axis=0))


AOT_CONFIGS = [
    SimpleNamespace(kernel=_multi_tensor_sumsq_fwd_kernel,
                    signature={"x_ptr": f"*{_TL[dt]}", "n": "i64", "partial_ptr": "*fp64", "CHUNK": "constexpr",
                               "BLOCK": "constexpr"},
                    constexprs={"CHUNK": CHUNK, "BLOCK": BLOCK}, num_warps=4, num_stages=3,
                    name=f"x={_TL[dt]},w4,s3")
    for dt in (torch.float32, torch.float16, torch.bfloat16)
]


def multi_tensor_sumsq_triton(tensors) -> torch.Tensor:
    """float32 [1] on tensors[0]'s device; the checks are the C++ op's, with its wording."""
    device = tensors[0].device
    for j, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be on {device} like tensors[0], got {t.device}")
        if t.dtype not in _TL:
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be float32, float16 or bfloat16, got {t.dtype}")
        if t.numel() > 1 and not is_non_overlapping_and_dense(t):
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be dense (non-overlapping); got shape "
                               f"{tuple(t.shape)} and strides {t.stride()}; pass .contiguous()")
    chunks = [triton.cdiv(t.numel(), CHUNK) for t in tensors]
    partial = torch.zeros(max(sum(chunks), 1), dtype=torch.float64, device=device)
    off = 0
    for t, c in zip(tensors, chunks):
        if c:
            _multi_tensor_sumsq_fwd_kernel[(c,)](t, t.numel(), partial[off:off + c], CHUNK=CHUNK, BLOCK=BLOCK)
        off += c
    return partial.sum().float().reshape(1)
