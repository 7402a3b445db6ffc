"""The scalars of one optimizer step, on the device: the overflow flag `found_inf` and the gradient
coefficient `grad_coef` = clip_coef / grad_scale that the fused update multiplies every gradient by.

Nothing here reads a device value on the host, and nothing needs a torch.optim.Optimizer: the
inputs are gradients paired with the process groups their elements are partitioned across, so the
same code serves whole parameters (FusedAdamW), tensor-parallel shards and ZeRO's 1-D shards of flat
fp32 masters.

Sharding contract. A parameter may carry the attribute SHARDED_OVER ("_llmkern_sharded_over"): a
tuple of process groups across which its gradient's elements are partitioned (each rank of each
group holds different elements: a TP shard, a ZeRO shard). Its sum of squares is all-reduced (SUM)
over exactly those groups, one after the other, so a parameter sharded over (tp, dp) sums over the
tp x dp grid (the groups of one tuple must meet in this rank only, as a mesh's axes do). Pipeline
stages fit too: a stage's parameters are held by no other stage, so they are sharded over the pp
group. A parameter without the attribute is replicated and counts once, locally. Every rank
must list its gradients in the same order with the same group sets (true for DDP, ZeRO and TP, whose
ranks hold the same module structure): the collectives are issued in order of first appearance.

    items = [(p.grad, sharded_over(p)) for p in params]
    sumsq = global_sumsq(items)                                   # fp64 [1], every element once
    scalars = step_scalars(items, grad_scale=scale, max_norm=1.0)  # found_inf, grad_coef
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from llmkern.ops._backends import Backend
from llmkern.ops.multi_tensor_sumsq import multi_tensor_sumsq

SHARDED_OVER = "_llmkern_sharded_over"
GroupSet = tuple[dist.ProcessGroup, ...]
"""Process groups a gradient's elements are partitioned across; () for a replicated gradient (never
None: torch.distributed reads None as the default group)."""
GradItem = tuple[torch.Tensor | None, GroupSet]
"""A gradient (None: no local elements this step) and the groups it is sharded over."""

# torch.nn.utils.clip_grad_norm_'s epsilon: the clip coefficient is max_norm / (norm + 1e-6).
_CLIP_EPS = 1e-6


def sharded_over(p: torch.Tensor, default: GroupSet = ()) -> GroupSet:
    """The process groups p's gradient is partitioned across: p's SHARDED_OVER attribute, or
    `default` for a parameter without it (() for a replicated parameter)."""
    groups = getattr(p, SHARDED_OVER, None)
    if groups is None:
        return default
    if not isinstance(groups, tuple) or not all(isinstance(g, dist.ProcessGroup) for g in groups):
        raise TypeError(f"a parameter's {SHARDED_OVER} must be a tuple of torch.distributed ProcessGroups, got "
                        f"{groups!r}")
    return groups


def _checked(items: Iterable[GradItem]) -> list[GradItem]:
    """items as a list, each checked to be a (tensor or None, tuple of ProcessGroups) pair."""
    items = list(items)
    for j, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"item {j}: expected a (gradient or None, tuple of process groups) pair, got {item!r}")
        t, groups = item
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"item {j}: the gradient must be a tensor or None, got {type(t).__name__}")
        if not isinstance(groups, tuple) or not all(isinstance(g, dist.ProcessGroup) for g in groups):
            raise TypeError(f"item {j}: the groups must be a tuple of torch.distributed ProcessGroups (() for a "
                            f"replicated tensor), got {groups!r}")
    return items


def _group_sets(items: list[GradItem]) -> dict[tuple[int, ...], tuple[GroupSet, list[torch.Tensor]]]:
    """The gradients bucketed by group set, keyed by the groups' identities, in order of first appearance."""
    sets: dict[tuple[int, ...], tuple[GroupSet, list[torch.Tensor]]] = {}
    for t, groups in items:
        entry = sets.setdefault(tuple(id(g) for g in groups), (groups, []))
        if t is not None:
            entry[1].append(t)
    return sets


def _device_of(items: Sequence[GradItem], device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t, _ in items:
        if t is not None:
            return t.device
    raise ValueError("no gradient to take the device from (every item is None): pass device=")


def _local_sumsq(tensors: list[torch.Tensor], device: torch.device, backend: Backend | None) -> torch.Tensor:
    """The float64 [1] sum of squares of `tensors` on this rank. multi_tensor_sumsq's own result
    dtype (float32 today) is widened here, so ranks agree on the collective's dtype even when one
    of them holds no tensor of a group set, and a sum of finite fp32 partials cannot overflow."""
    if not tensors:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return _f64(multi_tensor_sumsq(tensors, backend=backend), device)


def _f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t as a float64 [1] tensor on device (no op when it is one: each op is a dispatch per step)."""
    if t.dtype != torch.float64 or t.device != device:
        t = t.to(device=device, dtype=torch.float64)
    return t if t.shape == (1,) else t.reshape(1)


def union_of_groups(items: Iterable[GradItem], extra: Iterable[dist.ProcessGroup | None] = ()) -> GroupSet:
    """Every distinct process group of `items` and `extra` (None entries dropped), in order of first
    appearance: the groups the overflow flag is reduced over."""
    seen: dict[int, dist.ProcessGroup] = {}
    for _, groups in items:
        for g in groups:
            seen.setdefault(id(g), g)
    for g in extra:
        if g is not None:
            seen.setdefault(id(g), g)
    return tuple(seen.values())


def global_sumsq(items: Iterable[GradItem], *, device: torch.device | str | None = None,
                 backend: Backend | None = None) -> torch.Tensor:
    """The sum of squares of every gradient element across all ranks, each element counted once:
    a float64 [1] tensor on `device` (default: the first gradient's), inf/nan when any element is.

    items: (gradient or None, groups) pairs. A None gradient holds no elements here, but its groups
        still take part in the collectives, so a rank whose parameter got no gradient this step
        issues the same collectives as its peers.
    One multi_tensor_sumsq and one all-reduce (SUM) per group of each distinct group set.
    """
    items = _checked(items)
    device = _device_of(items, device)
    total = None
    for groups, tensors in _group_sets(items).values():
        part = _local_sumsq(tensors, device, backend)
        for g in groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=g)
        total = part if total is None else total + part
    return total if total is not None else torch.zeros(1, dtype=torch.float64, device=device)


def inverse_scale(grad_scale: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """1 / grad_scale as a float32 [1] tensor on `device`, computed in fp64 as torch.amp.GradScaler
    does (a float32 reciprocal of 2^k is exact, but not of other scales)."""
    if grad_scale is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise TypeError(f"grad_scale must be a one-element floating-point tensor, got shape "
                            f"{tuple(grad_scale.shape)} {grad_scale.dtype}")
        return grad_scale.detach().to(device=device, dtype=torch.float64).reciprocal().float().reshape(1)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not 0 < grad_scale < math.inf:
        raise ValueError(f"grad_scale must be a finite number > 0 or a one-element tensor, got {grad_scale!r}")
    return torch.full((1,), 1.0 / float(grad_scale), dtype=torch.float32, device=device)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepScalars:
    """The device scalars one fused update reads (llmkern.ops.fused_adamw_ / fused_sgd_)."""

    found_inf: torch.Tensor
    """float32 [1]: 1 when a gradient on any rank of the reduced groups is inf/nan (the update then
    changes nothing, not even the step count), else 0."""
    grad_coef: torch.Tensor
    """float32 [1]: every gradient is multiplied by it inside the update: clip_coef / grad_scale."""
    sumsq: torch.Tensor | None
    """float64 [1]: the sum of squares the flag was read from (global when clipping, local when only
    the overflow was checked), or None when nothing was checked."""


def step_scalars(items: Iterable[GradItem], *, grad_scale: torch.Tensor | float | None = None,
                 max_norm: float | None = None, sumsq: torch.Tensor | None = None,
                 overflow_groups: Iterable[dist.ProcessGroup | None] = (),
                 device: torch.device | str | None = None, backend: Backend | None = None) -> StepScalars:
    """found_inf and grad_coef for one step over the gradients `items` ((gradient or None, groups)
    pairs, see global_sumsq).

    grad_scale: the factor every gradient carries (a loss scaler's scale: a one-element tensor, no
        host read) or None. Given, the gradients are checked for inf/nan.
    max_norm: clip the global 2-norm of the unscaled gradients to it (coefficient
        max_norm / (norm + 1e-6), at most 1, as torch.nn.utils.clip_grad_norm_). Needs the global
        sum of squares: `sumsq` when the caller computed it already (clip_grad_norm_ before
        step()), else computed here with global_sumsq.
    overflow_groups: groups the flag is reduced over besides those of `items` (a loss scaler's).
    Checked or not, the flag is then all-reduced (MAX) over every group of `items` and
    `overflow_groups`, so every rank skips together. Without grad_scale, max_norm or sumsq nothing
    is checked and no collective runs: found_inf = 0, grad_coef = 1, as a plain torch.optim step.
    """
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and 0 < max_norm):
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    items = _checked(items)
    device = _device_of(items, device)
    inv = inverse_scale(grad_scale, device) if grad_scale is not None else None
    if sumsq is None:
        if max_norm is not None:
            sumsq = global_sumsq(items, device=device, backend=backend)
        elif grad_scale is not None:  # the overflow check needs no collective sum: the flag is reduced below
            sumsq = _local_sumsq([t for t, _ in items if t is not None], device, backend)
    if sumsq is None:
        return StepScalars(found_inf=torch.zeros(1, dtype=torch.float32, device=device),
                           grad_coef=inv if inv is not None else torch.ones(1, dtype=torch.float32, device=device),
                           sumsq=None)
    sumsq = _f64(sumsq, device)
    found_inf = torch.isfinite(sumsq).logical_not_().float()
    for g in union_of_groups(items, overflow_groups):
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=g)
    if max_norm is None:
        grad_coef = inv if inv is not None else torch.ones(1, dtype=torch.float32, device=device)
    else:
        norm = sumsq.sqrt() if inv is None else sumsq.sqrt() * inv
        # A nan norm skips the step through found_inf; the coefficient then only has to be a number.
        coef = norm.add_(_CLIP_EPS).reciprocal_().mul_(max_norm).clamp_(max=1.0).nan_to_num_(nan=1.0)
        grad_coef = (coef if inv is None else coef * inv).float()
    return StepScalars(found_inf=found_inf, grad_coef=grad_coef, sumsq=sumsq)


def grad_norm(sumsq: torch.Tensor, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """The 2-norm of the unscaled gradients, a float32 0-d tensor: sqrt(sumsq) / grad_scale."""
    norm = _f64(sumsq, sumsq.device).sqrt()
    if grad_scale is not None:
        norm = norm * inverse_scale(grad_scale, sumsq.device)
    return norm.float().reshape(())
