"""FusedSGD: torch.optim.SGD semantics (momentum, dampening, Nesterov, L2 weight decay) on
llmkern.ops.fused_sgd_, with fp32 masters, the loss scaler and the clip fused in."""
from __future__ import annotations

from llmkern.ops.fused_sgd import check_hyperparameters, fused_sgd_
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer, check_lr


class FusedSGD(MixedPrecisionOptimizer):
    """See MixedPrecisionOptimizer for master_weights, state_dtype, backend and process_group. A bf16
    momentum buffer is rounded to nearest: state_rounding="stochastic" is refused (fused_sgd_ has no
    stochastic rounding)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **kwargs):
        if kwargs.get("state_rounding", "nearest") != "nearest":
            raise ValueError(f"FusedSGD: state_rounding={kwargs['state_rounding']!r} is not implemented (the "
                             f"momentum buffer is rounded to nearest); use FusedAdamW for stochastic rounding")
        check_hyperparameters(check_lr(lr), momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=None, differentiable=False, fused=None)
        super().__init__(params, defaults, **kwargs)
        self._state_keys = ("momentum_buffer",) if momentum > 0 else ()

    def _launch(self, group, params, grads, states, copies, step, found_inf, grad_coef, *,
                rounding_seed: int) -> None:
        if (group["momentum"] > 0) != bool(self._state_keys):
            raise ValueError("FusedSGD: momentum must be > 0 in every group or in none")
        fused_sgd_(params, grads, states[0] if states else [], copies, step, found_inf, grad_coef,
                   lr=check_lr(group["lr"]), momentum=group["momentum"], dampening=group["dampening"],
                   weight_decay=group["weight_decay"], nesterov=group["nesterov"], backend=self.backend)
