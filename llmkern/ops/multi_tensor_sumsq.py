"""multi_tensor_sumsq(tensors) -> float32 [1]: the sum of squares of all elements of all tensors, inf or
nan when any element is. The optimizers' overflow check and global gradient norm in one read.

Backends: "cpu" (C++ kernel, fp32 accumulation per 64Ki span, double across spans) and "ref"
(torch._foreach_norm; fast and sync-free on GPUs, 0.26 GB/s for fp16 on this CPU).
Schema: csrc/ops/multi_tensor_sumsq.cpp.
"""
from __future__ import annotations

from typing import Sequence

import torch

from llmkern.ops._backends import Backend, choose, register_compiled_op

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = {"cpu": _FLOATS, "ref": _FLOATS + (torch.float64,)}
SUPPORTED: tuple[Backend, ...] = ("cpu", "ref")


def _fake(tensors):
    return tensors[0].new_empty(1, dtype=torch.float32) if tensors else torch.empty(1)


UNAVAILABLE: dict[str, str] = register_compiled_op("multi_tensor_sumsq", _fake, backends=("cpu",))


def multi_tensor_sumsq(tensors: Sequence[torch.Tensor], *, backend: Backend | None = None) -> torch.Tensor:
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    b = choose("multi_tensor_sumsq", tensors[:1], DTYPES, backend, SUPPORTED, UNAVAILABLE)
    if b == "cpu":
        return torch.ops.llmkern.multi_tensor_sumsq(tensors)
    return multi_tensor_sumsq_ref(tensors)


def multi_tensor_sumsq_ref(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 per-tensor norms (fp16 norms overflow past 65504), squared and summed."""
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(list(tensors), 2, dtype=acc)
    return torch.stack(norms).square().sum().reshape(1).to(acc)
