"""RMSNorm with an optional fused residual add, in Llama's and Gemma's conventions.

    s = x + residual (when given, rounded to x's dtype as the unfused add), else s = x
    rstd = 1/sqrt(mean(s²) + eps)                      in fp32
    llama: y = weight · (s·rstd).to(dtype)             LlamaRMSNorm (also Mistral, Qwen2, Qwen3)
    gemma: y = (s·rstd · (1 + weight)).to(dtype)       GemmaRMSNorm

Shapes: x (..., C), weight (C), residual like x. fp32, fp16 and bf16 on every backend (fp64 on
``ref``); weight in x's dtype (HF models cast the whole model). ``y, new_residual = rms_norm(x, w, eps,
residual=r)`` is the add + norm of a pre-norm decoder layer in one pass.

Autograd saves s (x, or the new residual, an output anyway) and rstd (T) fp32; the backward is one
pass over rows. Backends (``_backends``): ``cpu`` (llmkern._C), ``triton`` (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1) and ``ref`` (:func:`rms_norm_ref`). No CUDA C++ kernel: on GPU
this family runs on Triton.
"""
from __future__ import annotations

from typing import Literal

import torch

from llmkern.ops import _backends

__all__ = ["rms_norm", "rms_norm_ref", "Convention", "CONVENTIONS", "UNAVAILABLE"]

Convention = Literal["llama", "gemma"]
CONVENTIONS = ("llama", "gemma")

DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton


def rms_norm_ref(x, weight, eps: float = 1e-6, *, residual=None, convention: Convention = "llama"):
    """The oracle and fallback: the HF modules' own code (fp64 inputs compute in fp64). Returns y, or
    (y, new_residual) when a residual is given."""
    if residual is not None:
        x = x + residual
    dt = x.dtype
    h = x.to(torch.float64 if dt == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if convention == "llama":
        y = weight * h.to(dt)
    else:
        y = (h * (1.0 + weight.to(h.dtype))).to(dt)
    return y if residual is None else (y, x)


def check_rms_norm_inputs(x, weight, eps, convention, residual) -> None:
    """Shape, dtype, device and value checks with messages that name what was expected (the C++ op
    checks the same; this keeps ``ref`` and ``triton`` as strict)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"rms_norm: x must have shape (..., C) with C >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    c = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != c:
        raise ValueError(f"rms_norm: weight must have shape (C,) = ({c},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"rms_norm: convention must be one of {CONVENTIONS}, got {convention!r}")
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    if x.dtype not in DTYPES["ref"]:
        raise TypeError(f"rms_norm: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    for name, t in (("weight", weight), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"rms_norm: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"rms_norm: x and {name} must be on the same device, got {x.device} and {t.device}")


# ---------------------------------------------------------------------------------------------
# Fake functions and autograd, shared by every namespace that carries the op.

def _fake_forward(x, weight, eps, convention, residual):
    t, c = x.shape
    res_shape = (t, c) if residual is not None else (0, 0)
    return x.new_empty((t, c)), x.new_empty(res_shape), x.new_empty((t,), dtype=torch.float32)


def _fake_backward(grad_y, grad_residual_out, xs, weight, rstd, convention):
    return xs.new_empty(xs.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps, convention, residual = inputs
    _, res_out, rstd = output
    # s is x itself or the new residual (an output the caller holds anyway): no extra activation.
    ctx.save_for_backward(res_out if residual is not None else x, weight, rstd)
    ctx.convention = convention
    ctx.has_residual = residual is not None


def _make_backward(ns: str):
    def backward(ctx, grad_y, grad_res_out, _grad_rstd):
        xs, weight, rstd = ctx.saved_tensors
        gr = grad_res_out.contiguous() if ctx.has_residual and grad_res_out is not None else None
        gx, gw = getattr(torch.ops, ns)._rms_norm_backward(grad_y.contiguous(), gr, xs, weight, rstd, ctx.convention)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, None, None,
                gx if ctx.has_residual and need[4] else None)
    return backward


def _triton():
    from llmkern.triton_kernels import rms_norm as tk

    return {"rms_norm": tk.rms_norm_fwd, "_rms_norm_backward": tk.rms_norm_bwd}


UNAVAILABLE = _backends.register_op(
    "rms_norm", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_rms_norm_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context))


def rms_norm(x, weight, eps: float = 1e-6, *, residual=None, convention: Convention = "llama",
             backend: _backends.Backend | None = None):
    """RMSNorm of x over its last dimension (see the module docstring); x: (..., C).

    Returns y, or ``(y, new_residual)`` with ``new_residual = x + residual`` when a residual is given.
    ``backend`` (or ``LLMKERN_BACKEND``) forces a backend; a refused one raises
    :class:`~llmkern.ops._backends.BackendRefused` with the reason.
    """
    check_rms_norm_inputs(x, weight, eps, convention, residual)
    tensors = [t for t in (x, weight, residual) if t is not None]
    chosen = _backends.choose("rms_norm", tensors, DTYPES, backend, supported=SUPPORTED)
    if chosen == "ref":
        return rms_norm_ref(x, weight, eps, residual=residual, convention=convention)
    fn = _backends.op("rms_norm", chosen)
    if x.dim() == 2:  # no reshapes: each is a view node in the autograd graph, ~10 us of a small call
        y, res_out, _ = fn(x, weight, float(eps), convention, residual)
        return y if residual is None else (y, res_out)
    c = x.shape[-1]
    res2 = residual.reshape(-1, c) if residual is not None else None
    y, res_out, _ = fn(x.reshape(-1, c), weight, float(eps), convention, res2)
    y = y.reshape(x.shape)
    return y if residual is None else (y, res_out.reshape(x.shape))
