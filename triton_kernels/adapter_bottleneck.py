"""Triton kernels and launchers of the fused bottleneck adapter op.

    out = r + s·(act(z)·Uᵀ + u),  z = LN?(x)·Dᵀ + d        x, r (T, C), D (R, C), U (C, R), d (R), u (C)

r is x (series) or a separate residual (parallel); LN is applied iff ln_weight is given (its bias is
optional). Four kernels, each a (rows × channels) tile loop with the rank R ≤ 256 on the short side:

    down     z = scale·LN?(a)·mᵀ (+ bias) (· act'(z_in))        (T, C) × (R, C) → (T, R) fp32
             forward: a = x, m = D, also writes the LayerNorm row stats mean/rstd
             backward: a = grad_out, m = Uᵀ, scale = s, times act'(z): g_z = s·(grad_out·U) ⊙ act'(z)
    up       out = res + alpha·(act(u)·mᵀ + bias)                 (T, R) × (C, R) → (T, C)
             forward: u = z, m = U; backward without LN: grad_x = grad_out? + g_z·D
    wgrad    G = alpha·act(u)ᵀ·LN?(a), split over T into fp32 partials, with column sums on the side
             grad_U = s·grad_outᵀ·act(z) (and grad_u = s·Σ_t grad_out): u = z, a = grad_out
             grad_D = g_zᵀ·LN(x) (and grad_ln_w = Σ_t g_h·x̂, grad_ln_b = Σ_t g_h, g_h = g_z·D)
    ln_bwd   grad_x = grad_out? + rstd·(g_h·w − mean_c(g_h·w) − x̂·mean_c(g_h·w·x̂)), g_h = g_z·D,
             two passes over C per row block (the row sums, then the output), g_h recomputed

Only z (T, R) fp32 and mean/rstd (T) fp32 are saved for backward; LN(x) and act(z) are recomputed.

Numerics (same rules as triton_kernels/lora_linear.py, whose module doc gives the numbers):
- Every dot accumulates in fp32 with operands in the input dtype (tensor cores for fp16/bf16); fp32
  inputs use an IEEE dot (no TF32), as torch's default allow_tf32=False.
- fp32 intermediates that enter a dot (LN(x), act(z), g_z) are rounded once to the input dtype, the
  rounding PyTorch's own fp16/bf16 path applies when it stores them. Everything else (LN statistics,
  activations and their derivatives, epilogues) is fp32; out is rounded once, where the unfused
  PyTorch chain rounds after the linear, the scale and the residual add.
- LayerNorm statistics use Chan et al.'s pairwise update per C tile (tile mean and centred sum of
  squares, merged into the running pair), one pass over x with no E[x²]−E[x]² cancellation. The
  variance is biased (÷C), as F.layer_norm.
- The wgrad kernel reduces over T. It splits T across programs and writes fp32 partials that torch
  sums, as lora_wgrad does: deterministic (fp32 atomics would make the gradient depend on the
  schedule) and bounded, SPLIT ≈ 264 / (C / BLOCK_C) programs' worth of (R + 3)·BLOCK_C floats
  (≤ 264·(256 + 3)·64·4 B = 17.5 MiB at R = 256, 1.2 MiB at R = 16). grad_d = Σ_t g_z is a (T, R)
  column sum left to torch (g_z is 1/C of the activation traffic).
- The activation is a runtime code (0 none, 1 + its index in llmkern.ops.adapter_bottleneck's
  ACTIVATIONS: 1 relu, 2 gelu, 3 gelu_tanh, 4 silu), as are the
  "has bias / has residual" flags: they only change a uniform branch in an epilogue of ≤ 20 flops
  per element, while as constexprs they would multiply the variants the static check compiles
  (×5 for the activation alone; 140 variants × 2 archs as it is). Only LayerNorm, which adds a pass
  over x and loads, is a constexpr (HAS_LN).
- Element-wise math is done in fp32 (.to(tl.float32) first): bf16 arithmetic is wrong in
  TRITON_INTERPRET=1 mode; the tests patch the interpreter's bf16 tl.dot (triton#11584).

Offsets that can pass 2^31 elements (row · C) are formed in int64.

Static check (tests/static/test_triton_aot.py, ptxas -v for sm_80 and sm_90a, 2026-11-23): none of the
140 variants spills; registers per thread down 40-255, up 96-168, wgrad 62-255, ln_bwd 96-216
(medians 112-168); shared memory ≤ 69 KiB (wgrad, R = 256), under sm_80's 163 KiB. The 245-255
register variants are the R = 256 and the aligned LN wgrad ones: one 8-warp or two 4-warp programs
per SM. TODO(bench): time them against smaller tiles on an H100.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, distinct, is_aligned as _is_aligned, variant

__all__ = ["adapter_bottleneck_fwd", "adapter_bottleneck_bwd", "AOT_CONFIGS", "NUM_ACTIVATIONS"]

NUM_ACTIVATIONS = 4
"""Runtime activation codes are 1..NUM_ACTIVATIONS (the module docstring lists them); 0 is the
identity, used where a kernel is reused without activation."""



# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_bottleneck_act(z, act):
    """act(z) for fp32 z; act is the runtime activation code (0: identity).

    gelu_tanh uses 0.5·(1 + tanh(v)) = sigmoid(2v): Triton has no tanh, and sigmoid saturates
    cleanly at both ends (exp overflow gives 0, never NaN).
    """
    # Literals: 0.7071067811865476 = 1/√2, 1.5957691216057308 = 2·√(2/π), 0.044715 is tanh-GELU's
    # cubic coefficient (module-level constexprs multiplied from the left break the interpreter).
    a = z
    if act == 1:
        a = tl.maximum(z, 0.0)
    elif act == 2:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif act == 3:
        a = z * tl.sigmoid((z + z * z * z * 0.044715) * 1.5957691216057308)
    elif act == 4:
        a = z * tl.sigmoid(z)
    return a


@triton.jit
def _adapter_bottleneck_act_grad(z, act):
    """d act / dz at fp32 z (relu'(0) = 0, as torch's threshold_backward); code 0 gives 1."""
    # 0.3989422804014327 = 1/√(2π); 1.5957691216057308 = 2·√(2/π); 0.134145 = 3·0.044715.
    g = tl.full(z.shape, 1.0, tl.float32)
    if act == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif act == 2:
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif act == 3:
        # With sg = sigmoid(2v) = (1 + tanh v)/2: 1 − tanh² v = 4·sg·(1 − sg).
        sg = tl.sigmoid((z + z * z * z * 0.044715) * 1.5957691216057308)
        g = sg + 2.0 * z * sg * (1.0 - sg) * 0.7978845608028654 * (1.0 + z * z * 0.134145)
    elif act == 4:
        sg = tl.sigmoid(z)
        g = sg * (1.0 + z * (1.0 - sg))
    return g


# Specialization (see lora_linear.py's _NO_SPEC for the reasoning): the JIT may specialize the
# pointers and the row length C on 16-divisibility, and nothing else, so AOT_CONFIGS' "aligned" and
# "any" variants bound what it builds.
_NO_SPEC = ["T", "R", "stride_mr", "stride_mc", "rows_per_split", "act", "has_bias", "has_res", "has_ln_bias",
            "has_colsum"]


@triton.jit(do_not_specialize=_NO_SPEC[:4] + ["act", "has_bias", "has_ln_bias"])
def _adapter_bottleneck_down_kernel(
    a_ptr, m_ptr, bias_ptr, lnw_ptr, lnb_ptr, zin_ptr, z_ptr, mean_ptr, rstd_ptr,
    T, C, R,
    stride_mr, stride_mc,
    scale, eps, act, has_bias, has_ln_bias,
    HAS_LN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """z[t, r] = scale·Σ_c h[t, c]·m[r, c] (+ bias[r]) (· act'(zin[t, r]) when act ≠ 0).

    h = LN(a) when HAS_LN (mean/rstd written), else a. One program per BLOCK_T rows, loops over C.
    a (T, C) contiguous; m (R, C) any strides; z, zin (T, R) fp32 contiguous; mean, rstd (T) fp32.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c0 = tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask_r = offs_r < R
    a_rows = a_ptr + offs_t[:, None].to(tl.int64) * C  # int64: T·C may pass 2^31
    m_cols = m_ptr + offs_r[None, :].to(tl.int64) * stride_mr

    if HAS_LN:
        # Chan's pairwise merge of per-tile (mean, M2) into the running pair: one pass over x.
        mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
        n_a = 0.0
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + offs_c0
            mask_c = offs_c < C
            mask = mask_t[:, None] & mask_c[None, :]
            x = tl.load(a_rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            n_b = tl.sum(mask_c.to(tl.float32), axis=0)
            mean_b = tl.sum(x, axis=1) / n_b
            d = tl.where(mask, x - mean_b[:, None], 0.0)
            m2_b = tl.sum(d * d, axis=1)
            n = n_a + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n)
            m2 = m2 + m2_b + delta * delta * (n_a * n_b / n)
            n_a = n
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        tl.store(mean_ptr + offs_t, mean, mask=mask_t)
        tl.store(rstd_ptr + offs_t, rstd, mask=mask_t)

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + offs_c0
        mask_c = offs_c < C
        a = tl.load(a_rows + offs_c[None, :], mask=mask_t[:, None] & mask_c[None, :], other=0.0)
        if HAS_LN:
            w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            h = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * w[None, :]
            if has_ln_bias:
                h += tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            a = h.to(a_ptr.dtype.element_ty)  # LN(x) in x's dtype, as PyTorch stores it
        # mᵀ tile (BLOCK_C, BLOCK_R) in a's dtype, so fp16/bf16 run on tensor cores.
        mt = tl.load(m_cols + offs_c[:, None].to(tl.int64) * stride_mc,
                     mask=mask_c[:, None] & mask_r[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, mt, acc, input_precision=DOT_PRECISION)

    acc = acc * scale
    if has_bias:
        acc += tl.load(bias_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    z_offs = offs_t[:, None].to(tl.int64) * R + offs_r[None, :]
    mask = mask_t[:, None] & mask_r[None, :]
    if act != 0:
        acc = acc * _adapter_bottleneck_act_grad(tl.load(zin_ptr + z_offs, mask=mask, other=0.0), act)
    tl.store(z_ptr + z_offs, acc, mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC[:4] + ["act", "has_bias", "has_res"])
def _adapter_bottleneck_up_kernel(
    out_ptr, res_ptr, u_ptr, m_ptr, bias_ptr,
    T, C, R,
    stride_mr, stride_mc,
    alpha, act, has_bias, has_res,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[t, c] = res[t, c] + alpha·(Σ_r act(u[t, r])·m[c, r] + bias[c]); one (BLOCK_T, BLOCK_C) tile.

    out, res (T, C) contiguous; u (T, R) fp32 contiguous; m (C, R) any strides. R is looped in
    BLOCK_R chunks (act(0) = 0 for every activation, so masked lanes add nothing).
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    mask_c = offs_c < C
    u_rows = u_ptr + offs_t[:, None].to(tl.int64) * R
    m_cols = m_ptr + offs_c[None, :].to(tl.int64) * stride_mc
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_rows + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        mt = tl.load(m_cols + offs_r[:, None].to(tl.int64) * stride_mr,
                     mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(_adapter_bottleneck_act(u, act).to(mt.dtype), mt, acc, input_precision=DOT_PRECISION)
    if has_bias:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    acc = acc * alpha
    mask = mask_t[:, None] & mask_c[None, :]
    offs = offs_t[:, None].to(tl.int64) * C + offs_c[None, :]
    if has_res:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC[:5] + ["act", "has_ln_bias", "has_colsum"])
def _adapter_bottleneck_wgrad_kernel(
    u_ptr, a_ptr, m_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, g_ptr, colsum_ptr, lng_ptr,
    T, C, R, rows_per_split,
    stride_mr, stride_mc,
    alpha, act, has_ln_bias, has_colsum,
    HAS_LN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RG: tl.constexpr,
):
    """Partial sums over the rows of split s; program (C tile, split s):

        g[s, r, c]    = alpha·Σ_t act(u[t, r])·h[t, c],  h = LN(a) (from mean/rstd) if HAS_LN else a
        colsum[s, c]  = alpha·Σ_t a[t, c]                            when has_colsum
        lng[s, 0, c]  = Σ_t g_h[t, c]·x̂[t, c], lng[s, 1, c] = Σ_t g_h[t, c],  g_h = u·m    when HAS_LN

    u (T, R) fp32 contiguous; a (T, C) contiguous; m (R, C) any strides; g (SPLIT, R, C),
    colsum (SPLIT, C), lng (SPLIT, 2, C) fp32 contiguous. rows_per_split is a multiple of BLOCK_T.
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_c = offs_c < C
    mask_r = offs_r < R
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_LN:
        w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if has_ln_bias:
            b = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        m_cols = m_ptr + offs_c[None, :].to(tl.int64) * stride_mc
        dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + offs_t0
        mask_t = offs_t < t_end
        mask = mask_t[:, None] & mask_c[None, :]
        a = tl.load(a_ptr + offs_t[:, None].to(tl.int64) * C + offs_c[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + offs_t[:, None].to(tl.int64) * R + offs_r[None, :],
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        # act(u) rounded to a's dtype for the tensor-core dot (padded rows/ranks are act(0) = 0).
        u = _adapter_bottleneck_act(u, act).to(a.dtype)
        if has_colsum:
            colsum += tl.sum(a.to(tl.float32), axis=0)
        if HAS_LN:
            mean = tl.load(mean_ptr + offs_t, mask=mask_t, other=0.0)
            rstd = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0)
            xhat = (a.to(tl.float32) - mean[:, None]) * rstd[:, None]  # 0 on padded rows (rstd = 0)
            # g_h = u·m in chunks of BLOCK_RG ranks re-read from L1/L2: a dot whose reduction dim is
            # the whole rank held its operands in registers and spilled (fp32 R=128: 588 B on sm_80).
            g_h = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_RG):
                offs_rg = r0 + tl.arange(0, BLOCK_RG)
                mask_rg = offs_rg < R
                ug = tl.load(u_ptr + offs_t[:, None].to(tl.int64) * R + offs_rg[None, :],
                             mask=mask_t[:, None] & mask_rg[None, :], other=0.0)
                mg = tl.load(m_cols + offs_rg[:, None].to(tl.int64) * stride_mr,
                             mask=mask_rg[:, None] & mask_c[None, :], other=0.0)
                g_h = tl.dot(ug.to(mg.dtype), mg, g_h, input_precision=DOT_PRECISION)
            dw += tl.sum(g_h * xhat, axis=0)
            db += tl.sum(g_h, axis=0)
            a = tl.where(mask, xhat * w[None, :] + b[None, :], 0.0).to(a.dtype)
        acc = tl.dot(tl.trans(u), a, acc, input_precision=DOT_PRECISION)
    acc = acc * alpha
    g_ptrs = g_ptr + (pid_s * R + offs_r[:, None]).to(tl.int64) * C + offs_c[None, :]
    tl.store(g_ptrs, acc, mask=mask_r[:, None] & mask_c[None, :])
    if has_colsum:
        tl.store(colsum_ptr + pid_s.to(tl.int64) * C + offs_c, colsum * alpha, mask=mask_c)
    if HAS_LN:
        lng = lng_ptr + pid_s.to(tl.int64) * 2 * C + offs_c
        tl.store(lng, dw, mask=mask_c)
        tl.store(lng + C, db, mask=mask_c)


@triton.jit(do_not_specialize=_NO_SPEC[:4] + ["has_res"])
def _adapter_bottleneck_ln_bwd_kernel(
    gx_ptr, gout_ptr, x_ptr, u_ptr, m_ptr, mean_ptr, rstd_ptr, lnw_ptr,
    T, C, R,
    stride_mr, stride_mc,
    has_res,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """gx = gout? + rstd·(g·w − Σ_c(g·w)/C − x̂·Σ_c(g·w·x̂)/C), g = u·m; one program per BLOCK_T rows.

    Pass 1 over C accumulates the two row sums, pass 2 recomputes g (a (BLOCK_T, R)·(R, BLOCK_C)
    dot, R ≤ 256: cheaper than a (T, C) fp32 round trip through memory) and writes gx.
    gx, gout, x (T, C) contiguous; u (T, R) fp32 contiguous; m (R, C) any strides; mean, rstd (T) fp32.
    """
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c0 = tl.arange(0, BLOCK_C)
    mask_t = offs_t < T
    rows = offs_t[:, None].to(tl.int64) * C
    u_rows = u_ptr + offs_t[:, None].to(tl.int64) * R
    mean = tl.load(mean_ptr + offs_t, mask=mask_t, other=0.0)
    rstd = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0)
    s1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for p in tl.static_range(2):
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + offs_c0
            mask_c = offs_c < C
            mask = mask_t[:, None] & mask_c[None, :]
            g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < R
                u = tl.load(u_rows + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :], other=0.0)
                mk = tl.load(m_ptr + offs_r[:, None].to(tl.int64) * stride_mr + offs_c[None, :].to(tl.int64)
                             * stride_mc, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
                g = tl.dot(u.to(mk.dtype), mk, g, input_precision=DOT_PRECISION)
            w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[:, None]) * rstd[:, None]
            gw = g * w[None, :]  # 0 in padded columns (w = 0 there)
            if p == 0:
                s1 += tl.sum(gw, axis=1)
                s2 += tl.sum(gw * xhat, axis=1)
            else:
                gx = rstd[:, None] * (gw - (s1[:, None] + xhat * s2[:, None]) / C)
                if has_res:
                    gx += tl.load(gout_ptr + rows + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(gx_ptr + rows + offs_c[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Configs: one table read by the launchers and by the static check (AOT_CONFIGS), so they agree.
# --------------------------------------------------------------------------------------------------
_MAX_R = 256
_R_CLASSES = (16, 32, 64, 128, 256)  # tl.dot needs every dim ≥ 16; R is padded to a power of two.
# Programs wanted for wgrad before it splits T: two waves of an H100's 132 SMs.
_WGRAD_TARGET_PROGRAMS = 264


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _config(kernel: str, dtype: torch.dtype, r: int, aligned: bool, has_ln: bool = False) -> dict:
    """Constexprs plus num_warps/num_stages of `kernel` for input `dtype`, rank `r` and alignment.

    Checked with llmkern.kernel_report (ptxas -v, sm_80 and sm_90a: no spills, registers in the
    module's report); none is timed, as no GPU is at hand. TODO(bench): sweep them on an H100.
    """
    fp32 = dtype == torch.float32
    block_r = _block_r(r)
    prec = "ieee"  # fp32: IEEE FMA dot, as torch's allow_tf32=False; fp16/bf16 ignore it (mma)
    if kernel in ("up", "ln_bwd"):
        # R is the reduction dim, looped in chunks of ≤ 32 (16 in fp32, whose FMA-dot operand
        # layouts cost more registers): 2 variants per dtype and alignment, whatever R is.
        # up: 64×64 tiles spilled in fp32 (12 B on sm_80) and unaligned bf16 (4 B); 32×64 fit (≤ 168
        # registers). ln_bwd (x, w, g tiles live across its epilogue): unaligned 32×64 spilled
        # (136-264 B on sm_80); fp32 fits at 16×64, unaligned fp16/bf16 at 32×32.
        if kernel == "up":
            cfg = dict(BLOCK_T=64 if aligned and not fp32 else 32, BLOCK_C=64)
        else:
            cfg = dict(BLOCK_T=16 if fp32 else 32, BLOCK_C=64 if aligned or fp32 else 32)
        return {**cfg, "BLOCK_R": 16 if fp32 else min(block_r, 32), "DOT_PRECISION": prec, "num_warps": 4,
                "num_stages": 2}
    if kernel not in ("down", "wgrad"):
        raise KeyError(kernel)
    # The accumulator holds the whole rank: (BLOCK_T, BLOCK_R) or (BLOCK_R, BLOCK_C) fp32. As in
    # lora_linear, 64×64 activation tiles fit only when 16-byte aligned with BLOCK_R ≤ 32 in a 2-byte
    # dtype; 32×32 elsewhere; fp32 wgrad's FMA-dot operands grow with BLOCK_T (its reduction dim).
    small = block_r >= 64 or fp32 or not aligned
    block_t = (16 if fp32 and kernel == "wgrad" else 32) if small else 64
    block_c = 32 if small else 64
    # fp32 at R = 256 spilled with 32 channels per program (wgrad: 188 B on sm_90, down: 36 B on
    # sm_80); 16 fit in ≤ 236 registers.
    if fp32 and block_r >= 256:
        block_c = 16
    warps = 8 if block_r >= 128 or (fp32 and block_r >= 64) else 4
    if kernel == "wgrad" and has_ln:
        # The row loop also forms g_h = u·m (BLOCK_T, BLOCK_C): a 64×64 tile spilled (fp16 on sm_90:
        # 16 B), 32×64 fit in 142-168 registers. fp32 at R ≤ 32 spilled 8-16 B on sm_80 with 4 warps
        # and fits in ≤ 128 registers with 8.
        if not small:
            block_t = 32
        if fp32:
            warps = 8
    cfg = dict(BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps,
               num_stages=2 if fp32 else 3)
    if kernel == "wgrad":
        cfg["BLOCK_RG"] = 16 if fp32 else min(block_r, 32)
    return {**cfg, "HAS_LN": has_ln, "DOT_PRECISION": prec}


_KERNEL_FNS = {"down": _adapter_bottleneck_down_kernel, "up": _adapter_bottleneck_up_kernel,
               "wgrad": _adapter_bottleneck_wgrad_kernel, "ln_bwd": _adapter_bottleneck_ln_bwd_kernel}
# Runtime argument types besides "*<input dtype>" pointers and i32 scalars: the fp32 buffers and scalars.
_TYPES = {**dict.fromkeys(("zin_ptr", "z_ptr", "mean_ptr", "rstd_ptr", "u_ptr", "g_ptr", "colsum_ptr", "lng_ptr"),
                          "*fp32"), **dict.fromkeys(("scale", "eps", "alpha"), "fp32")}


def _aot_config(kernel: str, dtype: torch.dtype, r: int, aligned: bool, has_ln: bool) -> AotConfig:
    t = _TL_DTYPE[dtype]
    return variant(_KERNEL_FNS[kernel], _config(kernel, dtype, r, aligned, has_ln), dtype=t, pointee=t,
                   types=_TYPES, aligned_row="C" if aligned else None)


# Every distinct variant the launchers can compile: kernel × dtype × R class × alignment × LN.
AOT_CONFIGS: list[AotConfig] = distinct(_aot_config, _KERNEL_FNS, _TL_DTYPE, _R_CLASSES, (True, False), (False, True))


def _check_limits(x, r: int, act: int) -> None:
    """What only these kernels limit. Shapes, dtypes and devices were checked by the op
    (llmkern/ops/adapter_bottleneck.py), as the C++ kernels' by csrc/ops/adapter_bottleneck.h."""
    if x.dtype not in _TL_DTYPE or not x.is_contiguous():
        raise ValueError(f"adapter_bottleneck (Triton): x must be contiguous fp32, fp16 or bf16, got {x.dtype} "
                         f"with strides {tuple(x.stride())}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"adapter_bottleneck (Triton): rank R={r} is outside [1, {_MAX_R}]")
    if not 1 <= act <= NUM_ACTIVATIONS:
        raise ValueError(f"adapter_bottleneck (Triton): the activation code must be in [1, {NUM_ACTIVATIONS}], "
                         f"got {act!r}")


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def adapter_bottleneck_fwd(x, down_weight, down_bias, up_weight, up_bias, scale: float, act: int,
                           ln_weight, ln_bias, eps: float, residual):
    """out = r + scale·(act(z)·up_weightᵀ + up_bias), z = LN?(x)·down_weightᵀ + down_bias.

    x (T, C) contiguous; down_weight (R, C), up_weight (C, R) any strides; down_bias (R), up_bias,
    ln_weight, ln_bias (C) or None; residual (T, C) or None (r = x); all contiguous but the weights, in
    x's dtype, on x's device, checked by the op (llmkern/ops/adapter_bottleneck.py). act: the code.
    Returns (out (T, C) x.dtype, z (T, R) fp32, mean (T) fp32, rstd (T) fp32); mean/rstd are (0)
    without LayerNorm.
    """
    (t, c), r = x.shape, down_weight.shape[0]
    _check_limits(x, r, act)
    has_ln = ln_weight is not None
    f32 = dict(dtype=torch.float32, device=x.device)
    z = torch.empty((t, r), **f32)
    mean = torch.empty((t,) if has_ln else (0,), **f32)
    rstd = torch.empty_like(mean)
    out = torch.empty_like(x)
    if t == 0:
        return out, z, mean, rstd
    # Absent optional tensors are passed as some tensor of the right dtype; their flag keeps them unread.
    db, ub = _or(down_bias, x), _or(up_bias, x)
    lnw, lnb = _or(ln_weight, x), _or(ln_bias, x)
    res = _or(residual, x)
    stats = (mean, rstd) if has_ln else (z, z)

    cfg = _config("down", x.dtype, r, _is_aligned(c, x, down_weight, db, lnw, lnb, z, *stats), has_ln)
    _adapter_bottleneck_down_kernel[(triton.cdiv(t, cfg["BLOCK_T"]),)](
        x, down_weight, db, lnw, lnb, z, z, *stats, t, c, r, down_weight.stride(0), down_weight.stride(1),
        1.0, float(eps), 0, int(down_bias is not None), int(ln_bias is not None), **cfg)

    cfg = _config("up", x.dtype, r, _is_aligned(c, out, res, z, up_weight, ub))
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(c, cfg["BLOCK_C"]))
    _adapter_bottleneck_up_kernel[grid](
        out, res, z, up_weight, ub, t, c, r, up_weight.stride(1), up_weight.stride(0),
        float(scale), act, int(up_bias is not None), 1, **cfg)
    return out, z, mean, rstd


def adapter_bottleneck_bwd(grad_out, x, down_weight, down_bias, up_weight, scale: float, act: int,
                           ln_weight, ln_bias, z, mean, rstd, residual_is_x: bool):
    """Every gradient of adapter_bottleneck_fwd, in x's dtype, accumulated in fp32.

    grad_out, x (T, C) contiguous; z (T, R), mean/rstd (T) fp32 from the forward ((0) without LN).
    Returns (grad_x, grad_down_weight (R, C), grad_down_bias (R), grad_up_weight (C, R),
    grad_up_bias (C), grad_ln_weight, grad_ln_bias): the last two are (C) with LayerNorm (grad_ln_bias
    is Σ_t g_h even when ln_bias is None: what a bias would get) and (0) without. grad_x includes
    grad_out when residual_is_x; a separate residual's gradient is grad_out itself (not returned).
    down_bias is only checked: no gradient depends on its value.
    """
    (t, c), r = x.shape, down_weight.shape[0]
    _check_limits(x, r, act)
    has_ln = ln_weight is not None
    dev = x.device
    dtype, f32 = x.dtype, dict(dtype=torch.float32, device=dev)
    n_ln = c if has_ln else 0
    if t == 0:
        z32 = torch.zeros
        return (torch.empty_like(x), z32((r, c), dtype=dtype, device=dev), z32((r,), dtype=dtype, device=dev),
                z32((c, r), dtype=dtype, device=dev), z32((c,), dtype=dtype, device=dev),
                z32((n_ln,), dtype=dtype, device=dev), z32((n_ln,), dtype=dtype, device=dev))
    lnw, lnb = _or(ln_weight, x), _or(ln_bias, x)
    stats = (mean, rstd) if has_ln else (z, z)

    # g_z = s·(grad_out·U) ⊙ act'(z): the down kernel on grad_out with m = Uᵀ.
    g_z = torch.empty((t, r), **f32)
    cfg = _config("down", dtype, r, _is_aligned(c, grad_out, up_weight, x, z, g_z))
    _adapter_bottleneck_down_kernel[(triton.cdiv(t, cfg["BLOCK_T"]),)](
        grad_out, up_weight, x, x, x, z, g_z, z, z, t, c, r, up_weight.stride(1), up_weight.stride(0),
        float(scale), 0.0, act, 0, 0, **cfg)

    # grad_U = s·grad_outᵀ·act(z), grad_u = s·Σ_t grad_out.
    g_up, colsum, _ = _wgrad(z, grad_out, up_weight, stats, lnw, lnb, alpha=float(scale), act=act,
                             colsum=True, has_ln=False, has_ln_bias=False)
    # grad_D = g_zᵀ·LN?(x) and, with LN, grad_ln_w = Σ_t g_h·x̂, grad_ln_b = Σ_t g_h (g_h = g_z·D).
    g_down, _, lng = _wgrad(g_z, x, down_weight, stats, lnw, lnb, alpha=1.0, act=0, colsum=False,
                            has_ln=has_ln, has_ln_bias=ln_bias is not None)

    grad_x = torch.empty_like(x)
    if has_ln:
        aligned = _is_aligned(c, grad_x, grad_out, x, g_z, down_weight, mean, rstd, lnw)
        cfg = _config("ln_bwd", dtype, r, aligned)
        _adapter_bottleneck_ln_bwd_kernel[(triton.cdiv(t, cfg["BLOCK_T"]),)](
            grad_x, grad_out, x, g_z, down_weight, mean, rstd, lnw, t, c, r,
            down_weight.stride(0), down_weight.stride(1), int(residual_is_x), **cfg)
        grad_ln_w, grad_ln_b = _own(lng[0], dtype), _own(lng[1], dtype)
    else:
        # grad_x = grad_out? + g_z·D: the up kernel with m = Dᵀ, no activation, no bias.
        cfg = _config("up", dtype, r, _is_aligned(c, grad_x, grad_out, g_z, down_weight))
        grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(c, cfg["BLOCK_C"]))
        _adapter_bottleneck_up_kernel[grid](
            grad_x, grad_out, g_z, down_weight, x, t, c, r, down_weight.stride(0), down_weight.stride(1),
            1.0, 0, 0, int(residual_is_x), **cfg)
        grad_ln_w, grad_ln_b = (torch.zeros((0,), dtype=dtype, device=dev) for _ in range(2))
    return (grad_x, _own(g_down, dtype), g_z.sum(0).to(dtype), _own(g_up.t(), dtype), _own(colsum, dtype),
            grad_ln_w, grad_ln_b)


def _or(t, default):
    return default if t is None else t


def _own(t, dtype):
    """A fresh contiguous copy in `dtype`: outputs never alias each other or the split buffers
    (fp32 .to() would return a view; a registered op's outputs must not share storage)."""
    return t.to(dtype, memory_format=torch.contiguous_format, copy=True)


def _wgrad(u, a, m, stats, lnw, lnb, *, alpha, act, colsum, has_ln, has_ln_bias):
    """(G (R, C), colsum (C) or None, lng (2, C) or None) in fp32, T split across programs.

    m is (R, C) as the kernel reads it (down_weight itself; for the up wgrad it is unread).
    """
    t, c = a.shape
    r = u.shape[1]
    cfg = _config("wgrad", a.dtype, r, _is_aligned(c, u, a, m, lnw, lnb, *stats), has_ln)
    c_tiles = triton.cdiv(c, cfg["BLOCK_C"])
    t_tiles = triton.cdiv(t, cfg["BLOCK_T"])
    split = max(1, min(t_tiles, triton.cdiv(_WGRAD_TARGET_PROGRAMS, c_tiles)))
    rows_per_split = triton.cdiv(t_tiles, split) * cfg["BLOCK_T"]
    split = triton.cdiv(t, rows_per_split)
    f32 = dict(dtype=torch.float32, device=a.device)
    g = torch.empty((split, r, c), **f32)
    cs = torch.empty((split, c), **f32) if colsum else g
    lng = torch.empty((split, 2, c), **f32) if has_ln else g
    _adapter_bottleneck_wgrad_kernel[(c_tiles, split)](
        u, a, m, *stats, lnw, lnb, g, cs, lng, t, c, r, rows_per_split, m.stride(0), m.stride(1),
        alpha, act, int(has_ln_bias), int(colsum), **cfg)

    def total(p):
        return p[0] if split == 1 else p.sum(0)

    return total(g), total(cs) if colsum else None, total(lng) if has_ln else None
