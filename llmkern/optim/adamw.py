"""FusedAdamW and FusedAdam: torch.optim.AdamW / Adam semantics on llmkern.ops.fused_adamw_, with
fp32 master weights for fp16/bf16 parameters, the loss scaler and the gradient clip fused in."""
from __future__ import annotations

import torch

from llmkern.ops.fused_adamw import StateRounding, fused_adamw_
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer, check_betas, check_lr


class FusedAdamW(MixedPrecisionOptimizer):
    """AdamW (decoupled weight decay, bias correction).

    master_weights: fp16/bf16 parameters get an fp32 master in state["master_param"]; the kernel
        updates it and rewrites the parameter from it. False updates 16-bit parameters in place
        (fp32 math, rounded to nearest each step).
    amsgrad: keep the running max of exp_avg_sq (state "max_exp_avg_sq") and divide by it.
    state_dtype: torch.float32, or torch.bfloat16 for moments stored in bf16 (fp32 math, then
        rounded as state_rounding says; 8 B/param less traffic and memory).
    state_rounding: how bf16 moments are rounded after each update (only with bf16 states):
        "nearest" (the default, the behaviour of earlier releases): with beta2=0.999, v's per-step
            change (0.1 %) is below bf16's half-ulp (0.2-0.4 %), so v stalls unless g² differs
            from v by more than ~0.4 %, and the moments carry a bias; fine for fine-tuning-length
            runs, checked against fp32 states in tests/optim/test_optimizers.py.
        "stochastic": rounded up with probability equal to the fraction bf16 drops, so each stored
            moment is an unbiased estimate of the fp32 one and small updates accumulate in
            expectation (the variance is at most a quarter bf16 ulp squared per step). The random
            bits are a pure function of (rounding_seed, step, parameter group, element), identical
            on every backend, so runs are reproducible and a resumed run continues the stream.
            Costs one 32-bit hash per element (memory-bound kernels: no measurable time on GPUs).
    rounding_seed: the seed of stochastic rounding (an int64); 0 by default, so two runs with the
        same data are bit-identical. Use different seeds for independent repeats. It is a
        constructor argument, not part of state_dict: pass the same seed when resuming (the step
        count, which is saved, then continues the stream exactly).
    backend: "cpu", "cuda", "triton", "emu" or "ref" (see llmkern.ops._backends); None chooses.
    process_group: the group the gradients are sharded over; clip_grad_norm_ sums over it.
    """

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, master_weights: bool = True,
                 state_dtype: torch.dtype = torch.float32, state_rounding: StateRounding = "nearest",
                 rounding_seed: int = 0, backend=None, process_group=None):
        check_lr(lr)
        check_betas(betas)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults, master_weights=master_weights, state_dtype=state_dtype,
                         state_rounding=state_rounding, rounding_seed=rounding_seed, backend=backend,
                         process_group=process_group)
        # torch.optim.AdamW's state names; AMSGrad is per optimizer here, not per group
        if any(g["amsgrad"] != bool(amsgrad) for g in self.param_groups):
            raise ValueError("FusedAdamW: amsgrad must be the same in every param group")
        self._state_keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def _launch(self, group, params, grads, states, copies, step, found_inf, grad_coef, *,
                rounding_seed: int) -> None:
        beta1, beta2 = check_betas(group["betas"])
        vmax = states[2] if len(states) > 2 else []
        fused_adamw_(params, grads, states[0], states[1], vmax, copies, step, found_inf, grad_coef,
                     lr=check_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], decoupled_weight_decay=self._decoupled,
                     state_rounding=self.state_rounding, rounding_seed=rounding_seed, backend=self.backend)


class FusedAdam(FusedAdamW):
    """Adam with L2 weight decay (added to the gradient), as torch.optim.Adam; default wd 0."""

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
