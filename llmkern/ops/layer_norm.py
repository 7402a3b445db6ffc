"""LayerNorm over the last dimension, with or without weight and bias (nn.LayerNorm's math).

    y = (x - mean)·rstd·weight + bias,   mean and the biased variance over C in fp32

Shapes: x (..., C), weight (C) or None, bias (C) or None (a bias needs a weight). fp32, fp16 and
bf16 (fp64 on ``ref``), parameters in x's dtype; fp32 statistics and math, one rounding of y.
Autograd saves x and the row statistics mean/rstd (T) fp32; x̂ is recomputed in the backward.
Backends: ``cpu`` (llmkern._C), ``triton`` and ``ref`` (:func:`layer_norm_ref`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern.ops import _backends

__all__ = ["layer_norm", "layer_norm_ref", "UNAVAILABLE"]

DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton


def layer_norm_ref(x, weight=None, bias=None, eps: float = 1e-5):
    """The oracle and fallback: F.layer_norm (what nn.LayerNorm runs)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def check_layer_norm_inputs(x, weight, bias, eps) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"layer_norm: x must have shape (..., C) with C >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"layer_norm: {name} must have shape (C,) = ({c},), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"layer_norm: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: x and {name} must be on the same device, got {x.device} and {t.device}")
    if bias is not None and weight is None:
        raise ValueError("layer_norm: a bias needs a weight (nn.LayerNorm's elementwise_affine)")
    if not eps >= 0:
        raise ValueError(f"layer_norm: eps must be >= 0, got {eps}")
    if x.dtype not in DTYPES["ref"]:
        raise TypeError(f"layer_norm: x must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _fake_forward(x, weight, bias, eps):
    t = x.shape[0]
    f32 = torch.float32
    return x.new_empty(x.shape), x.new_empty((t,), dtype=f32), x.new_empty((t,), dtype=f32)


def _fake_backward(grad_y, x, weight, mean, rstd, has_bias):
    c = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((c if weight is not None else 0,)), x.new_empty((c if has_bias else 0,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has = (weight is not None, bias is not None)


def _make_backward(ns: str):
    def backward(ctx, grad_y, _gmean, _grstd):
        x, weight, mean, rstd = ctx.saved_tensors
        has_w, has_b = ctx.has
        gx, gw, gb = getattr(torch.ops, ns)._layer_norm_backward(grad_y.contiguous(), x, weight, mean, rstd, has_b)
        need = ctx.needs_input_grad
        return gx if need[0] else None, gw if has_w and need[1] else None, gb if has_b and need[2] else None, None
    return backward


def _triton():
    from llmkern.triton_kernels import layer_norm as tk

    return {"layer_norm": tk.layer_norm_fwd, "_layer_norm_backward": tk.layer_norm_bwd}


UNAVAILABLE = _backends.register_op(
    "layer_norm", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_layer_norm_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, *, backend: _backends.Backend | None = None):
    """LayerNorm of x over its last dimension (see the module docstring); x: (..., C)."""
    check_layer_norm_inputs(x, weight, bias, eps)
    tensors = [t for t in (x, weight, bias) if t is not None]
    chosen = _backends.choose("layer_norm", tensors, DTYPES, backend, supported=SUPPORTED)
    if chosen == "ref":
        return layer_norm_ref(x, weight, bias, eps)
    if x.dim() == 2:  # no reshape: each is a view node in the autograd graph, ~10 us of a small call
        return _backends.op("layer_norm", chosen)(x, weight, bias, float(eps))[0]
    y = _backends.op("layer_norm", chosen)(x.reshape(-1, x.shape[-1]), weight, bias, float(eps))[0]
    return y.reshape(x.shape)
