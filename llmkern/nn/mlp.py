"""The gated MLP of LLaMA-family decoders over the fused activations of :mod:`llmkern.ops.swiglu`.

``GatedMLP``: ``down_proj(act(gate_proj(x)) · up_proj(x))`` with act silu (SwiGLU: Llama, Mistral,
Qwen2/3) or gelu (GeGLU: Gemma). The projections stay ``nn.Linear`` with transformers' names, so
checkpoints load as they are and LoRA (llmkern.peft or PEFT) can wrap them; the activation and the
product are one fused op that keeps only gate and up for its backward.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from llmkern.ops import _backends
from llmkern.ops.swiglu import geglu, swiglu

__all__ = ["GatedMLP", "GatedActivation", "gated_activation"]

GatedActivation = Literal["silu", "gelu", "gelu_tanh"]
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: GatedActivation,
                     backend: _backends.Backend | None = None) -> torch.Tensor:
    """``act(gate)·up`` through the fused op of the activation."""
    if activation == "silu":
        return swiglu(gate, up, backend=backend)
    if activation in ("gelu", "gelu_tanh"):
        return geglu(gate, up, "tanh" if activation == "gelu_tanh" else "none", backend=backend)
    raise ValueError(f"gated_activation: activation must be one of {_ACTIVATIONS}, got {activation!r}")


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x))·up_proj(x))`` (see the module docstring). x: (..., C)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: GatedActivation = "silu",
                 bias: bool = False, device=None, dtype=None, backend: _backends.Backend | None = None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GatedMLP: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self.activation, self.backend))
