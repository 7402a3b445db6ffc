"""Triton kernels and launchers of the cross-entropy (llmkern/ops/cross_entropy.py); the row kernel
also serves fused_linear_cross_entropy (triton_kernels/fused_linear_cross_entropy.py).

    losses[t] = (1-ε)·(lse - x[y]) + ε·(lse - mean_v x[v]) + z·lse²        (0 for ignored labels)
    grad[t, v] = (exp(x[v] - lse)·(1 + 2z·lse) - ε/V - (1-ε)·[v == y])·scale[t]

The forward is one program per row, looping over V in BLOCK_V chunks: pass 1 is the online softmax
(running max, Σ exp rescaled when the max grows, Σ x); for fused_linear_cross_entropy a pass 2 then
writes the gradient over the logits chunk in place (each chunk is read before it is written, and
only by its own program). The cross_entropy op's backward is a (row, chunk) grid that recomputes
exp(x - lse) from the saved lse and writes the scaled gradient, rounded once. fp32 math. The row
offset row·stride is int64 (T·V passes 2^31 at T = 16K, V = 128K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any

__all__ = ["cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_rows", "AOT_CONFIGS"]

# 2048 logits per chunk with 8 warps: 8 per thread in fp32 registers, two 16-byte loads for 16-bit.
BLOCK_V = 2048
_WARPS = 8


@triton.jit(do_not_specialize=["V", "stride_x", "stride_g", "ignore_index", "has_grad", "has_scale"])
def _cross_entropy_fwd_kernel(x_ptr, y_ptr, loss_ptr, lse_ptr, g_ptr, scale_ptr, V, stride_x, stride_g,
                              ignore_index, smoothing, z_loss, has_grad, has_scale, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row)
    offs0 = tl.arange(0, BLOCK_V)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if has_grad:
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + offs0
                tl.store(g_row + offs, tl.zeros((BLOCK_V,), tl.float32).to(g_ptr.dtype.element_ty), mask=offs < V)
    else:
        m = -float("inf")
        s = 0.0
        sx = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + offs0
            x = tl.load(x_row + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            sx += tl.sum(tl.where(offs < V, x, 0.0), axis=0)
            bm = tl.max(x, axis=0)
            m_new = tl.maximum(m, bm)
            # A chunk of -inf only (with m still -inf) adds nothing: guard the exp(-inf - -inf).
            if m_new > -float("inf"):
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
        lse = m + tl.log(s)
        xy = tl.load(x_row + y).to(tl.float32)
        loss = (1.0 - smoothing) * (lse - xy)
        if smoothing > 0.0:
            loss += smoothing * (lse - sx / V)
        if z_loss > 0.0:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if has_grad:
            scale = tl.load(scale_ptr + row, mask=has_scale != 0, other=1.0)
            coef = (1.0 + 2.0 * z_loss * lse) * scale
            shift = smoothing / V * scale
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + offs0
                x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
                d = tl.exp(x - lse) * coef - shift
                d = tl.where(offs == y, d - (1.0 - smoothing) * scale, d)
                tl.store(g_row + offs, d.to(g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit(do_not_specialize=["V", "stride_x", "ignore_index"])
def _cross_entropy_bwd_kernel(x_ptr, y_ptr, lse_ptr, go_ptr, g_ptr, V, stride_x, ignore_index, smoothing, z_loss,
                              BLOCK_V: tl.constexpr):
    """g[t, v] = go[t]·(exp(x[t, v] - lse[t])·(1 + 2z·lse) - ε/V - (1-ε)·[v == y]), 0 for ignored rows.
    Grid (T, ⌈V/BLOCK_V⌉); g is (T, V) contiguous."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    y = tl.load(y_ptr + row)
    go = tl.load(go_ptr + row)
    lse = tl.load(lse_ptr + row)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.exp(x - lse) * (1.0 + 2.0 * z_loss * lse) - smoothing / V
    d = tl.where(offs == y, d - (1.0 - smoothing), d) * go
    d = tl.where(y == ignore_index, 0.0, d)
    tl.store(g_ptr + row * V + offs, d.to(g_ptr.dtype.element_ty), mask=mask)


def _aot_configs() -> list[AotConfig]:
    out = []
    for t in _TL_DTYPE.values():
        fwd = {"x_ptr": f"*{t}", "y_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": f"*{t}",
               "scale_ptr": "*fp32", "V": "i32", "stride_x": "i32", "stride_g": "i32", "ignore_index": "i32",
               "smoothing": "fp32", "z_loss": "fp32", "has_grad": "i32", "has_scale": "i32", "BLOCK_V": "constexpr"}
        bwd = {"x_ptr": f"*{t}", "y_ptr": "*i64", "lse_ptr": "*fp32", "go_ptr": "*fp32", "g_ptr": f"*{t}",
               "V": "i32", "stride_x": "i32", "ignore_index": "i32", "smoothing": "fp32", "z_loss": "fp32",
               "BLOCK_V": "constexpr"}
        for fn, sig in ((_cross_entropy_fwd_kernel, fwd), (_cross_entropy_bwd_kernel, bwd)):
            out += aligned_and_any(fn, sig, {"BLOCK_V": BLOCK_V}, num_warps=_WARPS, dtype=t)
    return out


AOT_CONFIGS: list[AotConfig] = _aot_configs()


def _fail(msg: str):
    raise ValueError(f"cross_entropy (Triton): {msg}")


def check_labels(labels: torch.Tensor, v: int, ignore_index: int, op: str) -> None:
    """Every label is ignore_index or in [0, V). One reduction; on CUDA it waits for the result (a
    wrong label would read outside the row)."""
    if labels.dtype != torch.int64:
        raise ValueError(f"{op} (Triton): labels must be int64, got {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op} (Triton): labels[{i}] = {int(labels[i])} is outside [0, V) = [0, {v}) and is not "
                         f"ignore_index ({ignore_index})")


def cross_entropy_rows(logits, labels, ignore_index: int, smoothing: float, z_loss: float, losses, lse, grad=None,
                       scale=None) -> None:
    """The row kernel on logits (T, V) (unit last stride), labels (T) int64 (checked by the caller);
    writes losses, lse (T) fp32 and, when given, grad (T, V) (may be logits) scaled by scale (T) fp32."""
    t, v = logits.shape
    if t == 0:
        return
    _cross_entropy_fwd_kernel[(t,)](
        logits, labels, losses, lse, grad if grad is not None else logits, scale if scale is not None else losses, v,
        logits.stride(0), grad.stride(0) if grad is not None else 0, ignore_index, float(smoothing), float(z_loss),
        int(grad is not None), int(scale is not None), BLOCK_V=BLOCK_V, num_warps=_WARPS)


def _check(logits, labels, label_smoothing, z_loss, ignore_index, op):
    if logits.dim() != 2 or logits.shape[1] < 1:
        _fail(f"logits must be 2-D (T, V) with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in _TL_DTYPE:
        _fail(f"logits has dtype {logits.dtype}; supported: float32, float16, bfloat16")
    t, v = logits.shape
    if labels.shape != (t,):
        _fail(f"labels must be ({t},), got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing <= 1.0 or z_loss < 0.0:
        _fail(f"label_smoothing must be in [0, 1] and z_loss >= 0, got {label_smoothing} and {z_loss}")
    check_labels(labels, v, ignore_index, op)
    return logits if logits.stride(1) == 1 or v == 1 else logits.contiguous()


def cross_entropy_fwd(logits, labels, ignore_index: int, label_smoothing: float, z_loss: float):
    """(losses (T) fp32, lse (T) fp32); see the module docstring."""
    logits = _check(logits, labels, label_smoothing, z_loss, ignore_index, "cross_entropy")
    losses = torch.empty((logits.shape[0],), dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(losses)
    cross_entropy_rows(logits, labels.contiguous(), ignore_index, label_smoothing, z_loss, losses, lse)
    return losses, lse


def cross_entropy_bwd(grad_losses, logits, labels, lse, ignore_index: int, label_smoothing: float, z_loss: float):
    """grad_losses[t]·d losses[t]/d logits[t] from the forward's lse, 0 for ignored rows."""
    logits = _check(logits, labels, label_smoothing, z_loss, ignore_index, "_cross_entropy_backward")
    t, v = logits.shape
    for name, x in (("grad_losses", grad_losses), ("lse", lse)):
        if x.shape != (t,) or x.dtype != torch.float32:
            _fail(f"{name} must be ({t},) float32, got {tuple(x.shape)} {x.dtype}")
    grad = torch.empty((t, v), dtype=logits.dtype, device=logits.device)
    if t:
        _cross_entropy_bwd_kernel[(t, triton.cdiv(v, BLOCK_V))](
            logits, labels.contiguous(), lse.contiguous(), grad_losses.contiguous(), grad, v, logits.stride(0),
            ignore_index, float(label_smoothing), float(z_loss), BLOCK_V=BLOCK_V, num_warps=_WARPS)
    return grad
