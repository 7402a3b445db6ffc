"""FusedSGD: torch.optim.SGD semantics (momentum, dampening, Nesterov, L2 weight decay) on
llmkern.ops.fused_sgd_, with fp32 masters, the loss scaler and the clip fused in."""
from __future__ import annotations

import torch

from llmkern.optim.fused_update import SGDUpdate
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer


class FusedSGD(MixedPrecisionOptimizer):
    """See MixedPrecisionOptimizer for master_weights, state_dtype, backend and process_group. A bf16
    momentum buffer is rounded to nearest: state_rounding="stochastic" is refused (fused_sgd_ has no
    stochastic rounding). Each parameter's momentum buffer starts at its own first gradient, as
    torch.optim.SGD's does (state["step"] counts the parameter's updates)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, master_weights: bool = True,
                 state_dtype: torch.dtype = torch.float32, state_rounding: str = "nearest", backend=None,
                 process_group=None):
        if state_rounding != "nearest":
            raise ValueError(f"FusedSGD: state_rounding={state_rounding!r} is not implemented (the momentum "
                             f"buffer is rounded to nearest); use FusedAdamW for stochastic rounding")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=None, differentiable=False, fused=None)
        update = SGDUpdate(momentum=isinstance(momentum, (int, float)) and momentum > 0, backend=backend)
        super().__init__(params, defaults, fused_update=update, master_weights=master_weights,
                         state_dtype=state_dtype, backend=backend, process_group=process_group)

    def _implied_step(self, index: int, st: dict) -> float:
        # torch.optim.SGD saves no step: a momentum buffer means the parameter has stepped, and
        # fused_sgd_ only tells step 1 (the buffer starts at the gradient) from the others.
        if "momentum_buffer" in st:
            return 1.0
        return super()._implied_step(index, st)
