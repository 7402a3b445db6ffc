"""Fused LoRA linear: ``y = x·Wᵀ + b + s·(dropout_p(x)·Aᵀ)·Bᵀ``.

Shapes: x (..., C_in), weight (C_out, C_in), bias (C_out) or None, lora_a (R, C_in),
lora_b (C_out, R). fp32, fp16 and bf16 (fp64 too, except Triton), accumulating in fp32.

What PEFT runs as 3-5 kernels and what it stores (dropout(x), the mask) is here one base GEMM plus
a few memory-bound passes, and the backward saves only x and the (..., R) product dropout(x)·Aᵀ.
The dropout mask is regenerated from (seed, offset) by the counter-based RNG of ``llmkern._rng``.

Backends (see ``_backends``): ``cpu`` (llmkern._C), ``cuda`` (llmkern._C_cuda), ``triton``,
``emu`` (the CUDA kernels compiled for the CPU) and ``ref`` (:func:`lora_linear_ref`).
Each compiled backend is a dispatcher op ``<ns>::lora_linear`` with the same schema, fake
function and autograd formula, registered below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern import _rng
from llmkern.ops import _backends
from llmkern.ops._backends import FP32_FP16_BF16, FP32_FP16_BF16_FP64

__all__ = ["lora_linear", "lora_linear_ref", "check_lora_inputs", "UNAVAILABLE"]

DTYPES = {"cpu": FP32_FP16_BF16_FP64, "cuda": FP32_FP16_BF16_FP64, "emu": FP32_FP16_BF16_FP64,
          "ref": FP32_FP16_BF16_FP64, "triton": FP32_FP16_BF16}


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale=1.0, dropout_p=0.0, seed=0, offset=0):
    """The oracle and fallback, in plain PyTorch (the same formula as PEFT's unmerged LoRA)."""
    xd = x
    if dropout_p > 0:
        c_in = x.shape[-1]
        rows = x.numel() // c_in if c_in else 0
        keep = _rng.dropout_keep_mask(seed, offset, dropout_p, rows, c_in, device=x.device)
        xd = x * keep.reshape(x.shape).to(x.dtype) / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(xd, lora_a), lora_b)


def check_lora_inputs(x, weight, bias, lora_a, lora_b, dropout_p):
    """Shape, dtype, device and range checks with messages that name what was expected.
    The C++ ops check the same things; this keeps the ``ref`` and ``triton`` paths as strict."""
    if x.dim() < 1:
        raise ValueError("lora_linear: x must have shape (..., C_in), got a 0-d tensor")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dim() != 2:
            raise ValueError(f"lora_linear: {name} must be 2-D, got shape {tuple(t.shape)}")
    c_in, c_out, r = x.shape[-1], weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != c_in:
        raise ValueError(f"lora_linear: x has C_in={c_in} (shape {tuple(x.shape)}) but weight has shape "
                         f"{tuple(weight.shape)}; expected (C_out, {c_in})")
    if r < 1:
        raise ValueError(f"lora_linear: rank R must be >= 1, got lora_a of shape {tuple(lora_a.shape)}")
    if lora_a.shape[1] != c_in:
        raise ValueError(f"lora_linear: lora_a has shape {tuple(lora_a.shape)}; expected (R, {c_in}) to match "
                         f"x's C_in")
    if tuple(lora_b.shape) != (c_out, r):
        raise ValueError(f"lora_linear: lora_b has shape {tuple(lora_b.shape)}; expected (C_out, R) = "
                         f"({c_out}, {r})")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)}; expected ({c_out},)")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)] + ([("bias", bias)] if bias is not None
                                                                             else [])
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"lora_linear: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"lora_linear: x and {name} must be on the same device, got {x.device} and "
                             f"{t.device}")
    if x.dtype not in FP32_FP16_BF16_FP64:
        raise TypeError(f"lora_linear: dtype must be one of float32, float16, bfloat16, float64; got {x.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


# ---------------------------------------------------------------------------------------------
# Fake functions and autograd, shared by every namespace that carries the op.

def _fake_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offset):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (weight.shape[0],)), x.new_empty(lead + (lora_a.shape[0],), dtype=acc)


def _fake_backward(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, offset):
    return x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offset = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.hparams = (scale, dropout_p, seed, offset)


def _make_backward(ns: str):
    def backward(ctx, grad_y, _grad_xa):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, ga, gb = getattr(torch.ops, ns)._lora_linear_backward(grad_y, x, weight, lora_a, lora_b, xa,
                                                                   *ctx.hparams)
        gw = gbias = None
        if need[1]:  # frozen W is the common case: this GEMM only runs when W trains
            gw = grad_y.reshape(-1, weight.shape[0]).t().mm(x.reshape(-1, weight.shape[1]))
        if need[2]:
            gbias = grad_y.reshape(-1, weight.shape[0]).sum(0)
        return (gx if need[0] else None, gw, gbias, ga if need[3] else None, gb if need[4] else None,
                None, None, None, None)
    return backward


def _triton():
    """The Triton backend as the dispatcher ops llmkern_triton::lora_linear and _lora_linear_backward."""
    from llmkern.triton_kernels import lora_linear as tk

    def fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offset):
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, xa = tk.lora_linear_fwd(x2, weight.contiguous(), bias, lora_a.contiguous(), lora_b.contiguous(),
                                   scale, dropout_p, seed, offset)
        return y.reshape(lead + (weight.shape[0],)), xa.reshape(lead + (lora_a.shape[0],))

    def bwd(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, offset):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        gy2 = grad_y.reshape(-1, weight.shape[0]).contiguous()
        xa2 = xa.reshape(-1, lora_a.shape[0]).contiguous()
        gx, ga, gb = tk.lora_linear_bwd(gy2, x2, weight.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
                                        xa2, scale, dropout_p, seed, offset)
        return gx.reshape(x.shape), ga.contiguous(), gb.contiguous()

    return {"lora_linear": fwd, "_lora_linear_backward": bwd}


UNAVAILABLE = _backends.register_op(
    "lora_linear", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_lora_linear_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context))


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                offset: int = 0, *, backend: _backends.Backend | None = None) -> torch.Tensor:
    """Fused ``y = x·Wᵀ + b + scale·(dropout_p(x)·Aᵀ)·Bᵀ`` (see the module docstring).

    ``seed`` and ``offset`` select the dropout mask: the same pair gives the same mask, in forward and
    in backward. ``backend`` (or ``LLMKERN_BACKEND``) forces a backend; a refused one raises
    :class:`~llmkern.ops._backends.BackendRefused` with the reason.
    """
    check_lora_inputs(x, weight, bias, lora_a, lora_b, dropout_p)
    tensors = [t for t in (x, weight, bias, lora_a, lora_b) if t is not None]
    chosen = _backends.choose("lora_linear", tensors, DTYPES, backend)
    if chosen == "ref":
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offset)
    op = _backends.op("lora_linear", chosen)
    return op(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), int(seed), int(offset))[0]
