"""Triton kernel of llmkern::multi_tensor_sumsq (schema: csrc/ops/multi_tensor_sumsq.cpp).

fp32 only for short runs of squares, as the CPU and CUDA kernels: each of a program's 1024 lanes sums
64 squares of its 64Ki-element chunk in fp32, the lanes are summed in double into the chunk's
partial, and the partials are summed in double by one torch reduction on the device (no host
sync) into the float64 result. A chunk where a lane's fp32 sum is past FLT_MAX (a finite value above
1.8e19 squares past fp32's range) is summed again in double, so only an inf or nan element makes the
result so, which is the optimizers' overflow flag; the common path stays fp32. No atomics, so the
result does not depend on the order programs finish. One launch per tensor (triton_kernels/_optim.py
says why).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import AotConfig, variant
from llmkern.triton_kernels._optim import TL

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
    part = tl.sum(acc.to(tl.float64), axis=0)
    if tl.max((tl.abs(acc) > 3.4028234663852886e38).to(tl.int32), axis=0) != 0:  # rare: a square past FLT_MAX
        acc64 = tl.zeros([BLOCK], dtype=tl.float64)
        for k in range(0, CHUNK, BLOCK):
            offs = start + k + tl.arange(0, BLOCK)
            x64 = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32).to(tl.float64)
            acc64 += x64 * x64
        part = tl.sum(acc64, axis=0)
    tl.store(partial_ptr + pid, part)


AOT_CONFIGS: list[AotConfig] = [
    variant(_multi_tensor_sumsq_fwd_kernel, dict(CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4, num_stages=3), dtype=TL[dt],
            types={"x_ptr": f"*{TL[dt]}", "n": "i64", "partial_ptr": "*fp64"})
    for dt in (torch.float32, torch.float16, torch.bfloat16)]


def multi_tensor_sumsq_triton(tensors) -> torch.Tensor:
    """float64 [1] on tensors[0]'s device; the tensors were checked by the op (llmkern/ops/multi_tensor_sumsq.py)."""
    chunks = [triton.cdiv(t.numel(), CHUNK) for t in tensors]
    partial = torch.zeros(max(sum(chunks), 1), dtype=torch.float64, device=tensors[0].device)
    off = 0
    for t, c in zip(tensors, chunks):
        if c:
            _multi_tensor_sumsq_fwd_kernel[(c,)](t, t.numel(), partial[off:off + c], CHUNK=CHUNK, BLOCK=BLOCK)
        off += c
    return partial.sum().reshape(1)
