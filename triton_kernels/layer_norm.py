"""Triton kernels and launchers of LayerNorm (llmkern/ops/layer_norm.py).

    y = (x - mean)·rstd·w + b        mean, var = Σ(x - mean)²/C and rstd in fp32

The same structure as triton_kernels/rms_norm.py: a row in one program's registers (BLOCK_C = the
next power of two ≥ C, 256 to MAX_C = 8192), one program per row forward; backward over
≤ BWD_PROGRAMS programs, each keeping its rows' Σ dy·x̂ and Σ dy in fp32 registers and writing them
once as partial rows that torch sums. The variance is taken around the mean from the row in
registers (no E[x²] - mean² cancellation). "Has weight / has bias" are runtime flags.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any
from llmkern.triton_kernels.rms_norm import BWD_PROGRAMS, MAX_C, _block_c, _config

__all__ = ["layer_norm_fwd", "layer_norm_bwd", "AOT_CONFIGS"]


@triton.jit(do_not_specialize=["has_w", "has_b"])
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, eps, has_w, has_b,
                           BLOCK_C: tl.constexpr):
    """One row per program. x, y (T, C) contiguous; w, b (C); mean, rstd (T) fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    base = row * C
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd
    if has_w:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if has_b:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "rows_per_program", "has_w"])
def _layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dwb_ptr, T, C, rows_per_program,
                           has_w, BLOCK_C: tl.constexpr):
    """Rows [pid·rows_per_program, …) of dx; their Σ dy·x̂ and Σ dy as rows (pid, 0) and (pid, 1) of
    dwb (P, 2, C) fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if has_w:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = start + i
        if row < T:  # the last program may have fewer rows
            base = row * C
            m = tl.load(mean_ptr + row)
            r = tl.load(rstd_ptr + row)
            xh = tl.where(mask, (tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) - m) * r, 0.0)
            dy = tl.load(dy_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            dw += dy * xh
            db += dy
            g = dy * w
            k1 = tl.sum(g, axis=0) / C
            k2 = tl.sum(g * xh, axis=0) / C
            tl.store(dx_ptr + base + cols, (r * (g - k1 - xh * k2)).to(dx_ptr.dtype.element_ty), mask=mask)
    out = dwb_ptr + pid.to(tl.int64) * 2 * C
    tl.store(out + cols, dw, mask=mask)
    tl.store(out + C + cols, db, mask=mask)


def _signature(kernel: str, t: str) -> tuple[object, dict]:
    f32, i32 = "fp32", "i32"
    if kernel == "fwd":
        return _layer_norm_fwd_kernel, {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}",
                                        "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "C": i32, "eps": f32, "has_w": i32,
                                        "has_b": i32}
    return _layer_norm_bwd_kernel, {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "w_ptr": f"*{t}", "mean_ptr": "*fp32",
                                    "rstd_ptr": "*fp32", "dx_ptr": f"*{t}", "dwb_ptr": "*fp32", "T": i32, "C": i32,
                                    "rows_per_program": i32, "has_w": i32}


def _aot_configs() -> list[AotConfig]:
    out = []
    for kernel in ("fwd", "bwd"):
        for t in _TL_DTYPE.values():
            block = _block_c(1)
            while block <= MAX_C:
                fn, sig = _signature(kernel, t)
                out += aligned_and_any(fn, {**sig, "BLOCK_C": "constexpr"}, {"BLOCK_C": block},
                                       num_warps=_config(block)["num_warps"], dtype=t, row="C")
                block *= 2
    return out


AOT_CONFIGS: list[AotConfig] = _aot_configs()


def _fail(msg: str):
    raise ValueError(f"layer_norm (Triton): {msg}")


def _check(x, weight, bias):
    if x.dim() != 2 or x.shape[1] < 1:
        _fail(f"x must be 2-D (T, C) with C >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPE:
        _fail(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.shape[1] > MAX_C:
        _fail(f"C = {x.shape[1]} > {MAX_C}: a row must fit one program")
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and (tuple(v.shape) != (x.shape[1],) or v.dtype != x.dtype or v.device != x.device):
            _fail(f"{name} must be ({x.shape[1]},) {x.dtype} on {x.device}, got {tuple(v.shape)} {v.dtype} on "
                  f"{v.device}")


def layer_norm_fwd(x, weight, bias, eps: float):
    """(y, mean (T) fp32, rstd (T) fp32)."""
    _check(x, weight, bias)
    x = x.contiguous()
    t, c = x.shape
    y = torch.empty_like(x)
    mean = torch.empty((t,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if t:
        _layer_norm_fwd_kernel[(t,)](x, weight if weight is not None else x, bias if bias is not None else x, y, mean,
                                     rstd, c, float(eps), int(weight is not None), int(bias is not None),
                                     **_config(_block_c(c)))
    return y, mean, rstd


def layer_norm_bwd(grad_y, x, weight, mean, rstd, has_bias: bool):
    """(grad_x, grad_weight ((C) or (0)), grad_bias ((C) or (0)))."""
    _check(x, weight, None)
    x, dy = x.contiguous(), grad_y.contiguous()
    t, c = x.shape
    for name, v in (("mean", mean), ("rstd", rstd)):
        if v.shape != (t,) or v.dtype != torch.float32:
            _fail(f"{name} must be ({t},) float32, got {tuple(v.shape)} {v.dtype}")
    dx = torch.empty_like(x)
    nw, nb = (c if weight is not None else 0), (c if has_bias else 0)
    if t == 0:
        return dx, x.new_zeros((nw,)), x.new_zeros((nb,))
    programs = min(t, BWD_PROGRAMS)
    rows = triton.cdiv(t, programs)
    programs = triton.cdiv(t, rows)
    dwb = torch.empty((programs, 2, c), dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(programs,)](dy, x, weight if weight is not None else x, mean.contiguous(),
                                        rstd.contiguous(), dx, dwb, t, c, rows, int(weight is not None),
                                        **_config(_block_c(c)))
    sums = dwb.sum(0)
    gw = sums[0].to(x.dtype, copy=True) if weight is not None else x.new_empty((0,))
    gb = sums[1].to(x.dtype, copy=True) if has_bias else x.new_empty((0,))
    return dx, gw, gb
