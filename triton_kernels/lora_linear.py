"""Triton kernels and launchers of the fused LoRA linear op.

    y = x·Wᵀ + b + s·(dropout_p(x)·Aᵀ)·Bᵀ        x (N, C_in), W (C_out, C_in), A (R, C_in), B (C_out, R)

The base GEMM x·Wᵀ stays in torch (cuBLAS); the three LoRA kernels here do the rest:

    lora_down     u = scale·drop(x)·mᵀ                (N, K) × (R, K) → (N, R) fp32
    lora_up_add_  out += alpha·drop'(u·mᵀ)            (N, R) × (C, R) → (N, C), in place
    lora_wgrad    G = alpha·uᵀ·drop(x)                (N, R) × (N, K) → (R, K) fp32

Backward saves x and u = drop(x)·Aᵀ (fp32) only; the dropout mask is regenerated from (seed, offset)
by the counter-based hash of csrc/include/llmkern/rng.h (triton_kernels/_rng.py, in uint32
arithmetic), tested bit for bit against llmkern/_rng.py. Element (n, k) of an (N, K) row-major view
uses counter offset + n·row_stride + k (64-bit, split into lo/hi 32-bit words); the launchers take
offset = offset + col_offset and row_stride = K on a single device (rng.h). A dropped element is
multiplied by 0 as PyTorch's x * mask does, so a dropped NaN or inf gives NaN (tl.where(keep, x, x·0)).

Numerics and tiles (decided on paper and with the static check; nothing is timed, as the build
machines have no GPU):
- Every dot accumulates in fp32. Its operands are in the input dtype: fp16/bf16 operands run on
  tensor cores (H100 SXM: ~990 dense TFLOP/s bf16 vs ~67 TFLOP/s fp32 FMA). lora_down's
  arithmetic intensity is R flop/byte for bf16 x, so at R ≥ 32 an fp32-FMA dot would be
  compute-bound (ridge ≈ 67e12 / 3.35e12 = 20 flop/byte).
- The fp32 operand u is rounded to the weight dtype (lora_up_add_) or x's dtype (lora_wgrad) before
  the dot: a relative 2^-9 (bf16) / 2^-12 (fp16) error, the same rounding PyTorch's own bf16/fp16
  path applies when it stores x·Aᵀ in bf16. Products of two bf16/fp16 values are exact in fp32.
- fp32 inputs use an IEEE fp32 dot (FMA, no TF32), as torch's default allow_tf32=False does, so the
  "2× PyTorch's error" rule holds on a GPU too. The interpreter computes every dot exactly in fp32.
- Dropout zeroes elements in the input dtype (exact) and folds 1/(1-p) into the fp32 epilogue
  scale, so a kept element is never rounded twice.
- Element-wise math is done in fp32 (.to(tl.float32) first): bf16 arithmetic is wrong in
  TRITON_INTERPRET=1 mode. The interpreter's bf16 tl.dot is wrong too (triton#11584); the tests
  patch InterpreterBuilder.create_dot, so the interpreter runs the very code the GPU runs.
- lora_wgrad reduces over N. It splits N across programs and writes fp32 partials that torch sums
  (deterministic, unlike fp32 atomics). SPLIT ≈ 264 / (K / BLOCK_K) (two waves of 132 SMs), so the
  partials take ≈ 264·BLOCK_K·R·4 bytes ≤ 8.3 MiB whatever K is.
- Tiles (_config) are the ones that compile without register spills for sm_80 and sm_90a in both
  alignment variants the JIT builds (see _NO_SPEC and AOT_CONFIGS; tests/static checks them all).
- Dtypes: x/out and the weight m must share a dtype (fp32, fp16 or bf16), so that every variant the
  launchers can run is one the static check compiled; cast the weight first under autocast.

Offsets that can pass 2^31 elements (row · row_stride) are formed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern._rng import as_int32, check_dropout_p, dropout_key, dropout_threshold
from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, distinct, is_aligned as _is_aligned, variant
from llmkern.triton_kernels._rng import counter_hash

__all__ = ["lora_down", "lora_up_add_", "lora_wgrad", "lora_linear_fwd", "lora_linear_bwd", "AOT_CONFIGS"]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lora_linear_row_counter(offset, row_start):
    """(lo, hi) uint32 words of the 64-bit counters offset + row_start (row_start: int64 tensor)."""
    c = tl.cast(offset, tl.int64) + row_start
    return c.to(tl.uint32), (c >> 32).to(tl.uint32)


@triton.jit
def _lora_linear_keep(row_lo, row_hi, cols, key, threshold):
    """Keep-mask of counters (row_lo, row_hi) + cols: rng.h's dropout_keep in 32-bit arithmetic.

    row_lo/row_hi: uint32 (BLOCK_N, 1); cols: int32 (1, BLOCK) with 0 ≤ cols < 2^31; key: int32 holding
    the uint32 key bits. The 64-bit add is done as a 32-bit add plus carry: per element that is half
    the registers of int64 counters (the down kernel with dropout spilled with int64 counters).
    """
    lo = row_lo + cols.to(tl.uint32)
    hi = row_hi + (lo < row_lo).to(tl.uint32)
    h = counter_hash(lo, hi, tl.cast(key, tl.uint32, bitcast=True))
    return (h >> 8).to(tl.int32) >= threshold


# Specialization. Triton's JIT compiles a variant per (int == 1, int % 16 == 0, pointer % 16 == 0)
# pattern of the arguments. Only the alignment of the big (N, K) tiles changes the code that matters
# (16-byte vector loads and the register layout that comes with them), so the launchers let Triton
# specialize the pointers and the row length K or C, and nothing else: the RNG scalars change every
# step, and N, R and the weight strides would only multiply variants (the weight tiles are ≤ R/64 of
# the activation traffic and stay in L2). AOT_CONFIGS then holds the two variants that bound what the
# JIT builds: "aligned" (all pointers and K/C divisible by 16: 64-wide tiles where they fit) and
# "any" (no alignment known: small tiles). Mixed cases (e.g. aligned x, odd K, or a misaligned weight
# view) get the small tiles, whose loads are then at most as wide as in the aligned variant; they and
# K == 1 or C == 1 (which Triton turns into constants) are not compiled by the static check.
_NO_SPEC = ["N", "R", "stride_mr", "stride_mk", "stride_mc", "rows_per_split", "key", "threshold", "offset",
            "row_stride"]


@triton.jit(do_not_specialize=[a for a in _NO_SPEC if a not in ("stride_mc", "rows_per_split")])
def _lora_linear_down_kernel(
    x_ptr, m_ptr, u_ptr,
    N, K, R,
    stride_mr, stride_mk,
    scale, key, threshold, offset, row_stride,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[n, r] = scale · Σ_k drop(x)[n, k] · m[r, k]. One program per BLOCK_N rows, loop over K.

    x (N, K) contiguous, m (R, K) any strides, u (N, R) fp32 contiguous. `scale` already holds
    1/(1-p) when HAS_DROPOUT.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k0 = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_r = offs_r < R
    row = offs_n.to(tl.int64) * K  # int64: N·K may pass 2^31
    x_rows = x_ptr + row[:, None]
    m_cols = m_ptr + offs_r[None, :].to(tl.int64) * stride_mr
    if HAS_DROPOUT:
        row_lo, row_hi = _lora_linear_row_counter(offset, offs_n.to(tl.int64) * row_stride)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _lora_linear_keep(row_lo[:, None], row_hi[:, None], offs_k[None, :], key, threshold)
            x = tl.where(keep, x, (x.to(tl.float32) * 0.0).to(x.dtype))
        # mᵀ tile (BLOCK_K, BLOCK_R), in x's dtype so fp16/bf16 run on tensor cores.
        mt = tl.load(m_cols + offs_k[:, None].to(tl.int64) * stride_mk,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(x.dtype)
        acc = tl.dot(x, mt, acc, input_precision=DOT_PRECISION)
    acc = acc * scale
    u_ptrs = u_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=mask_n[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=[a for a in _NO_SPEC if a not in ("stride_mk", "rows_per_split")])
def _lora_linear_up_add_kernel(
    out_ptr, u_ptr, m_ptr,
    N, C, R,
    stride_mc, stride_mr,
    alpha, key, threshold, offset, row_stride,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[n, c] += alpha · keep(n, c) · Σ_r u[n, r] · m[c, r]; one (BLOCK_N, BLOCK_C) tile per program.

    out (N, C) contiguous, u (N, R) fp32 contiguous, m (C, R) any strides (called with A.t()).
    The reduction over R runs in BLOCK_R chunks (a single (64, 128) u tile plus a (128, 64) m tile
    spilled in fp32). `alpha` holds 1/(1-p) when HAS_DROPOUT.
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    u_rows = u_ptr + offs_n[:, None].to(tl.int64) * R
    m_cols = m_ptr + offs_c[None, :].to(tl.int64) * stride_mc
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_rows + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        mt = tl.load(m_cols + offs_r[:, None].to(tl.int64) * stride_mr,
                     mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(u.to(mt.dtype), mt, acc, input_precision=DOT_PRECISION)
    acc = acc * alpha
    row = offs_n.to(tl.int64) * C
    if HAS_DROPOUT:
        row_lo, row_hi = _lora_linear_row_counter(offset, offs_n.to(tl.int64) * row_stride)
        keep = _lora_linear_keep(row_lo[:, None], row_hi[:, None], offs_c[None, :], key, threshold)
        acc = tl.where(keep, acc, acc * 0.0)
    mask = mask_n[:, None] & mask_c[None, :]
    out_ptrs = out_ptr + row[:, None] + offs_c[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=[a for a in _NO_SPEC if a not in ("stride_mr", "stride_mk", "stride_mc")])
def _lora_linear_wgrad_kernel(
    u_ptr, x_ptr, g_ptr,
    N, K, R, rows_per_split,
    alpha, key, threshold, offset, row_stride,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """g[s, r, k] = alpha · Σ_{n in split s} u[n, r] · drop(x)[n, k]; program (k tile, split s).

    u (N, R) fp32 contiguous, x (N, K) contiguous, g (SPLIT, R, K) fp32 contiguous.
    rows_per_split is a multiple of BLOCK_N, so splits never share a tile.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_r = offs_r < R
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < n_end
        row = offs_n.to(tl.int64) * K
        x = tl.load(x_ptr + row[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            row_lo, row_hi = _lora_linear_row_counter(offset, offs_n.to(tl.int64) * row_stride)
            keep = _lora_linear_keep(row_lo[:, None], row_hi[:, None], offs_k[None, :], key, threshold)
            x = tl.where(keep, x, (x.to(tl.float32) * 0.0).to(x.dtype))
        # uᵀ tile (BLOCK_R, BLOCK_N), rounded to x's dtype for the tensor-core dot.
        ut = tl.load(u_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None],
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(ut.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
    acc = acc * alpha
    g_ptrs = g_ptr + (pid_s * R + offs_r[:, None]).to(tl.int64) * K + offs_k[None, :]
    tl.store(g_ptrs, acc, mask=mask_r[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------------------------------
# Configs: one table read by the launchers and by the static check (AOT_CONFIGS), so they agree.
# --------------------------------------------------------------------------------------------------
_BLOCK_RS = (16, 32, 64, 128)  # tl.dot needs every dim ≥ 16; R ≤ 128 is padded to a power of two.
_MAX_R = 128
# Programs wanted for lora_wgrad before it splits N: two waves of an H100's 132 SMs.
_WGRAD_TARGET_PROGRAMS = 264


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _config(kernel: str, dtype: torch.dtype, r: int, aligned: bool, dropout: bool = True) -> dict:
    """Constexprs plus num_warps/num_stages of `kernel` for input `dtype`, rank `r` and alignment.

    Checked with llmkern.kernel_report (ptxas -v, sm_80 and sm_90a); none is timed, as no GPU is at
    hand. TODO(bench): sweep them on an H100.
    """
    fp32 = dtype == torch.float32
    block_r = _block_r(r)
    # fp32 runs an IEEE FMA dot, as torch computes fp32 matmuls by default (allow_tf32=False); its
    # operand layouts cost more registers than mma's, hence the smaller fp32 tiles below.
    prec = "ieee"
    if kernel == "up_add":
        # R is up_add's reduction dim, looped in chunks: one (64, 128) u tile plus a (128, 64) m tile
        # spilled thousands of bytes in fp32; fp32 chunks of 32 still spilled 40 B on sm_80.
        cfg = dict(BLOCK_N=64, BLOCK_C=64, BLOCK_R=16 if fp32 else min(block_r, 32), num_warps=4,
                   num_stages=2)
    elif kernel in ("down", "wgrad"):
        # The accumulator holds the whole rank: (BLOCK_N, BLOCK_R) or (BLOCK_R, BLOCK_K) fp32.
        # 64×64 activation tiles fit only when 16-byte aligned with BLOCK_R ≤ 32 (2-byte dtypes). An
        # unaligned tile gets a (1, 32)-per-warp layout, so each thread holds 32 rows of pointers and
        # RNG counters (255 registers and spills at 64×64); 32×32 tiles fit everywhere.
        # fp32 wgrad: the FMA dot's operand fragments grow with BLOCK_N, its reduction dim; BLOCK_N=32
        # compiled at 248-254 registers for BLOCK_R ≥ 64, BLOCK_N=16 at ≤ 155.
        small = block_r >= 64 or fp32 or not aligned
        block_n = (16 if fp32 and kernel == "wgrad" else 32) if small else 64
        cfg = dict(BLOCK_N=block_n, BLOCK_R=block_r,
                   num_warps=8 if block_r >= 128 or (fp32 and block_r >= 64) else 4,
                   num_stages=2 if fp32 else 3)
        cfg["BLOCK_K"] = 32 if (fp32 or not aligned) else 64
    else:
        raise KeyError(kernel)
    cfg.update(HAS_DROPOUT=dropout, DOT_PRECISION=prec)
    return cfg


# kernel -> (jit function, its row-length argument); runtime argument types besides "*<input dtype>"
# pointers and i32 scalars.
_KERNEL_FNS = {"down": (_lora_linear_down_kernel, "K"), "up_add": (_lora_linear_up_add_kernel, "C"),
               "wgrad": (_lora_linear_wgrad_kernel, "K")}
_TYPES = {"u_ptr": "*fp32", "g_ptr": "*fp32", "scale": "fp32", "alpha": "fp32", "offset": "i64", "row_stride": "i64"}


def _aot_config(kernel: str, dtype: torch.dtype, r: int, aligned: bool, dropout: bool) -> AotConfig:
    fn, row_len = _KERNEL_FNS[kernel]
    t = _TL_DTYPE[dtype]
    return variant(fn, _config(kernel, dtype, r, aligned, dropout), dtype=t, pointee=t, types=_TYPES,
                   aligned_row=row_len if aligned else None)


# Every distinct variant the launchers can compile: kernel × dtype × R class × dropout × alignment.
AOT_CONFIGS: list[AotConfig] = distinct(_aot_config, _KERNEL_FNS, _TL_DTYPE, _BLOCK_RS, (True, False), (False, True))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check_contiguous(**tensors):
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"lora_linear (Triton): {name} must be contiguous, got strides "
                             f"{tuple(t.stride())} for shape {tuple(t.shape)}; call .contiguous() first")


def _check_2d(**tensors):
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"lora_linear (Triton): {name} must be 2-D, got shape {tuple(t.shape)}")


def _check_dtype(**tensors):
    for name, t in tensors.items():
        if t.dtype not in _TL_DTYPE:
            raise ValueError(f"lora_linear (Triton): {name} has dtype {t.dtype}; supported: fp32, fp16, bf16")


def _check_same_dtype(**tensors):
    (a, ta), (b, tb) = tensors.items()
    if ta.dtype != tb.dtype:
        raise ValueError(f"lora_linear (Triton): {a} is {ta.dtype} but {b} is {tb.dtype}; "
                         f"cast {b} to {ta.dtype}")


def _check_rank(r: int):
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"lora_linear (Triton): rank R={r} is outside [1, {_MAX_R}]")


def _dropout_args(p: float, seed: int, scale: float) -> tuple[bool, float, int, int]:
    """(HAS_DROPOUT, scale with 1/(1-p) folded in, key as int32 bits, threshold)."""
    check_dropout_p(p, "lora_linear (Triton)")
    if p == 0.0:
        return False, float(scale), 0, 0
    return True, float(scale) / (1.0 - p), as_int32(dropout_key(seed)), dropout_threshold(p)


def _row_stride(row_stride: int | None, k: int, col_offset: int) -> int:
    """The counter distance between rows (rng.h): k on a single device; checked as the C++ ops check it."""
    stride = k if row_stride is None else row_stride
    if col_offset < 0 or stride < col_offset + k:
        raise ValueError(f"lora_linear (Triton): the dropout counter needs 0 <= col_offset and col_offset + "
                         f"C_in <= row_stride, got col_offset={col_offset}, C_in={k}, row_stride={stride}")
    return stride


def lora_down(x: torch.Tensor, m: torch.Tensor, *, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
              offset: int = 0, col_offset: int = 0, row_stride: int | None = None) -> torch.Tensor:
    """u = scale · drop(x) · mᵀ in fp32.

    x (N, K) contiguous; m (R, K), any strides (the backward passes B.t()). Mask counter of x[n, k]:
    offset + col_offset + n·row_stride + k (row_stride None: K). Returns u (N, R) fp32.
    """
    _check_2d(x=x, m=m)
    _check_dtype(x=x, m=m)
    _check_same_dtype(x=x, m=m)
    _check_contiguous(x=x)
    n, k = x.shape
    r = m.shape[0]
    if m.shape[1] != k:
        raise ValueError(f"lora_down: m must be (R, {k}), got {tuple(m.shape)}")
    _check_rank(r)
    has_dropout, scale_eff, key, threshold = _dropout_args(dropout_p, seed, scale)
    stride = _row_stride(row_stride, k, col_offset)
    if n == 0 or k == 0:
        return torch.zeros((n, r), dtype=torch.float32, device=x.device)
    u = torch.empty((n, r), dtype=torch.float32, device=x.device)
    cfg = _config("down", x.dtype, r, _is_aligned(k, x, m, u), has_dropout)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _lora_linear_down_kernel[grid](x, m, u, n, k, r, m.stride(0), m.stride(1), scale_eff, key, threshold,
                                   offset + col_offset, stride, **cfg)
    return u


def lora_up_add_(out: torch.Tensor, u: torch.Tensor, m: torch.Tensor, *, alpha: float, dropout_p: float = 0.0,
                 seed: int = 0, offset: int = 0, col_offset: int = 0, row_stride: int | None = None) -> torch.Tensor:
    """out += alpha · drop'(u · mᵀ) in place, accumulated in fp32 and rounded once to out's dtype.

    out (N, C) contiguous; u (N, R) fp32 contiguous; m (C, R), any strides (called with A.t()).
    With dropout_p > 0, element (n, c) is multiplied by keep(offset + col_offset + n·row_stride + c) / (1 - p)
    (row_stride None: C): the backward of dropout on the input. Returns out.
    """
    _check_2d(out=out, u=u, m=m)
    _check_dtype(out=out, m=m)
    _check_same_dtype(out=out, m=m)
    if u.dtype != torch.float32:
        raise ValueError(f"lora_up_add_: u must be fp32, got {u.dtype}")
    _check_contiguous(out=out, u=u)
    n, c = out.shape
    r = u.shape[1]
    if u.shape[0] != n or tuple(m.shape) != (c, r):
        raise ValueError(f"lora_up_add_: shapes out {tuple(out.shape)}, u {tuple(u.shape)}, "
                         f"m {tuple(m.shape)} do not match (N, C), (N, R), (C, R)")
    _check_rank(r)
    has_dropout, alpha_eff, key, threshold = _dropout_args(dropout_p, seed, alpha)
    stride = _row_stride(row_stride, c, col_offset)
    if n == 0 or c == 0:
        return out
    cfg = _config("up_add", out.dtype, r, _is_aligned(c, out, u, m), has_dropout)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_C"]))
    _lora_linear_up_add_kernel[grid](out, u, m, n, c, r, m.stride(0), m.stride(1), alpha_eff, key, threshold,
                                     offset + col_offset, stride, **cfg)
    return out


def lora_wgrad(u: torch.Tensor, x: torch.Tensor, *, alpha: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
               offset: int = 0, col_offset: int = 0, row_stride: int | None = None) -> torch.Tensor:
    """G = alpha · uᵀ · drop(x) in fp32.

    u (N, R) fp32 contiguous; x (N, K) contiguous. Mask counter of x[n, k]: offset + col_offset +
    n·row_stride + k (row_stride None: K).
    Returns G (R, K) fp32. Deterministic: N is split across programs into fp32 partials summed by torch.
    """
    _check_2d(u=u, x=x)
    _check_dtype(x=x)
    if u.dtype != torch.float32:
        raise ValueError(f"lora_wgrad: u must be fp32, got {u.dtype}")
    _check_contiguous(u=u, x=x)
    n, k = x.shape
    r = u.shape[1]
    if u.shape[0] != n:
        raise ValueError(f"lora_wgrad: u {tuple(u.shape)} and x {tuple(x.shape)} differ in N")
    _check_rank(r)
    has_dropout, alpha_eff, key, threshold = _dropout_args(dropout_p, seed, alpha)
    stride = _row_stride(row_stride, k, col_offset)
    if n == 0 or k == 0:
        return torch.zeros((r, k), dtype=torch.float32, device=x.device)
    cfg = _config("wgrad", x.dtype, r, _is_aligned(k, u, x), has_dropout)
    k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(n_tiles, triton.cdiv(_WGRAD_TARGET_PROGRAMS, k_tiles)))
    rows_per_split = triton.cdiv(n_tiles, split) * cfg["BLOCK_N"]
    split = triton.cdiv(n, rows_per_split)
    g = torch.empty((split, r, k), dtype=torch.float32, device=x.device)
    _lora_linear_wgrad_kernel[(k_tiles, split)](u, x, g, n, k, r, rows_per_split, alpha_eff, key, threshold,
                                                offset + col_offset, stride, **cfg)
    return g[0] if split == 1 else g.sum(0)


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, offset, col_offset=0, row_stride=None):
    """y = x·Wᵀ + b + scale·(drop(x)·Aᵀ)·Bᵀ; returns (y, u) with u = drop(x)·Aᵀ (N, R) fp32 for backward.

    x (N, C_in), weight (C_out, C_in), bias (C_out) or None, lora_a (R, C_in), lora_b (C_out, R).
    """
    _check_contiguous(x=x)
    y = torch.nn.functional.linear(x, weight, bias)
    u = lora_down(x, lora_a, dropout_p=dropout_p, seed=seed, offset=offset, col_offset=col_offset,
                  row_stride=row_stride)
    lora_up_add_(y, u, lora_b, alpha=scale)
    return y, u


def lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, u, scale, dropout_p, seed, offset, col_offset=0,
                    row_stride=None):
    """Gradients of lora_linear_fwd w.r.t. x, lora_a, lora_b (grad_a/grad_b in the params' dtype).

    gu = scale·grad_y·B (N, R) fp32; grad_b = scale·grad_yᵀ·u; grad_a = guᵀ·drop(x);
    grad_x = grad_y·W + drop'(gu·A), where drop' regenerates the forward mask from (seed, offset).
    """
    _check_contiguous(grad_y=grad_y, x=x)
    gu = lora_down(grad_y, lora_b.t(), scale=scale)
    grad_b = lora_wgrad(u, grad_y, alpha=scale).t().contiguous().to(lora_b.dtype)
    counter = dict(dropout_p=dropout_p, seed=seed, offset=offset, col_offset=col_offset, row_stride=row_stride)
    grad_a = lora_wgrad(gu, x, **counter).to(lora_a.dtype)
    grad_x = grad_y @ weight
    lora_up_add_(grad_x, gu, lora_a.t(), alpha=1.0, **counter)
    return grad_x, grad_a, grad_b
