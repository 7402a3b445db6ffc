"""The argument checks of the multi-tensor optimizer ops (fused_adamw_, fused_sgd_, multi_tensor_sumsq)
for the backends written in Python (triton, ref): the twin of csrc/include/llmkern/multi_tensor.h,
with its wording and exception types, so that every backend refuses the same input the same way
before it writes anything.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from llmkern.ops._backends import FP32_FP16_BF16

SCALARS = ("step", "found_inf", "grad_coef")


def check_scalar_tensors(scalars: Sequence[torch.Tensor], device: torch.device) -> None:
    """step, found_inf, grad_coef: float32 tensors of one element on the parameters' device."""
    for name, t in zip(SCALARS, scalars):
        if t.dtype != torch.float32 or t.numel() != 1:
            raise RuntimeError(f"{name} must be a float32 tensor with one element, got {t.dtype} with shape "
                               f"{tuple(t.shape)}")
        if t.device != device:
            raise RuntimeError(f"{name} must be on {device} like the parameters, got {t.device}")


def check_tensor_lists(lists: Mapping[str, Sequence[torch.Tensor]], optional: Sequence[str],
                       device: torch.device) -> None:
    """The first list is the reference; every other is as long (those named in `optional` may be
    empty), and tensor j of each is on `device`, fp32/fp16/bf16, with the reference's shape and strides,
    dense (multi_tensor.h check_tensor_lists)."""
    (ref_name, ref), *others = lists.items()
    for name, lst in others:
        if len(lst) != len(ref) and not (name in optional and not lst):
            raise RuntimeError(f"{name} has {len(lst)} tensors but {ref_name} has {len(ref)}"
                               + (" (it may also be empty)" if name in optional else ""))
    for name, lst in lists.items():
        for j, t in enumerate(lst):
            p = ref[j]
            if t.device != device:
                raise RuntimeError(f"{name}[{j}] must be on {device}, got {t.device}")
            if t.dtype not in FP32_FP16_BF16:
                raise RuntimeError(f"{name}[{j}] must be float32, float16 or bfloat16, got {t.dtype}")
            if t.shape != p.shape:
                raise RuntimeError(f"{name}[{j}] has shape {tuple(t.shape)} but {ref_name}[{j}] has shape "
                                   f"{tuple(p.shape)}")
            if t.numel() > 1 and (t.stride() != p.stride() or not is_non_overlapping_and_dense(t)):
                raise RuntimeError(f"{name}[{j}] must be dense with the same strides as {ref_name}[{j}] (strides "
                                   f"{t.stride()} vs {p.stride()}); pass .contiguous() tensors or tensors "
                                   f"created with torch.zeros_like(param)")


def check_model_copies(params: Sequence[torch.Tensor], model_copies: Sequence[torch.Tensor]) -> None:
    """With model copies, each param is the fp32 master of a 16-bit copy."""
    for j, c in enumerate(model_copies):
        if params[j].dtype != torch.float32 or c.dtype == torch.float32:
            raise RuntimeError(f"with model_copies, params[{j}] must be the float32 master and model_copies[{j}] "
                               f"float16 or bfloat16, got {params[j].dtype} and {c.dtype}")

