"""Triton kernels and launchers of RMSNorm with the optional fused residual add (llmkern/ops/rms_norm.py).

    s = round(x + r) (written out) or x;  rstd = 1/sqrt(Σ s²/C + eps)
    llama: y = w·round(s·rstd)      gemma: y = round(s·rstd·(1 + w))

A row lives in one program's registers (BLOCK_C = the next power of two ≥ C, at least 256 and at
most MAX_C = 8192; a wider row is refused with its width in the message):
    fwd   one program per row: the sum of squares, then the scaled row, one read of x (and r)
    bwd   a grid of ≤ BWD_PROGRAMS programs, each over a contiguous run of rows: dx per row and a
          running dw of its rows in fp32 registers, written once per program as a partial row that
          torch sums (deterministic; fp32 atomics would make dw depend on the schedule)
Math in fp32; the convention and the residual are runtime flags (a uniform branch), not constexprs,
so each BLOCK_C costs two compiled variants per dtype (aligned or not), not eight.
Offsets row·C are int64 (T·C may pass 2^31).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any

__all__ = ["rms_norm_fwd", "rms_norm_bwd", "AOT_CONFIGS", "MAX_C"]

# 16384 spilled in every backward variant (ptxas: 2-4 KiB of spill stores at 16 warps, 32-128 registers),
# as did 8192 at 16 warps (128 registers, 16 values per thread); 8192 at 32 warps fits.
MAX_C = 8192
_MIN_BLOCK = 256
# Backward programs: two waves of an H100's 132 SMs, so each keeps a dw row in registers for many rows.
BWD_PROGRAMS = 264


@triton.jit(do_not_specialize=["gemma", "has_res"])
def _rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, rstd_ptr, C, eps, gemma, has_res,
                         BLOCK_C: tl.constexpr):
    """One row per program. x, r, y, ro (T, C) contiguous; w (C); rstd (T) fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    base = row * C
    s = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    if has_res:
        s = s + tl.load(r_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        s16 = s.to(ro_ptr.dtype.element_ty)  # the rounded sum is both the output and the input
        tl.store(ro_ptr + base + cols, s16, mask=mask)
        s = s16.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / C + eps)
    tl.store(rstd_ptr + row, rstd)
    n = s * rstd
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if gemma:
        y = n * (1.0 + w)
    else:
        y = n.to(y_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "rows_per_program", "gemma", "has_dres"])
def _rms_norm_bwd_kernel(dy_ptr, dres_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, T, C, rows_per_program, gemma,
                         has_dres, BLOCK_C: tl.constexpr):
    """Rows [pid·rows_per_program, …) of dx, and their Σ dy·n as row pid of dw (P, C) fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if gemma:
        w = w + 1.0
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = start + i
        if row < T:  # the last program may have fewer rows
            base = row * C
            r = tl.load(rstd_ptr + row)
            n = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32) * r
            dy = tl.load(dy_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if gemma:
                dw += dy * n
            else:
                dw += dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32)  # the value the forward scaled
            g = dy * w
            k = tl.sum(g * n, axis=0) / C
            dx = r * (g - n * k)
            if has_dres:
                dx += tl.load(dres_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * C + cols, dw, mask=mask)


# --------------------------------------------------------------------------------------------------
# Configs: one table read by the launchers and by the static check (AOT_CONFIGS).
# --------------------------------------------------------------------------------------------------
def _block_c(c: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(c))


def _config(block_c: int) -> dict:
    """num_warps for a row of BLOCK_C: at most 8 values per thread (the backward keeps about five per
    value live: x·rstd, dy, w, dw, dx), and never 8 warps: ptxas on sm_80 spilled 4 B of the 16-bit
    backward at 8 warps with 40-48 registers (rms_norm at 2048, layer_norm at 1024), none at 4 or 16
    warps for the same blocks. The static check covers every variant."""
    return {"BLOCK_C": block_c, "num_warps": 4 if block_c <= 512 else (16 if block_c <= 4096 else 32)}


def _signature(kernel: str, t: str) -> tuple[object, dict]:
    f32, i32 = "fp32", "i32"
    if kernel == "fwd":
        return _rms_norm_fwd_kernel, {"x_ptr": f"*{t}", "r_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}",
                                      "ro_ptr": f"*{t}", "rstd_ptr": "*fp32", "C": i32, "eps": f32, "gemma": i32,
                                      "has_res": i32}
    return _rms_norm_bwd_kernel, {"dy_ptr": f"*{t}", "dres_ptr": f"*{t}", "x_ptr": f"*{t}", "w_ptr": f"*{t}",
                                  "rstd_ptr": "*fp32", "dx_ptr": f"*{t}", "dw_ptr": "*fp32", "T": i32, "C": i32,
                                  "rows_per_program": i32, "gemma": i32, "has_dres": i32}


def _aot_configs() -> list[AotConfig]:
    out = []
    for kernel in ("fwd", "bwd"):
        for dtype, t in _TL_DTYPE.items():
            block = _MIN_BLOCK
            while block <= MAX_C:
                fn, sig = _signature(kernel, t)
                cfg = _config(block)
                out += aligned_and_any(fn, {**sig, "BLOCK_C": "constexpr"}, {"BLOCK_C": block},
                                       num_warps=cfg["num_warps"], dtype=t, row="C")
                block *= 2
    return out


AOT_CONFIGS: list[AotConfig] = _aot_configs()


# --------------------------------------------------------------------------------------------------
# Launchers (the llmkern_triton ops; arguments in the schema's order, csrc/ops/rms_norm.cpp)
# --------------------------------------------------------------------------------------------------
def _fail(msg: str):
    raise ValueError(f"rms_norm (Triton): {msg}")


def _check(x, weight, convention):
    if x.dim() != 2 or x.shape[1] < 1:
        _fail(f"x must be 2-D (T, C) with C >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPE:
        _fail(f"x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if x.shape[1] > MAX_C:
        _fail(f"C = {x.shape[1]} > {MAX_C}: a row must fit one program")
    if tuple(weight.shape) != (x.shape[1],) or weight.dtype != x.dtype or weight.device != x.device:
        _fail(f"weight must be ({x.shape[1]},) {x.dtype} on {x.device}, got {tuple(weight.shape)} {weight.dtype} "
              f"on {weight.device}")
    if convention not in ("llama", "gemma"):
        _fail(f"convention must be 'llama' or 'gemma', got {convention!r}")


def rms_norm_fwd(x, weight, eps: float, convention: str, residual):
    """(y, residual_out ((0, 0) without a residual), rstd (T) fp32); see the module docstring."""
    _check(x, weight, convention)
    x = x.contiguous()
    t, c = x.shape
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            _fail(f"residual must be {tuple(x.shape)} {x.dtype} on {x.device}, got {tuple(residual.shape)} "
                  f"{residual.dtype} on {residual.device}")
        residual = residual.contiguous()
    y = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x.new_empty((0, 0))
    rstd = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t == 0:
        return y, res_out, rstd
    cfg = _config(_block_c(c))
    _rms_norm_fwd_kernel[(t,)](x, residual if residual is not None else x, weight, y,
                               res_out if residual is not None else y, rstd, c, float(eps),
                               int(convention == "gemma"), int(residual is not None), **cfg)
    return y, res_out, rstd


def rms_norm_bwd(grad_y, grad_residual_out, xs, weight, rstd, convention: str):
    """(grad_x, grad_weight) in xs's dtype; grad_x includes grad_residual_out when given."""
    _check(xs, weight, convention)
    xs, dy = xs.contiguous(), grad_y.contiguous()
    t, c = xs.shape
    if dy.shape != xs.shape or dy.dtype != xs.dtype:
        _fail(f"grad_y must be {tuple(xs.shape)} {xs.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    if rstd.shape != (t,) or rstd.dtype != torch.float32:
        _fail(f"rstd must be ({t},) float32, got {tuple(rstd.shape)} {rstd.dtype}")
    dres = grad_residual_out.contiguous() if grad_residual_out is not None else None
    if dres is not None and (dres.shape != xs.shape or dres.dtype != xs.dtype):
        _fail(f"grad_residual_out must be {tuple(xs.shape)} {xs.dtype}, got {tuple(dres.shape)} {dres.dtype}")
    dx = torch.empty_like(xs)
    if t == 0:
        return dx, torch.zeros_like(weight)
    programs = min(t, BWD_PROGRAMS)
    rows = triton.cdiv(t, programs)
    programs = triton.cdiv(t, rows)
    dw = torch.empty((programs, c), dtype=torch.float32, device=xs.device)
    cfg = _config(_block_c(c))
    _rms_norm_bwd_kernel[(programs,)](dy, dres if dres is not None else dy, xs, weight, rstd.contiguous(), dx, dw,
                                      t, c, rows, int(convention == "gemma"), int(dres is not None), **cfg)
    return dx, dw.sum(0).to(xs.dtype)

