"""Launchers of the LM head matmul fused with the cross-entropy (llmkern/ops/fused_linear_cross_entropy.py).

Per chunk of tokens, in one (chunk, V) buffer: logits = hidden_c·Wᵀ by torch.mm (cuBLAS), the
cross-entropy row kernel of triton_kernels/cross_entropy.py writing the gradient over the logits in
place, then grad_hidden_c = d·W and grad_weight += dᵀ·hidden_c by torch.mm/addmm: the three GEMMs
of the unfused forward and backward, and the (T, V) logits never exist at once. The one Triton
kernel of its own is the fp32 scaling of those gradients by the incoming 0-d gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any
from llmkern.triton_kernels.cross_entropy import check_labels, cross_entropy_rows

__all__ = ["fused_linear_cross_entropy_fwd", "fused_linear_cross_entropy_bwd", "fused_linear_cross_entropy_scale",
           "fused_linear_cross_entropy_scale_", "AOT_CONFIGS"]

_SCALE_BLOCK = 1024


@triton.jit
def _fused_linear_cross_entropy_scale_kernel(x_ptr, g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[i] = x[i]·g in fp32, one rounding (g: a 0-d fp32 tensor); zeros stay zero when g is inf or NaN
    (a mean over no valid label), as torch's gradients of ignored labels do."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.where(x == 0.0, 0.0, x * g).to(out_ptr.dtype.element_ty), mask=mask)


AOT_CONFIGS: list[AotConfig] = [
    c for t in _TL_DTYPE.values() for c in aligned_and_any(
        _fused_linear_cross_entropy_scale_kernel,
        {"x_ptr": f"*{t}", "g_ptr": "*fp32", "out_ptr": f"*{t}", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": _SCALE_BLOCK}, num_warps=4, dtype=t, row="n")]


def _fail(msg: str):
    raise ValueError(f"fused_linear_cross_entropy (Triton): {msg}")


def _check(hidden, weight, labels, label_smoothing, z_loss, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        _fail(f"hidden must be (T, C) and weight (V, C) with V >= 1, got {tuple(hidden.shape)} and "
              f"{tuple(weight.shape)}")
    if hidden.dtype not in _TL_DTYPE or weight.dtype != hidden.dtype:
        _fail(f"hidden and weight must share a dtype among float32, float16, bfloat16, got {hidden.dtype} and "
              f"{weight.dtype}")
    if labels.shape != (hidden.shape[0],):
        _fail(f"labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing <= 1.0 or z_loss < 0.0 or chunk_size < 1:
        _fail(f"label_smoothing must be in [0, 1], z_loss >= 0 and chunk_size >= 1, got {label_smoothing}, "
              f"{z_loss}, {chunk_size}")


# Rows of grad_weight per compensated update, and the most chunks a 16-bit grad_weight sums without the
# compensation term (csrc/ops/cpu/fused_linear_cross_entropy_kernel.cpp: kVocabBlock, kPlainChunks).
_VOCAB_BLOCK = 2048
_PLAIN_CHUNKS = 4


def _chunks(hidden, weight, labels, ignore_index, smoothing, z_loss, chunk_size, row_scale, losses, gh, gw):
    """As the C++ chunks(): a 16-bit grad_weight summed over more than _PLAIN_CHUNKS chunks carries a
    second 16-bit term lo, so that hi + lo keeps the bits one rounding per chunk would drop."""
    t, v = hidden.shape[0], weight.shape[0]
    if gw is not None:
        gw.zero_()
    if t == 0:
        return
    rows = min(chunk_size, t)
    compensate = gw is not None and hidden.dtype != torch.float32 and -(-t // rows) > _PLAIN_CHUNKS
    buf = torch.empty((rows, v), dtype=hidden.dtype, device=hidden.device)
    lse = torch.empty((rows,), dtype=torch.float32, device=hidden.device)
    lo = torch.zeros_like(gw) if compensate else None
    grads = gh is not None or gw is not None
    for t0 in range(0, t, rows):
        n = min(rows, t - t0)
        h = hidden[t0:t0 + n]
        logits = buf[:n]
        torch.mm(h, weight.t(), out=logits)
        cross_entropy_rows(logits, labels[t0:t0 + n], ignore_index, smoothing, z_loss, losses[t0:t0 + n], lse[:n],
                           logits if grads else None, row_scale[t0:t0 + n] if row_scale is not None else None)
        if gh is not None:
            torch.mm(logits, weight, out=gh[t0:t0 + n])
        if gw is None:
            continue
        if not compensate:
            gw.addmm_(logits.t(), h)
            continue
        for v0 in range(0, v, _VOCAB_BLOCK):
            part = torch.mm(logits[:, v0:v0 + _VOCAB_BLOCK].t(), h).float()
            hi, lo_b = gw[v0:v0 + _VOCAB_BLOCK], lo[v0:v0 + _VOCAB_BLOCK]
            total = hi.float() + (lo_b.float() + part)
            hi.copy_(total)
            lo_b.copy_(total - hi.float())


def fused_linear_cross_entropy_fwd(hidden, weight, labels, ignore_index: int, label_smoothing: float, z_loss: float,
                                   reduction: str, chunk_size: int, grad_hidden: bool, grad_weight: bool):
    """(loss (0-d sum or (T) per row, fp32), grad_hidden, grad_weight) as the schema says."""
    _check(hidden, weight, labels, label_smoothing, z_loss, chunk_size)
    if reduction not in ("sum", "none"):
        _fail(f"reduction must be 'sum' or 'none' (the Python wrapper forms 'mean'), got {reduction!r}")
    check_labels(labels, weight.shape[0], ignore_index, "fused_linear_cross_entropy")
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    t, c = hidden.shape
    total = reduction == "sum"
    losses = torch.empty((t,), dtype=torch.float32, device=hidden.device)
    gh = hidden.new_empty((t, c)) if total and grad_hidden else None
    gw = weight.new_empty(weight.shape) if total and grad_weight else None
    _chunks(hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size, None, losses, gh, gw)
    return (losses.sum() if total else losses), (hidden.new_empty((0,)) if gh is None else gh), \
        (hidden.new_empty((0,)) if gw is None else gw)


def fused_linear_cross_entropy_bwd(grad_loss, hidden, weight, labels, ignore_index: int, label_smoothing: float,
                                   z_loss: float, chunk_size: int, grad_hidden: bool, grad_weight: bool):
    """The reduction="none" backward: each chunk recomputed with the per-row incoming gradients."""
    _check(hidden, weight, labels, label_smoothing, z_loss, chunk_size)
    t, c = hidden.shape
    if grad_loss.shape != (t,) or grad_loss.dtype != torch.float32:
        _fail(f"grad_loss must be ({t},) float32, got {tuple(grad_loss.shape)} {grad_loss.dtype}")
    check_labels(labels, weight.shape[0], ignore_index, "_fused_linear_cross_entropy_backward")
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    losses = torch.empty((t,), dtype=torch.float32, device=hidden.device)
    gh = hidden.new_empty((t, c)) if grad_hidden else None
    gw = weight.new_empty(weight.shape) if grad_weight else None
    _chunks(hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size, grad_loss.contiguous(), losses,
            gh, gw)
    return (hidden.new_empty((0,)) if gh is None else gh), (hidden.new_empty((0,)) if gw is None else gw)


def _scale_into(x, grad_loss, out):
    n = x.numel()
    if n:
        _fused_linear_cross_entropy_scale_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](x, grad_loss, out, n,
                                                                                  BLOCK=_SCALE_BLOCK, num_warps=4)


def _check_grad_loss(grad_loss, op):
    if grad_loss.dim() != 0 or grad_loss.dtype != torch.float32:
        _fail(f"{op}: grad_loss must be a 0-d float32 tensor, got {tuple(grad_loss.shape)} {grad_loss.dtype}")


def fused_linear_cross_entropy_scale(grad_hidden, grad_weight, grad_loss):
    """(grad_hidden·grad_loss, grad_weight·grad_loss) in fp32 math, one rounding (grad_loss: 0-d fp32)."""
    _check_grad_loss(grad_loss, "_fused_linear_cross_entropy_scale")
    outs = []
    for x in (grad_hidden, grad_weight):
        x = x.contiguous()
        out = torch.empty_like(x)
        _scale_into(x, grad_loss, out)
        outs.append(out)
    return tuple(outs)


def fused_linear_cross_entropy_scale_(grad_hidden, grad_weight, grad_loss):
    """grad_hidden and grad_weight times grad_loss, in place (each element read, scaled in fp32 and
    written back by the same program: no element is read after another program wrote it)."""
    _check_grad_loss(grad_loss, "_fused_linear_cross_entropy_scale_")
    for x in (grad_hidden, grad_weight):
        if not x.is_contiguous():
            _fail(f"_fused_linear_cross_entropy_scale_: the gradients must be contiguous (the forward's outputs), "
                  f"got strides {x.stride()}")
        _scale_into(x, grad_loss, x)
