"""LoRALinear: a drop-in for a frozen ``nn.Linear`` with a fused low-rank adapter.

``y = x·Wᵀ + b + s·(dropout_p(x)·Aᵀ)·Bᵀ`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
computed by :func:`llmkern.ops.lora_linear`. Unlike PEFT's unmerged path, dropout(x) and its mask
are never stored: the backward regenerates the mask from a per-call seed.

State-dict keys are ``weight``, ``bias`` (those of the wrapped Linear, so base checkpoints load
unchanged), ``lora_A.weight`` (R, C_in) and ``lora_B.weight`` (C_out, R): the same names and
shapes as PEFT's LoRA layers, minus PEFT's adapter-name level.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llmkern.ops.lora_linear import check_dropout_p, lora_linear


class LoRALinear(nn.Module):
    """Frozen base weight plus trainable LoRA factors A (Kaiming-uniform) and B (zero)."""

    from_conv1d: bool
    """The wrapped module was a transformers ``Conv1D`` (GPT-2), whose (C_in, C_out) weight this module
    holds transposed; ``llmkern.peft.merge_and_unload`` turns it back into a Conv1D."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float = 1.0, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float = 1.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str | None = None, *,
                    from_conv1d: bool = False) -> "LoRALinear":
        """Wraps `linear`, sharing (not copying) its weight and bias. Freezes those two only: the rest of
        the model keeps its requires_grad flags (``llmkern.peft.apply_lora`` freezes the whole base, as
        PEFT does). `from_conv1d`: `linear` holds a transposed GPT-2 Conv1D weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend)
        mod.from_conv1d = from_conv1d
        return mod

    def _setup(self, weight: nn.Parameter, bias: nn.Parameter | None, r: int, alpha: float, dropout: float,
               use_rslora: bool, backend: str | None) -> None:
        if r < 1:
            raise ValueError(f"LoRALinear: r must be >= 1, got {r}")
        check_dropout_p(dropout, "LoRALinear", "dropout")
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout, self.use_rslora, self.backend = r, alpha, dropout, use_rslora, backend
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.merged = False
        self.disabled = False
        self.from_conv1d = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # PEFT's init: A Kaiming-uniform (a=√5, i.e. U(±1/√C_in)), B zero, so the adapter starts as a no-op.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _delta_weight(self) -> torch.Tensor:
        """s·B·A computed in fp32 (fp64 for fp64 weights) then rounded once to the weight's dtype."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.scale * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)))

    @torch.no_grad()
    def merge(self) -> None:
        """Folds s·B·A into the base weight; forward then runs the plain linear. Exact up to one
        rounding to the weight's dtype."""
        if self.merged:
            return
        delta = self._delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = self._delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        # A fresh mask per call, seeded from torch's CPU generator (reproducible under torch.manual_seed).
        # The seed stays a tensor: reading it with .item() would sync a device in eager mode and break
        # the graph under torch.compile (25 breaks in a tiny Llama); the op reads it on the host.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else 0
        return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scale, p,
                           seed, 0, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}, merged={self.merged}")
