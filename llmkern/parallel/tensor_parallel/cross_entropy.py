"""Cross-entropy over vocabulary-parallel logits, without gathering the (N, V) logits.

Each rank holds the logits of its vocabulary block (..., V/tp) (the output of a column-parallel LM
head without gather_output). The loss of token n with label y is

    lse_n - z_ny                          (nll)
    (1 - ε)·(lse_n - z_ny) + ε·(lse_n - Σ_j z_nj / V)   (label smoothing ε, as F.cross_entropy)

where lse_n = m_n + log Σ_j exp(z_nj - m_n). Forward: the row maxima all-reduced (MAX), then one
all-reduce (SUM) of the stacked per-row partial sums Σ exp(z - m), z_ny (on the rank that owns y,
0 elsewhere) and, with smoothing, Σ z: 2 collectives of O(N) elements, where gathering would move
O(N·V). Backward needs none: ∂loss/∂z_nj = p_nj - (1 - ε)·[j = y_n] - ε/V on each rank's block,
from the block's softmax kept in fp32 (N, V/tp) by forward. Megatron's vocab_parallel_cross_entropy
makes 3 all-reduces; the two SUMs are one here.

Rows whose label is ignore_index contribute 0 and are not counted; reduction "mean" divides by the
number of counted rows (NaN when there is none, as F.cross_entropy). Padded vocabulary columns
(layout.py) get logit -inf: probability 0, gradient 0, not part of the smoothing mean over V.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from llmkern.parallel import collectives, groups
from llmkern.parallel.tensor_parallel.layout import ShardLayout
from llmkern.parallel.tensor_parallel.regions import DEFAULT_COMM, TPComm

__all__ = ["vocab_parallel_cross_entropy"]

Reduction = Literal["mean", "sum", "none"]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, pg, layout, ignore_index, eps, reduction, comm):
        v_local = logits.shape[-1]
        z = logits.reshape(-1, v_local).float()
        if z.data_ptr() == logits.data_ptr():
            z = z.clone()  # fp32 logits: work on a copy, the caller's logits are left alone
        valid, start, world = layout.valid, layout.start, layout.world
        if valid < v_local:
            z[:, valid:] = float("-inf")
        y = labels.reshape(-1)
        ignored = y == ignore_index
        kw = {"backend": comm.backend, "check": comm.check, "timeout": comm.timeout_s}

        m = z.amax(-1) if v_local else z.new_full((z.shape[0],), float("-inf"))
        if world > 1:
            collectives.all_reduce_(m, pg, op="max", **kw)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows (N with V = 0) stay nan-free
        p = z.sub_(m_safe.unsqueeze(1)).exp_()  # z is consumed: p holds exp(z - m)
        local_y = y - start
        mine = (~ignored) & (local_y >= 0) & (local_y < valid)
        col = local_y.clamp(0, max(v_local - 1, 0)).unsqueeze(1)
        parts = [p.sum(-1)]
        if v_local:
            # z_ny - m from p: log p_ny = z_ny - m exactly where p_ny > 0; taking the logit itself is exact
            # everywhere, so gather it from the input instead.
            zy = logits.reshape(-1, v_local).gather(1, col).squeeze(1).float() - m_safe
        else:
            zy = torch.zeros_like(m)
        parts.append(torch.where(mine, zy, torch.zeros_like(zy)))
        if eps > 0:
            dense = logits.reshape(-1, v_local)[:, :valid].float().sum(-1) - valid * m_safe
            parts.append(dense)
        stacked = torch.stack(parts)
        if world > 1:
            collectives.all_reduce_(stacked, pg, op="sum", accumulate_dtype=None, **kw)
        s = stacked[0]
        lse = s.log()  # relative to m
        loss = lse - stacked[1]
        if eps > 0:
            loss = (1.0 - eps) * loss + eps * (lse - stacked[2] / layout.size)
        loss = loss.masked_fill(ignored, 0.0)
        count = (~ignored).sum()
        p.div_(s.unsqueeze(1))  # the block's softmax
        ctx.save_for_backward(p, col, mine, ignored, count)
        ctx.eps, ctx.reduction, ctx.size, ctx.valid = eps, reduction, layout.size, valid
        ctx.shape, ctx.dtype, ctx.label_shape = logits.shape, logits.dtype, labels.shape
        if reduction == "none":
            return loss.to(logits.dtype).reshape(labels.shape)
        total = loss.sum()
        out = total / count if reduction == "mean" else total
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, g):
        p, col, mine, ignored, count = ctx.saved_tensors
        g = g.float()
        if ctx.reduction == "none":
            gn = g.reshape(-1)
        elif ctx.reduction == "mean":
            gn = (g / count).expand(p.shape[0])
        else:
            gn = g.expand(p.shape[0])
        gn = gn.masked_fill(ignored, 0.0)
        grad = p * gn.unsqueeze(1)
        if grad.shape[1]:
            hit = torch.where(mine, gn * (1.0 - ctx.eps), torch.zeros_like(gn))
            grad.scatter_add_(1, col, -hit.unsqueeze(1))
            if ctx.eps > 0:
                grad[:, :ctx.valid] -= (ctx.eps / ctx.size) * gn.unsqueeze(1)
        return grad.to(ctx.dtype).reshape(ctx.shape), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group, *, vocab_size: int | None = None,
                                 ignore_index: int = -100, label_smoothing: float = 0.0,
                                 reduction: Reduction = "mean", comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """F.cross_entropy(dense_logits, labels, ...) from this rank's block of the logits.

    logits: (..., V_block) this rank's vocabulary block (V_block = ceil(V / tp), padding included),
        fp32, fp16 or bf16 (the math is fp32).
    labels: (...) int64 class indices in [0, V) or ignore_index, the same on every rank.
    vocab_size: the dense V (default V_block * tp, no padding).
    Returns the loss in the logits' dtype: a scalar, or (...) with reduction="none".
    """
    pg = groups.resolve(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if not isinstance(comm, TPComm):
        raise TypeError(f"vocab_parallel_cross_entropy: comm must be a TPComm, got {type(comm).__name__}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_cross_entropy: logits must be a floating-point tensor (..., V_block), got "
                        f"{logits.dtype} of shape {tuple(logits.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vocab_parallel_cross_entropy: labels must be int64 class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"vocab_parallel_cross_entropy: labels of shape {tuple(labels.shape)} must match the logits' "
                         f"leading dimensions {tuple(logits.shape[:-1])}")
    if labels.device != logits.device:
        raise ValueError(f"vocab_parallel_cross_entropy: labels on {labels.device}, logits on {logits.device}")
    v_block = logits.shape[-1]
    vocab_size = v_block * world if vocab_size is None else vocab_size
    layout = ShardLayout(vocab_size, world, rank)
    if layout.per_rank != v_block:
        raise ValueError(f"vocab_parallel_cross_entropy: a vocabulary of {vocab_size} over tp={world} gives blocks of "
                         f"{layout.per_rank} logits per rank, got {v_block}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    counted = labels[labels != ignore_index]
    if counted.numel():
        lo, hi = (int(v) for v in torch.aminmax(counted))
        if lo < 0 or hi >= vocab_size:
            raise IndexError(f"vocab_parallel_cross_entropy: labels must be in [0, {vocab_size}) or ignore_index="
                             f"{ignore_index}, got labels in [{lo}, {hi}]")
    return _VocabParallelCE.apply(logits, labels.long(), pg, layout, int(ignore_index), float(label_smoothing),
                                  reduction, comm)
