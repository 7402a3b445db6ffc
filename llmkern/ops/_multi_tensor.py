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
_INT64_MAX = (1 << 63) - 1


def check_hyper(value, name: str, lo: float, lo_open: bool, hi: float, hi_open: bool) -> float:
    """value as a float, or ValueError unless lo <(=) value <(=) hi (NaN never is): multi_tensor.h check_hyper,
    with its message. A value that is not a real number is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not ((v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {v:g}")
    return v


def check_int64(value, name: str, lo: int = -_INT64_MAX - 1) -> int:
    """value as an int in [lo, 2^63): the schema's `int`."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be an int64 >= {lo}, got {value!r}")
    return value


def check_step(step: torch.Tensor, found_inf: torch.Tensor) -> None:
    """step >= 1 wherever an update happens (found_inf == 0), before anything is written: csrc/include/
    llmkern/multi_tensor.h check_step. A CPU step is read on the host (ValueError). A CUDA step is not
    (that would sync): the kernels write nothing when step < 1, as on an overflow, and
    torch._assert_async raises the device-side assert, so the error is not silent."""
    if step.device.type == "cpu":
        if float(found_inf) == 0.0 and not float(step) >= 1.0:
            raise ValueError(f"step must be >= 1 (the 1-based number of this update) when found_inf is 0, got "
                             f"{float(step):g}")
    elif step.device.type == "cuda":
        torch._assert_async(((step >= 1.0) | (found_inf != 0.0)).reshape(()),
                            "step must be >= 1 (the 1-based number of this update) when found_inf is 0")


def check_scalar_tensors(scalars: Sequence[torch.Tensor], device: torch.device) -> None:
    """step, found_inf, grad_coef: float32 tensors of one element on the parameters' device."""
    for name, t in zip(SCALARS, scalars):
        if t.dtype != torch.float32 or t.numel() != 1:
            raise RuntimeError(f"{name} must be a float32 tensor with one element, got {t.dtype} with shape "
                               f"{tuple(t.shape)}")
        if t.device != device:
            raise RuntimeError(f"{name} must be on {device} like the parameters, got {t.device}")


def check_tensor_lists(lists: Mapping[str, Sequence[torch.Tensor]], optional: Sequence[str],
                       device: torch.device, *, fp64: bool = False) -> None:
    """The first list is the reference; every other is as long (those named in `optional` may be
    empty), and tensor j of each is on `device`, fp32/fp16/bf16, with the reference's shape and strides,
    dense (multi_tensor.h check_tensor_lists). fp64 (the reference backend, which is also the fp64
    oracle): tensor j of every list is float64 when the reference's is, and none is otherwise."""
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
            if fp64 and p.dtype == torch.float64:
                if t.dtype != torch.float64:
                    raise RuntimeError(f"{name}[{j}] must be float64 like {ref_name}[{j}] (the fp64 reference takes "
                                       f"float64 in every list), got {t.dtype}")
            elif t.dtype not in FP32_FP16_BF16:
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
        if params[j].dtype == c.dtype == torch.float64:
            continue  # the fp64 oracle
        if params[j].dtype != torch.float32 or c.dtype == torch.float32:
            raise RuntimeError(f"with model_copies, params[{j}] must be the float32 master and model_copies[{j}] "
                               f"float16 or bfloat16, got {params[j].dtype} and {c.dtype}")

