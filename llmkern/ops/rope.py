"""Rotary position embedding applied to q and k in one call, in Hugging Face's rotate_half layout.

    q_embed = q·cos + rotate_half(q)·sin,   k_embed = k·cos + rotate_half(k)·sin
    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

The signature is transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: q (B, Hq, T, D)
and k (B, Hk, T, D) (or (B, T, H, D) with unsqueeze_dim=2), cos and sin (B, T, D) or (T, D) as the
model's rotary module returns them, in q's dtype. Whatever scaling the rotary module applies
(linear, dynamic NTK, YaRN, Llama 3, ...) is already in cos and sin, so every rope type the pinned
transformers has for Llama and Qwen2 goes through the same kernel. fp32 math, one rounding per
element (eager rounds q·cos, rotate_half(q)·sin and their sum separately).

q and k may be strided views (the (B, H, T, D) transpose of a (B, T, H·D) projection): the kernels
read and write through the strides, no copy. ``inplace=True`` rotates q and k in their own memory;
it is allowed only where autograd has nothing to track (no grad mode, or inputs that need no
gradient): under autograd the op runs out of place and saves only cos and sin.

Backends: ``cpu`` (llmkern._C), ``triton`` and ``ref`` (:func:`rope_ref`).
"""
from __future__ import annotations

import torch

from llmkern.ops import _backends

__all__ = ["rope", "rope_ref", "UNAVAILABLE"]

DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(q, k, cos, sin, unsqueeze_dim: int = 1):
    """The oracle and fallback: transformers' apply_rotary_pos_emb."""
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def check_rope_inputs(q, k, cos, sin, unsqueeze_dim) -> None:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"rope: unsqueeze_dim must be 1 (q is (B, H, T, D)) or 2 (q is (B, T, H, D)), got "
                         f"{unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    t_dim = 2 if unsqueeze_dim == 1 else 1
    b, t, d = q.shape[0], q.shape[t_dim], q.shape[3]
    layout = "(B, H, T, D)" if unsqueeze_dim == 1 else "(B, T, H, D)"
    if k.shape[0] != b or k.shape[t_dim] != t or k.shape[3] != d:
        raise ValueError(f"rope: k has shape {tuple(k.shape)}; expected {layout} with B={b}, T={t}, D={d} as q "
                         f"{tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"rope: the head dim D must be even, got {d}")
    for name, c in (("cos", cos), ("sin", sin)):
        ok = (c.dim() == 3 and c.shape[0] in (1, b) and tuple(c.shape[1:]) == (t, d)) or \
             (c.dim() == 2 and tuple(c.shape) == (t, d))
        if not ok:
            raise ValueError(f"rope: {name} has shape {tuple(c.shape)}; expected (B, T, D) = ({b}, {t}, {d}), "
                             f"(1, T, D) or (T, D)")
        if c.requires_grad:
            raise ValueError(f"rope: {name} requires grad; the rotary module computes cos/sin under no_grad and "
                             f"this op gives them no gradient")
    for name, t_ in (("k", k), ("cos", cos), ("sin", sin)):
        if t_.dtype != q.dtype:
            raise TypeError(f"rope: q and {name} must have the same dtype, got {q.dtype} and {t_.dtype}")
        if t_.device != q.device:
            raise ValueError(f"rope: q and {name} must be on the same device, got {q.device} and {t_.device}")
    if q.dtype not in DTYPES["ref"]:
        raise TypeError(f"rope: dtype must be float32, float16, bfloat16 or float64, got {q.dtype}")


def _fake_forward(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


def _fake_backward(grad_q, grad_k, cos, sin):
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)  # (B, T, D): no per-head activation is kept


def _make_backward(ns: str):
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        gq, gk = getattr(torch.ops, ns)._rope_backward(grad_q, grad_k, cos, sin)
        need = ctx.needs_input_grad
        return gq if need[0] else None, gk if need[1] else None, None, None
    return backward


def _triton():
    from llmkern.triton_kernels import rope as tk

    return {"rope": tk.rope_fwd, "_rope_backward": tk.rope_bwd, "rope_": tk.rope_inplace}


UNAVAILABLE = _backends.register_op(
    "rope", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_rope_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context))
for _ns in _backends.namespaces("rope"):  # rope_ (in place, no autograd) returns nothing: a fake that checks nothing
    torch.library.register_fake(f"{_ns}::rope_")(lambda q, k, cos, sin: None)


def rope(q, k, cos, sin, unsqueeze_dim: int = 1, *, inplace: bool = False,
         backend: _backends.Backend | None = None):
    """``(q_embed, k_embed)`` as transformers' apply_rotary_pos_emb (see the module docstring).

    ``inplace=True`` writes into q and k and returns them; it raises where autograd would need the
    inputs (grad mode on and q or k requiring grad).
    """
    check_rope_inputs(q, k, cos, sin, unsqueeze_dim)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("rope: inplace=True needs q and k that autograd does not track (torch.no_grad(), or "
                         "inputs without requires_grad); call it with inplace=False")
    chosen = _backends.choose("rope", [q, k, cos, sin], DTYPES, backend, supported=SUPPORTED)
    if chosen == "ref":
        qe, ke = rope_ref(q, k, cos, sin, unsqueeze_dim)
        if inplace:
            q.copy_(qe)
            k.copy_(ke)
            return q, k
        return qe, ke
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    # The kernels take (B, H, T, D) views with a unit last stride; (B, T, H, D) is a free transpose.
    q4, k4 = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    if inplace:
        if q4.stride(-1) != 1 or k4.stride(-1) != 1:
            raise ValueError(f"rope: inplace=True needs q and k with a unit last stride, got strides {q.stride()} and "
                             f"{k.stride()}")
        _backends.op("rope_", chosen)(q4, k4, cos, sin)
        return q, k
    q4 = q4 if q4.stride(-1) == 1 else q4.contiguous()
    k4 = k4 if k4.stride(-1) == 1 else k4.contiguous()
    qo, ko = _backends.op("rope", chosen)(q4, k4, cos, sin)
    return (qo, ko) if unsqueeze_dim == 1 else (qo.transpose(1, 2), ko.transpose(1, 2))
