"""Norm layers over the fused ops :func:`llmkern.ops.rms_norm` and :func:`llmkern.ops.layer_norm`.

``RMSNorm`` holds one ``weight`` (C), the state-dict key of transformers' LlamaRMSNorm and
GemmaRMSNorm, so their checkpoints load as they are; ``convention`` says how the weight applies
("llama": ``w·x̂`` with ones init, "gemma": ``(1 + w)·x̂`` with zeros init). ``forward(x, residual)``
also fuses the residual add of a pre-norm block and returns ``(y, x + residual)``.
``LayerNorm`` is ``nn.LayerNorm`` (same parameters, state dict and init) running the fused op.
``backend`` (None: automatic) picks the op's backend.
"""
from __future__ import annotations

import torch
from torch import nn

from llmkern.ops import _backends
from llmkern.ops.layer_norm import layer_norm
from llmkern.ops.rms_norm import CONVENTIONS, Convention, rms_norm

__all__ = ["RMSNorm", "LayerNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (see the module docstring). x: (..., C)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, convention: Convention = "llama", device=None, dtype=None,
                 backend: _backends.Backend | None = None):
        super().__init__()
        if convention not in CONVENTIONS:
            raise ValueError(f"RMSNorm: convention must be one of {CONVENTIONS}, got {convention!r}")
        init = torch.ones if convention == "llama" else torch.zeros
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps, self.convention, self.backend = eps, convention, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual=residual, convention=self.convention, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, convention={self.convention}, backend={self.backend or 'auto'}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the fused op (weight and bias optional as there: elementwise_affine, bias)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: _backends.Backend | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm: only the last dimension is normalized, got normalized_shape "
                             f"{self.normalized_shape}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)
