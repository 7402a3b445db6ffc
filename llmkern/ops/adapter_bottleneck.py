"""Bottleneck adapter: ``y = r + s·up(act(down(LN?(x))))``, with ``r = x`` (series) or the wrapped
sublayer's output (parallel).

Shapes: x (..., C), down_weight (R, C), down_bias (R), up_weight (C, R), up_bias (C), optional
LayerNorm weight/bias (C), residual like x.

Status: only the pure-PyTorch reference exists. :func:`adapter_bottleneck` validates its inputs and
runs :func:`adapter_bottleneck_ref`; the fused kernels of ``llmkern::adapter_bottleneck`` (CPU C++,
CUDA, Triton, with the activation recomputed in backward instead of stored) are not written yet, so
there is no schema, no backend choice and no ``backend=`` argument today.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["adapter_bottleneck", "adapter_bottleneck_ref", "ACTIVATIONS"]

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"adapter_bottleneck: activation must be one of {ACTIVATIONS}, got {activation!r}")


def adapter_bottleneck_ref(x, down_weight, down_bias, up_weight, up_bias, scale=1.0, activation: Activation = "relu",
                           ln_weight=None, ln_bias=None, eps=1e-5, residual=None):
    """The oracle, in plain PyTorch autograd (which stores the activation; the kernels will not)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    out = F.linear(_act(F.linear(h, down_weight, down_bias), activation), up_weight, up_bias)
    return (x if residual is None else residual) + scale * out


def _check(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, residual):
    if x.dim() < 1:
        raise ValueError("adapter_bottleneck: x must have shape (..., C), got a 0-d tensor")
    c = x.shape[-1]
    if down_weight.dim() != 2 or down_weight.shape[1] != c or down_weight.shape[0] < 1:
        raise ValueError(f"adapter_bottleneck: down_weight must be (R, {c}) with R >= 1, got "
                         f"{tuple(down_weight.shape)}")
    r = down_weight.shape[0]
    if tuple(up_weight.shape) != (c, r):
        raise ValueError(f"adapter_bottleneck: up_weight must be (C, R) = ({c}, {r}), got {tuple(up_weight.shape)}")
    for name, t, n in (("down_bias", down_bias, r), ("up_bias", up_bias, c), ("ln_weight", ln_weight, c),
                       ("ln_bias", ln_bias, c)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"adapter_bottleneck: {name} must be ({n},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"adapter_bottleneck: residual must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter_bottleneck: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("down_weight", down_weight), ("up_weight", up_weight), ("residual", residual)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"adapter_bottleneck: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")


def adapter_bottleneck(x, down_weight, down_bias, up_weight, up_bias, scale=1.0, activation: Activation = "relu",
                       ln_weight=None, ln_bias=None, eps=1e-5, residual=None):
    """The op's entry point. Today it checks its inputs and runs the reference (see the module doc)."""
    _check(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, residual)
    return adapter_bottleneck_ref(x, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_weight,
                                  ln_bias, eps, residual)
