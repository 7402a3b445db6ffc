"""Loss modules over :func:`llmkern.ops.cross_entropy` and :func:`llmkern.ops.fused_linear_cross_entropy`.

``CrossEntropyLoss()(logits, labels)``: nn.CrossEntropyLoss's call for class-index targets, without
the fp32 copy of the logits, plus an optional z-loss. ``FusedLinearCrossEntropyLoss()(hidden,
weight, labels)``: the LM head and the loss in one op that never holds the (T, V) logits; pass the
head's ``weight`` (``model.lm_head.weight``) so that its gradient reaches it.
"""
from __future__ import annotations

import torch
from torch import nn

from llmkern.ops import _backends
from llmkern.ops.cross_entropy import Reduction, cross_entropy
from llmkern.ops.fused_linear_cross_entropy import DEFAULT_MAX_CHUNK_BYTES, fused_linear_cross_entropy

__all__ = ["CrossEntropyLoss", "FusedLinearCrossEntropyLoss"]


class CrossEntropyLoss(nn.Module):
    """``cross_entropy(logits (..., V), labels (...))`` with fixed options."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 reduction: Reduction = "mean", backend: _backends.Backend | None = None):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.z_loss = ignore_index, label_smoothing, z_loss
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, reduction=self.reduction, backend=self.backend)


class FusedLinearCrossEntropyLoss(CrossEntropyLoss):
    """``cross_entropy(hidden·weightᵀ, labels)`` in chunks of tokens (see the module docstring)."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 reduction: Reduction = "mean", max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 backend: _backends.Backend | None = None):
        super().__init__(ignore_index, label_smoothing, z_loss, reduction, backend)
        self.max_chunk_bytes = max_chunk_bytes

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=self.ignore_index,
                                          label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                          reduction=self.reduction, max_chunk_bytes=self.max_chunk_bytes,
                                          backend=self.backend)
