"""FusedAdamW and FusedAdam: torch.optim.AdamW / Adam semantics on llmkern.ops.fused_adamw_, with
fp32 master weights for fp16/bf16 parameters, the loss scaler and the gradient clip fused in."""
from __future__ import annotations

import torch

from llmkern.ops.fused_adamw import StateRounding
from llmkern.optim.fused_update import AdamWUpdate
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer


class FusedAdamW(MixedPrecisionOptimizer):
    """AdamW (decoupled weight decay, bias correction with each parameter's own step count).

    master_weights: fp16/bf16 parameters get an fp32 master in state["master_param"]; the kernel
        updates it and rewrites the parameter from it. False updates 16-bit parameters in place
        (fp32 math, rounded to nearest each step).
    amsgrad: keep the running max of exp_avg_sq (state "max_exp_avg_sq") and divide by it; the same
        in every param group.
    state_dtype: torch.float32, or torch.bfloat16 for moments stored in bf16 (fp32 math, then
        rounded as state_rounding says; 8 B/param less traffic and memory).
    state_rounding: how bf16 moments are rounded after each update (only with bf16 states):
        "nearest" (the default): with beta2=0.999, v's per-step change (0.1 %) is below bf16's
            half-ulp (0.2-0.4 %), so v stalls unless g² differs from v by more than ~0.4 %, and
            the moments carry a bias; fine for fine-tuning-length runs, checked against fp32 states
            in tests/optim/test_optimizers.py.
        "stochastic": rounded up with probability equal to the fraction bf16 drops, so each stored
            moment is an unbiased estimate of the fp32 one and small updates accumulate in
            expectation (the variance is at most a quarter bf16 ulp squared per step). The random
            bits are a pure function of (rounding_seed, step, parameter group, cohort, element),
            identical on every backend, so runs are reproducible and a resumed run continues the
            stream. Costs one 32-bit hash per element (memory-bound kernels: no measurable time on GPUs).
    rounding_seed: the seed of stochastic rounding (an int64); 0 by default, so two runs with the
        same data are bit-identical. Use different seeds for independent repeats. It is a
        constructor argument, not part of state_dict: pass the same seed when resuming (the step
        counts, which are saved, then continue the stream).
    backend: "cpu", "cuda", "triton", "emu" or "ref" (see llmkern.ops._backends); None chooses.
    process_group: the group every parameter without a SHARDED_OVER attribute is sharded over
        (see MixedPrecisionOptimizer); None: such parameters are replicated.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, master_weights: bool = True,
                 state_dtype: torch.dtype = torch.float32, state_rounding: StateRounding = "nearest",
                 rounding_seed: int = 0, backend=None, process_group=None):
        self._init_adam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True, amsgrad=amsgrad,
                        master_weights=master_weights, state_dtype=state_dtype, state_rounding=state_rounding,
                        rounding_seed=rounding_seed, backend=backend, process_group=process_group)

    def _init_adam(self, params, lr, betas, eps, weight_decay, *, decoupled_weight_decay: bool, amsgrad: bool,
                   **kwargs) -> None:
        # torch.optim.AdamW's group keys, so that state_dicts load in both directions
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad),
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        update = AdamWUpdate(decoupled_weight_decay=decoupled_weight_decay, amsgrad=bool(amsgrad),
                             state_rounding=kwargs.get("state_rounding", "nearest"), backend=kwargs.get("backend"))
        MixedPrecisionOptimizer.__init__(self, params, defaults, fused_update=update, **kwargs)


class FusedAdam(FusedAdamW):
    """Adam with L2 weight decay (added to the gradient), as torch.optim.Adam; default wd 0.
    decoupled_weight_decay=True makes it AdamW, as torch.optim.Adam's argument of that name."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled_weight_decay: bool = False, amsgrad: bool = False,
                 master_weights: bool = True, state_dtype: torch.dtype = torch.float32,
                 state_rounding: StateRounding = "nearest", rounding_seed: int = 0, backend=None,
                 process_group=None):
        self._init_adam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                        amsgrad=amsgrad, master_weights=master_weights, state_dtype=state_dtype,
                        state_rounding=state_rounding, rounding_seed=rounding_seed, backend=backend,
                        process_group=process_group)
