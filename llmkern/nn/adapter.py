"""Bottleneck adapters over the fused op :func:`llmkern.ops.adapter_bottleneck`.

``Adapter`` (Houlsby et al.): ``h + s·up(act(down(LN?(h))))`` applied to a sublayer's output, in
series. ``ParallelAdapter`` (He et al.): ``sublayer(x) + s·up(act(down(LN?(x))))``, beside the sublayer.
Init: down ~ N(0, 0.01²)-ish Kaiming, up = 0, so a fresh adapter is the identity (series) / adds 0.
State-dict keys: ``down.weight`` (R, C), ``down.bias``, ``up.weight`` (C, R), ``up.bias``, ``ln.*``.
``backend`` (None: automatic, see :mod:`llmkern.ops._backends`) picks the op's backend; the backward
keeps only x, the (..., R) fp32 pre-activation and the LayerNorm row statistics.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmkern.ops import _backends
from llmkern.ops.adapter_bottleneck import ACTIVATIONS, adapter_bottleneck

__all__ = ["Adapter", "ParallelAdapter"]


class _Bottleneck(nn.Module):
    _llmkern_peft = True

    def __init__(self, channels: int, bottleneck: int, activation: str = "relu", scale: float = 1.0,
                 layer_norm: bool = False, device=None, dtype=None, backend: _backends.Backend | None = None):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"{type(self).__name__}: bottleneck must be >= 1, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        kw = {"device": device, "dtype": dtype}
        if backend is not None and backend not in _backends.BACKENDS:
            raise ValueError(f"{type(self).__name__}: unknown backend {backend!r}; expected one of "
                             f"{_backends.BACKENDS} or None (automatic)")
        self.activation, self.scale, self.disabled, self.backend = activation, scale, False, backend
        self.ln = nn.LayerNorm(channels, **kw) if layer_norm else None
        self.down = nn.Linear(channels, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, channels, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        ln_w = self.ln.weight if self.ln is not None else None
        ln_b = self.ln.bias if self.ln is not None else None
        eps = self.ln.eps if self.ln is not None else 1e-5
        return adapter_bottleneck(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scale,
                                  self.activation, ln_w, ln_b, eps, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"activation={self.activation}, scale={self.scale}, disabled={self.disabled}, "
                f"backend={self.backend or 'auto'}")


class Adapter(_Bottleneck):
    """Series adapter: ``forward(h) = h + s·up(act(down(LN?(h))))``. h: (..., C)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.disabled else self._run(h, None)


class ParallelAdapter(_Bottleneck):
    """Parallel adapter: ``forward(x, sublayer_out) = sublayer_out + s·up(act(down(LN?(x))))``."""

    def forward(self, x: torch.Tensor, sublayer_out: torch.Tensor) -> torch.Tensor:
        return sublayer_out if self.disabled else self._run(x, sublayer_out)
