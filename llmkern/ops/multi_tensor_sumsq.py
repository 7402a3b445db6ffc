"""multi_tensor_sumsq(tensors) -> float64 [1]: the sum of squares of all elements of all tensors, inf or
nan when any element is. The optimizers' overflow check and global gradient norm in one read.

The result is float64 so that it never overflows for finite inputs: a finite fp32 or bf16 gradient
of 1.9e19 has a square past fp32's 3.4e38, and an fp32 sum made the optimizers skip such a step as if
it had overflowed (csrc/ops/multi_tensor_sumsq.cpp). Every compiled backend squares and adds in fp32
over short runs (512 squares on the CPU, 128 per CUDA thread, 64 per Triton lane), within 2x of plain
PyTorch's fp32 error, and in double above them; a run whose fp32 sum is not finite is summed again in
double, so only an inf or nan element gives a non-finite result, and the fast path stays fp32. None
syncs with the host or uses atomics, so each is deterministic:
  cpu     C++ kernel (OpenMP, vectorized)
  cuda    csrc/ops/cuda/multi_tensor_sumsq_kernel.cu: a block reduction per chunk, then one block
          sums the partials (also run on CPU tensors under the emulator as "emu")
  triton  triton_kernels/multi_tensor_sumsq.py: a program per chunk, the partials summed by torch
  ref     torch._foreach_norm accumulated in fp64; sync-free on GPUs, slow on this CPU (fp16 norms
          in fp32 ran at 0.26 GB/s)
Schema: csrc/ops/multi_tensor_sumsq.cpp.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from llmkern.ops import _backends
from llmkern.ops._backends import FP32_FP16_BF16, FP32_FP16_BF16_FP64, Backend

__all__ = ["multi_tensor_sumsq", "multi_tensor_sumsq_ref", "UNAVAILABLE"]

DTYPES = {"cpu": FP32_FP16_BF16, "cuda": FP32_FP16_BF16, "emu": FP32_FP16_BF16, "triton": FP32_FP16_BF16,
          "ref": FP32_FP16_BF16_FP64}


def _fake(tensors):
    return tensors[0].new_empty(1, dtype=torch.float64)


def check_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """The checks of csrc/ops/multi_tensor_sumsq.h with its wording, for the Triton backend."""
    device = tensors[0].device
    for j, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be on {device} like tensors[0], got {t.device}")
        if t.dtype not in FP32_FP16_BF16:
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be float32, float16 or bfloat16, got {t.dtype}")
        if t.numel() > 1 and not is_non_overlapping_and_dense(t):
            raise RuntimeError(f"multi_tensor_sumsq: tensors[{j}] must be dense (non-overlapping); got shape "
                               f"{tuple(t.shape)} and strides {t.stride()}; pass .contiguous()")


def _triton():
    from llmkern.triton_kernels.multi_tensor_sumsq import multi_tensor_sumsq_triton

    def multi_tensor_sumsq_triton_op(tensors):
        if not tensors:
            raise RuntimeError("multi_tensor_sumsq: tensors must not be empty (the result's device comes from "
                               "tensors[0])")
        check_tensors(tensors)
        return multi_tensor_sumsq_triton(tensors)

    return {"multi_tensor_sumsq": multi_tensor_sumsq_triton_op}


UNAVAILABLE: dict[str, str] = _backends.register_op("multi_tensor_sumsq", fake=_fake, triton=_triton)


def multi_tensor_sumsq(tensors: Sequence[torch.Tensor], *, backend: Backend | None = None) -> torch.Tensor:
    """Sum of squares of every element of `tensors` (any shapes, dense, one device), as a float64
    tensor of one element on their device; zeros(1) on the CPU for an empty list."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.float64)
    device = tensors[0].device
    for j, t in enumerate(tensors):
        if t.device != device:  # before dispatch: a CPU + meta list would otherwise reach the fake
            raise ValueError(f"multi_tensor_sumsq: tensors[{j}] is on {t.device} but tensors[0] is on {device}; "
                             f"one call takes tensors on one device")
    b = _backends.choose("multi_tensor_sumsq", tensors[:1], DTYPES, backend)
    return _backends.run("multi_tensor_sumsq", b, multi_tensor_sumsq_ref, tensors)


def multi_tensor_sumsq_ref(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor norms accumulated in fp64, squared and summed in fp64 (for fp64 tensors: the oracle).
    fp32 norms squared were 10x plain PyTorch's fp32 error (the rounding of the norm doubles when
    squared: 11 vs 1.1 on a sum of 6.3e7); fp16 norms would overflow past 65504."""
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float64)
    return torch.stack(norms).square().sum().reshape(1)
