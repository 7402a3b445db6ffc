"""The fused update of lists of tensors that share one step count: one llmkern.ops.fused_adamw_ or
fused_sgd_ launch, reading the device scalars of llmkern.optim.step_scalars. Nothing here knows
about parameters or torch.optim: the tensors may be whole parameters (the optimizer classes), their
fp32 masters, or 1-D shards of flat fp32 masters (ZeRO).

    scalars = step_scalars(items, grad_scale=scale, max_norm=1.0)
    advance_step_(step, scalars)          # once per step tensor, before its launches
    update = AdamWUpdate(amsgrad=False)
    update(group, masters, grads, [exp_avgs, exp_avg_sqs], copies16, step, scalars,
           rounding_seed=launch_seed(seed, group_index, True))

`group` is a mapping holding the hyperparameters under torch.optim's names (a param group:
lr, betas, eps, weight_decay for AdamW; lr, momentum, dampening, weight_decay, nesterov for SGD),
checked once by `check_group` (the op layer's check) when the group is made; an update call does not
check them again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch

from llmkern.ops import fused_adamw as _adamw_op
from llmkern.ops import fused_sgd as _sgd_op
from llmkern.ops._backends import Backend
from llmkern.ops.fused_adamw import StateRounding
from llmkern.optim.step_scalars import StepScalars

Tensors = Sequence[torch.Tensor]
_M64 = (1 << 64) - 1


def advance_step_(step: torch.Tensor, scalars: StepScalars) -> None:
    """Count this update in `step` (a float32 one-element device tensor) unless it overflowed: the
    kernels read the 1-based number of the update they apply, and a skipped step is not counted."""
    if scalars.sumsq is None:   # nothing was checked: found_inf is 0
        step.add_(1.0)
    else:
        step.sub_(scalars.found_inf.reshape(step.shape)).add_(1.0)


def launch_seed(seed: int, group_index: int, has_master: bool, first_index: int = 0) -> int:
    """The stochastic-rounding seed of one launch: the optimizer's seed made distinct per param group,
    per master/plain split and per cohort (`first_index`, the index in the group of the launch's
    first parameter), so that element 0 of two launches of one step draws different bits. A signed
    int64, as the op's schema takes. The cohort term vanishes for first_index 0, so a group whose
    parameters all step (one cohort, led by parameter 0) draws the bits it drew before cohorts
    existed, and a run resumed from such a checkpoint continues the same stream."""
    s = (seed * 0x9E3779B97F4A7C15 + 2 * group_index + int(has_master) + first_index * 0xBF58476D1CE4E5B9) & _M64
    return s - (1 << 64) if s >= (1 << 63) else s


def _lr(group: Mapping[str, Any]) -> float:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        raise TypeError("lr must be a Python float (the fused kernels take the lr as a scalar argument, not a tensor)")
    return lr


class FusedUpdate(Protocol):
    """What the optimizer classes (and ZeRO) call: the state a rule keeps per tensor, a check of a
    param group's hyperparameters, and the update itself."""

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The per-tensor state, in the order `states` lists it (torch.optim's state names)."""
        ...

    def check_group(self, group: dict) -> None:
        """Validate the group's hyperparameters (raising with the name and the range) and normalize
        them in place to the types the op takes."""
        ...

    def __call__(self, group: Mapping[str, Any], params: Tensors, grads: Tensors, states: Sequence[Tensors],
                 copies: Tensors, step: torch.Tensor, scalars: StepScalars, *, rounding_seed: int = 0,
                 element_offset: int = 0) -> None:
        """Update params (and states) in place from grads * scalars.grad_coef unless
        scalars.found_inf; write the updated params into `copies` (16-bit model weights) when given.
        `step` already counts this update (advance_step_)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AdamWUpdate:
    """AdamW (decoupled_weight_decay=True) or Adam with L2 decay, optionally AMSGrad."""

    decoupled_weight_decay: bool = True
    """True: p *= 1 - lr * weight_decay (torch.optim.AdamW). False: g += weight_decay * p (torch.optim.Adam)."""
    amsgrad: bool = False
    """Keep the running max of exp_avg_sq ("max_exp_avg_sq") and divide by it."""
    state_rounding: StateRounding = "nearest"
    """How bf16 moments are stored after the fp32 update: "nearest" or "stochastic" (see FusedAdamW)."""
    backend: Backend | None = None
    """The llmkern.ops backend of every launch; None chooses per call."""

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def check_group(self, group: dict) -> None:
        betas = group["betas"]
        if isinstance(betas, torch.Tensor) or not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.999); "
                            f"got {betas!r}")
        if bool(group.get("amsgrad", False)) != self.amsgrad:
            raise ValueError(f"amsgrad must be the same in every param group (the optimizer was built with "
                             f"amsgrad={self.amsgrad}, a group has {group.get('amsgrad')!r})")
        _adamw_op.check_hyperparameters(_lr(group), betas[0], betas[1], group["eps"], group["weight_decay"])
        group["betas"] = (float(betas[0]), float(betas[1]))

    def __call__(self, group: Mapping[str, Any], params: Tensors, grads: Tensors, states: Sequence[Tensors],
                 copies: Tensors, step: torch.Tensor, scalars: StepScalars, *, rounding_seed: int = 0,
                 element_offset: int = 0) -> None:
        beta1, beta2 = group["betas"]
        # element_offset is forwarded only when set, so this runs on ops without the argument too.
        extra = {"element_offset": element_offset} if element_offset else {}
        _adamw_op.fused_adamw_(params, grads, states[0], states[1], states[2] if self.amsgrad else [], copies, step,
                               scalars.found_inf, scalars.grad_coef, lr=group["lr"], beta1=beta1, beta2=beta2,
                               eps=group["eps"], weight_decay=group["weight_decay"],
                               decoupled_weight_decay=self.decoupled_weight_decay,
                               state_rounding=self.state_rounding, rounding_seed=rounding_seed,
                               backend=self.backend, **extra)


@dataclass(frozen=True, slots=True, kw_only=True)
class SGDUpdate:
    """SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD)."""

    momentum: bool = False
    """Keep a momentum buffer ("momentum_buffer"): every group's momentum is then > 0."""
    backend: Backend | None = None
    """The llmkern.ops backend of every launch; None chooses per call."""

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def check_group(self, group: dict) -> None:
        _sgd_op.check_hyperparameters(_lr(group), group["momentum"], group["dampening"], group["weight_decay"],
                                      group["nesterov"])
        if (group["momentum"] > 0) != self.momentum:
            raise ValueError(f"momentum must be > 0 in every param group or in none (the optimizer keeps "
                             f"{'a' if self.momentum else 'no'} momentum buffer; a group has momentum="
                             f"{group['momentum']!r})")

    def __call__(self, group: Mapping[str, Any], params: Tensors, grads: Tensors, states: Sequence[Tensors],
                 copies: Tensors, step: torch.Tensor, scalars: StepScalars, *, rounding_seed: int = 0,
                 element_offset: int = 0) -> None:
        # fused_sgd_ rounds nothing stochastically: rounding_seed and element_offset have nothing to key.
        _sgd_op.fused_sgd_(params, grads, states[0] if self.momentum else [], copies, step, scalars.found_inf,
                           scalars.grad_coef, lr=group["lr"], momentum=group["momentum"],
                           dampening=group["dampening"], weight_decay=group["weight_decay"],
                           nesterov=group["nesterov"], backend=self.backend)
