"""The LM head matmul fused with the cross-entropy, over chunks of tokens: the (T, V) logits never exist.

    loss = cross_entropy(hidden·weightᵀ, labels)      (llmkern.ops.cross_entropy's math and options)

Shapes: hidden (..., C), weight (V, C) (the LM head, no bias; a tied embedding is fine), labels (...)
int64. fp32, fp16 and bf16 (fp64 on ``ref``). The logits of a chunk are computed in hidden's dtype,
as the unfused ``lm_head`` does, and the loss in fp32 from them.

Memory: per chunk of tokens one (chunk, V) buffer in hidden's dtype holds the logits and then, in
place, their gradient; nothing else of size T·V. The chunk size comes from T, V, C and
``max_chunk_bytes`` (:func:`chunk_size_for`); pass ``chunk_size`` to fix it. Against the unfused
lm_head + F.cross_entropy (logits, an fp32 copy, log-probabilities and their gradients: ~14-18
bytes per logit in bf16), the extra memory is chunk·V·(2 or 4) bytes besides the gradients.

Gradients: for "mean" and "sum" they are formed during the forward, chunk by chunk, with the GEMMs
the unfused backward would run (so the FLOPs are the same: one GEMM forward, two backward), and the
backward scales them by the incoming gradient, in place (out of place under retain_graph and in
traced backwards: csrc/ops/fused_linear_cross_entropy.cpp). The head's gradient is formed only when
weight requires grad (a frozen head under LoRA costs nothing), the hidden states' only when they do.
For "none" the forward computes the losses only and the backward recomputes each chunk's logits
with the per-token incoming gradients (one GEMM more), since a per-token weighting cannot be applied
to a gradient summed over tokens afterwards.

Backends: ``cpu`` (llmkern._C), ``triton`` and ``ref`` (:func:`fused_linear_cross_entropy_ref`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern.ops import _backends
from llmkern.ops.cross_entropy import REDUCTIONS, Reduction, cross_entropy_ref

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_ref", "chunk_size_for", "DEFAULT_MAX_CHUNK_BYTES",
           "UNAVAILABLE"]

DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton

DEFAULT_MAX_CHUNK_BYTES = 128 << 20
"""The logits buffer's cap: 512 tokens at V = 128K in bf16, 2048 at V = 32K. The GEMMs stay large:
(512 x 2048) x (2048 x 128K) per chunk."""

HEAD_CHUNK_DIVISOR = 4
"""With a trained head the chunk is also at most C / 4 tokens (and at least MIN_HEAD_CHUNK): the (chunk,
V) buffer is then at most a quarter of the head's (V, C) gradient, the one tensor of the op's memory
that cannot be avoided. At T = C = 2048 that makes 4 chunks of 512 tokens, which a 16-bit head's
gradient sums without its compensation term (csrc/ops/cpu/fused_linear_cross_entropy_kernel.cpp,
kPlainChunks): the peak extra memory of a forward and backward is then gradient + buffer = 0.5 + 0.13
GB at V = 128K in bf16 (0.13 + 0.03 at V = 32K), against ~3.2 (0.8) GB for lm_head + F.cross_entropy
(bench/ops/bench_fused_linear_cross_entropy.py)."""

MIN_HEAD_CHUNK = 256
"""The fewest tokens per chunk HEAD_CHUNK_DIVISOR leads to (a small C must not make the GEMMs small)."""


def fused_linear_cross_entropy_ref(hidden, weight, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                                   z_loss: float = 0.0, reduction: Reduction = "mean"):
    """The oracle and fallback: lm_head then the loss, unfused (F.linear, then cross_entropy_ref)."""
    return cross_entropy_ref(F.linear(hidden, weight), labels, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)


def chunk_size_for(t: int, v: int, element_size: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, *,
                   trained_head_c: int | None = None) -> int:
    """Tokens per chunk: as many as fit a (chunk, V) buffer of element_size bytes in max_chunk_bytes
    (at least 1) and, when the head trains (trained_head_c = C), at most max(C / HEAD_CHUNK_DIVISOR,
    MIN_HEAD_CHUNK); then evened out so that the chunks of T have equal sizes (no short last chunk)."""
    if max_chunk_bytes < 1:
        raise ValueError(f"fused_linear_cross_entropy: max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    if t <= 0:
        return 1
    cap = max(1, min(t, max_chunk_bytes // max(1, v * element_size)))
    if trained_head_c is not None:
        cap = min(cap, max(trained_head_c // HEAD_CHUNK_DIVISOR, MIN_HEAD_CHUNK))
    chunks = -(-t // cap)
    return -(-t // chunks)


def check_inputs(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size) -> None:
    if hidden.dim() < 1:
        raise ValueError("fused_linear_cross_entropy: hidden must have shape (..., C), got a 0-d tensor")
    c = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != c or weight.shape[0] < 1:
        raise ValueError(f"fused_linear_cross_entropy: weight must have shape (V, C) = (V, {c}) with V >= 1, got "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: labels must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"without C), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"fused_linear_cross_entropy: labels must be int64, got {labels.dtype}")
    if hidden.dtype not in DTYPES["ref"] or weight.dtype != hidden.dtype:
        raise TypeError(f"fused_linear_cross_entropy: hidden and weight must share a dtype among float32, float16, "
                        f"bfloat16, float64; got {hidden.dtype} and {weight.dtype}")
    for name, t in (("weight", weight), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"fused_linear_cross_entropy: hidden and {name} must be on the same device, got "
                             f"{hidden.device} and {t.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fused_linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"fused_linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


def _fake_forward(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, grad_hidden,
                  grad_weight):
    total = reduction == "sum"
    loss = hidden.new_empty(() if total else (hidden.shape[0],), dtype=torch.float32)
    gh = hidden.new_empty(hidden.shape if total and grad_hidden else (0,))
    gw = hidden.new_empty(weight.shape if total and grad_weight else (0,))
    return loss, gh, gw


def _fake_backward(grad_loss, hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size, grad_hidden,
                   grad_weight):
    return hidden.new_empty(hidden.shape if grad_hidden else (0,)), hidden.new_empty(weight.shape if grad_weight else (0,))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size, _, _ = inputs
    _, gh, gw = output
    # gh and gw are gradients, not differentiable outputs; their incoming gradients are never used, and
    # materialized they were zero tensors as large as gh and gw (a second (V, C) tensor at the backward).
    ctx.mark_non_differentiable(gh, gw)
    ctx.set_materialize_grads(False)
    ctx.total = reduction == "sum"
    if ctx.total:
        ctx.save_for_backward(gh, gw)  # the finished gradients of the sum (the op's own outputs)
    else:
        ctx.save_for_backward(hidden, weight, labels)
        ctx.args = (ignore_index, label_smoothing, z_loss, chunk_size)


def _scale_in_place(gh: torch.Tensor, gw: torch.Tensor) -> bool:
    """Whether the backward may scale the forward's gradients in place: in an eager backward that frees
    the graph after it (no retain_graph: nothing reads them again), on plain tensors. A traced backward
    (torch.compile, opcheck: fake or functional tensor subclasses) stays functional; see
    csrc/ops/fused_linear_cross_entropy.cpp."""
    if torch.compiler.is_compiling() or torch._C._autograd._get_current_graph_task_keep_graph():
        return False
    return type(gh) is torch.Tensor and type(gw) is torch.Tensor


def _make_backward(ns: str):
    def backward(ctx, grad_loss, _ggh, _ggw):
        ops = getattr(torch.ops, ns)
        need = ctx.needs_input_grad
        if grad_loss is None:  # the loss was not used (only a direct caller of the op can see gh, gw)
            return (None,) * 10
        if ctx.total:
            gh, gw = ctx.saved_tensors
            if _scale_in_place(gh, gw):
                ops._fused_linear_cross_entropy_scale_(gh, gw, grad_loss.float())
            else:
                gh, gw = ops._fused_linear_cross_entropy_scale(gh, gw, grad_loss.float())
        else:
            hidden, weight, labels = ctx.saved_tensors
            gh, gw = ops._fused_linear_cross_entropy_backward(grad_loss.float().contiguous(), hidden, weight, labels,
                                                              *ctx.args, need[0], need[1])
        return (gh if need[0] else None, gw if need[1] else None) + (None,) * 8
    return backward


def _triton():
    from llmkern.triton_kernels import fused_linear_cross_entropy as tk

    return {"fused_linear_cross_entropy": tk.fused_linear_cross_entropy_fwd,
            "_fused_linear_cross_entropy_backward": tk.fused_linear_cross_entropy_bwd,
            "_fused_linear_cross_entropy_scale": tk.fused_linear_cross_entropy_scale,
            "_fused_linear_cross_entropy_scale_": tk.fused_linear_cross_entropy_scale_}


UNAVAILABLE = _backends.register_op(
    "fused_linear_cross_entropy", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_fused_linear_cross_entropy_backward", fake=_fake_backward,
                                formula=_make_backward, setup_context=_setup_context))
for _ns in _backends.namespaces("fused_linear_cross_entropy"):
    torch.library.register_fake(f"{_ns}::_fused_linear_cross_entropy_scale")(
        lambda gh, gw, g: (torch.empty_like(gh), torch.empty_like(gw)))
    torch.library.register_fake(f"{_ns}::_fused_linear_cross_entropy_scale_")(lambda gh, gw, g: None)


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, reduction: Reduction = "mean", chunk_size: int | None = None,
                               max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                               backend: _backends.Backend | None = None):
    """cross_entropy(hidden·weightᵀ, labels) without the (T, V) logits (see the module docstring).

    Returns a 0-d fp32 tensor for "mean" and "sum", per-label fp32 losses of labels' shape for "none".
    """
    check_inputs(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    chosen = _backends.choose("fused_linear_cross_entropy", [hidden, weight], DTYPES, backend, supported=SUPPORTED)
    if chosen == "ref":
        return fused_linear_cross_entropy_ref(hidden, weight, labels, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
    c, v = hidden.shape[-1], weight.shape[0]
    h2, y = hidden.reshape(-1, c), labels.reshape(-1)
    grad = torch.is_grad_enabled()
    chunk = chunk_size or chunk_size_for(h2.shape[0], v, hidden.element_size(), max_chunk_bytes,
                                         trained_head_c=c if grad and weight.requires_grad else None)
    loss = _backends.op("fused_linear_cross_entropy", chosen)(
        h2, weight, y, ignore_index, float(label_smoothing), float(z_loss), "none" if reduction == "none" else "sum",
        int(chunk), grad and hidden.requires_grad, grad and weight.requires_grad)[0]
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss / (y != ignore_index).sum() if reduction == "mean" else loss
