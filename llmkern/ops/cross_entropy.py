"""Cross-entropy of logits against integer labels: online softmax over the vocabulary in chunks, fp32
math, ``ignore_index``, ``label_smoothing``, an optional z-loss, reductions mean/sum/none.

    loss_t = (1-ε)·(lse_t - x_t[y_t]) + ε·(lse_t - mean_v x_t[v]) + z·lse_t²,  lse_t = log Σ_v exp x_t[v]

(0 for ignored labels; "mean" divides the sum by the number of labels that are not ignored, as
torch.nn.functional.cross_entropy does, and is NaN when every label is ignored, as torch's is.)

Logits (..., V) in fp32, fp16 or bf16 go in as they are: there is no fp32 copy of the (T, V) logits
(transformers' loss upcasts them with ``logits.float()`` first). Autograd keeps the logits (which the
caller holds anyway: a model returns them) and the per-row logsumexp (T) fp32, never a softmax or
log-probabilities (eager keeps fp32 log-probabilities, 4 bytes per logit); the backward recomputes
exp(x - lse) and writes the gradient, scaled by the incoming gradient, in one pass rounded once.
(Writing the gradient during the forward, as the issue sketched, stores it in the logits' 16-bit
dtype and rounds it a second time when the incoming gradient scales it: up to 7x PyTorch's error in
fp16, which the 2x/3x rule refuses; recomputing costs the same passes over memory: the forward
then reads the logits once instead of reading and writing them.)

Backends: ``cpu`` (llmkern._C), ``triton`` and ``ref`` (:func:`cross_entropy_ref`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmkern.ops import _backends

__all__ = ["cross_entropy", "cross_entropy_ref", "Reduction", "UNAVAILABLE"]

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")
DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton


def cross_entropy_ref(logits, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                      reduction: Reduction = "mean"):
    """The oracle and fallback: F.cross_entropy on fp32 (fp64) logits, plus z·lse² on valid rows."""
    x = logits.reshape(-1, logits.shape[-1])
    x = x.double() if x.dtype == torch.float64 else x.float()
    y = labels.reshape(-1)
    losses = F.cross_entropy(x, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        losses = losses + z_loss * torch.where(y != ignore_index, torch.logsumexp(x, -1), 0.0).square()
    return _reduce(losses, y, ignore_index, reduction, labels.shape)


def _reduce(losses, labels, ignore_index, reduction, shape):
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum()


def check_cross_entropy_inputs(logits, labels, ignore_index, label_smoothing, z_loss, reduction) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"cross_entropy: logits must have shape (..., V) with V >= 1, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels must have shape {tuple(logits.shape[:-1])} (logits' without V), got "
                         f"{tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"cross_entropy: labels must be int64, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"cross_entropy: logits and labels must be on the same device, got {logits.device} and "
                         f"{labels.device}")
    if logits.dtype not in DTYPES["ref"]:
        raise TypeError(f"cross_entropy: logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"cross_entropy: z_loss must be >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")


def _fake_forward(logits, labels, ignore_index, label_smoothing, z_loss):
    t = logits.shape[0]
    return logits.new_empty((t,), dtype=torch.float32), logits.new_empty((t,), dtype=torch.float32)


def _fake_backward(grad_losses, logits, labels, lse, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.save_for_backward(logits, labels, output[1])  # the logits (the caller's) and lse (T): no softmax
    ctx.args = (ignore_index, label_smoothing, z_loss)


def _make_backward(ns: str):
    def backward(ctx, grad_losses, _glse):
        logits, labels, lse = ctx.saved_tensors
        g = getattr(torch.ops, ns)._cross_entropy_backward(grad_losses.float().contiguous(), logits, labels, lse,
                                                             *ctx.args)
        return g, None, None, None, None
    return backward


def _triton():
    from llmkern.triton_kernels import cross_entropy as tk

    return {"cross_entropy": tk.cross_entropy_fwd, "_cross_entropy_backward": tk.cross_entropy_bwd}


UNAVAILABLE = _backends.register_op(
    "cross_entropy", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_cross_entropy_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context))


def cross_entropy(logits, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                  reduction: Reduction = "mean", backend: _backends.Backend | None = None):
    """Cross-entropy of logits (..., V) against labels (...) int64 (see the module docstring).

    Returns a 0-d fp32 tensor for "mean" and "sum", per-label fp32 losses of labels' shape for "none"
    (fp64 for fp64 logits on ``ref``).
    """
    check_cross_entropy_inputs(logits, labels, ignore_index, label_smoothing, z_loss, reduction)
    chosen = _backends.choose("cross_entropy", [logits], DTYPES, backend, supported=SUPPORTED)
    if chosen == "ref":
        return cross_entropy_ref(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 z_loss=z_loss, reduction=reduction)
    v = logits.shape[-1]
    y = labels.reshape(-1)
    losses = _backends.op("cross_entropy", chosen)(
        logits.reshape(-1, v), y, ignore_index, float(label_smoothing), float(z_loss))[0]
    return _reduce(losses, y, ignore_index, reduction, labels.shape)
