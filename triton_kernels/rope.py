"""Triton kernels and launchers of rotary position embedding on q and k (llmkern/ops/rope.py).

One program per (batch, position): it loads that position's cos and sin halves once (fp32) and
rotates every head of q and then of k through the tensors' strides (any strides but a unit last
one, so the (B, H, T, D) transpose of a projection needs no copy):
    o1 = x1·c1 + x2·a,   o2 = x2·c2 + x1·b          (x1, x2: the two halves of a head's row)
    forward  a = -s1, b = s2;   backward (the transposed rotation) a = s2, b = -s1
Rows are loaded whole before the store, so the in-place variant (out = x) is the same kernel.
BLOCK_H = the next power of two ≥ D/2 (D ≤ 2·MAX_HALF = 512); the direction is a runtime flag.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any

__all__ = ["rope_fwd", "rope_bwd", "rope_inplace", "AOT_CONFIGS", "MAX_HALF"]

MAX_HALF = 256
_STRIDES = ("sxb", "sxh", "sxt", "sob", "soh", "sot")


@triton.jit
def _rope_heads(x_ptr, o_ptr, H, b, t, sxb, sxh, sxt, sob, soh, sot, c1, c2, a, bb, half, offs, mask):
    for h in range(0, H):
        src = x_ptr + b * sxb + tl.cast(h, tl.int64) * sxh + t * sxt
        dst = o_ptr + b * sob + tl.cast(h, tl.int64) * soh + t * sot
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + offs, (x1 * c1 + x2 * a).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half + offs, (x2 * c2 + x1 * bb).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "Hq", "Hk", "sqb", "sqh", "sqt", "sqob", "sqoh", "sqot", "skb", "skh", "skt",
                               "skob", "skoh", "skot", "scb", "sct", "ssb", "sst", "transpose"])
def _rope_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, T, half, Hq, Hk,
                 sqb, sqh, sqt, sqob, sqoh, sqot, skb, skh, skt, skob, skoh, skot, scb, sct, ssb, sst,
                 transpose, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    cbase = cos_ptr + b * scb + t * sct
    sbase = sin_ptr + b * ssb + t * sst
    c1 = tl.load(cbase + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cbase + half + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sbase + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sbase + half + offs, mask=mask, other=0.0).to(tl.float32)
    if transpose:
        a = s2
        bb = -s1
    else:
        a = -s1
        bb = s2
    _rope_heads(q_ptr, qo_ptr, Hq, b, t, sqb, sqh, sqt, sqob, sqoh, sqot, c1, c2, a, bb, half, offs, mask)
    _rope_heads(k_ptr, ko_ptr, Hk, b, t, skb, skh, skt, skob, skoh, skot, c1, c2, a, bb, half, offs, mask)


def _signature(t: str) -> dict:
    sig = {"q_ptr": f"*{t}", "qo_ptr": f"*{t}", "k_ptr": f"*{t}", "ko_ptr": f"*{t}", "cos_ptr": f"*{t}",
           "sin_ptr": f"*{t}", "T": "i32", "half": "i32", "Hq": "i32", "Hk": "i32"}
    for name in ("sqb", "sqh", "sqt", "sqob", "sqoh", "sqot", "skb", "skh", "skt", "skob", "skoh", "skot", "scb",
                 "sct", "ssb", "sst"):
        sig[name] = "i32"
    return {**sig, "transpose": "i32", "BLOCK_H": "constexpr"}


def _warps(block_h: int) -> int:
    return 1 if block_h <= 64 else 2


def _aot_configs() -> list[AotConfig]:
    out = []
    for t in _TL_DTYPE.values():
        block = 16
        while block <= MAX_HALF:
            sig = _signature(t)
            out += aligned_and_any(_rope_kernel, sig, {"BLOCK_H": block}, num_warps=_warps(block), dtype=t,
                                   row="half")
            block *= 2
    return out


AOT_CONFIGS: list[AotConfig] = _aot_configs()


def _fail(msg: str):
    raise ValueError(f"rope (Triton): {msg}")


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        _fail(f"q and k must be 4-D (B, H, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, _, t, d = q.shape
    if tuple(k.shape[::2]) != (b, t) or k.shape[3] != d:
        _fail(f"k has shape {tuple(k.shape)}; expected (B, Hk, T, D) with q {tuple(q.shape)}")
    if d % 2 or d // 2 > MAX_HALF:
        _fail(f"D must be even and at most {2 * MAX_HALF}, got {d}")
    if q.dtype not in _TL_DTYPE:
        _fail(f"dtype {q.dtype}; supported: float32, float16, bfloat16")
    for name, x in (("q", q), ("k", k)):
        if d > 1 and x.numel() and x.stride(3) != 1:
            _fail(f"{name} must have a unit last stride, got strides {tuple(x.stride())}")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.dim() != 3 or c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (t, d):
            _fail(f"{name} has shape {tuple(c.shape)}; expected (B or 1, T, D) = ({b} or 1, {t}, {d})")
        if c.dtype != q.dtype or c.device != q.device or k.dtype != q.dtype or k.device != q.device:
            _fail(f"q, k, cos and sin must share dtype and device, got {q.dtype}/{k.dtype}/{c.dtype} on "
                  f"{q.device}/{k.device}/{c.device}")


def _launch(q, qo, k, ko, cos, sin, transpose: bool):
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    _check(q, k, cos, sin)
    b, hq, t, d = q.shape
    if q.numel() == 0 and k.numel() == 0:
        return
    block = max(16, triton.next_power_of_2(d // 2))

    def bstride(c):
        return 0 if c.shape[0] == 1 else c.stride(0)

    _rope_kernel[(b * t,)](q, qo, k, ko, cos, sin, t, d // 2, hq, k.shape[1], *q.stride()[:3], *qo.stride()[:3],
                           *k.stride()[:3], *ko.stride()[:3], bstride(cos), cos.stride(1), bstride(sin),
                           sin.stride(1), int(transpose), BLOCK_H=block, num_warps=_warps(block))


def rope_fwd(q, k, cos, sin):
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    _launch(q, qo, k, ko, cos, sin, transpose=False)
    return qo, ko


def rope_inplace(q, k, cos, sin):
    _launch(q, q, k, k, cos, sin, transpose=False)


def rope_bwd(grad_q, grad_k, cos, sin):
    gq = grad_q if grad_q.stride(-1) == 1 else grad_q.contiguous()
    gk = grad_k if grad_k.stride(-1) == 1 else grad_k.contiguous()
    qo, ko = torch.empty_like(gq), torch.empty_like(gk)
    _launch(gq, qo, gk, ko, cos, sin, transpose=True)
    return qo, ko
