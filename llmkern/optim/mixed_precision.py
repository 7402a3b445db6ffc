"""The torch.optim.Optimizer façade of llmkern's fused optimizers: param groups, per-parameter state
with torch.optim's names and state_dict layout, fp32 master weights for fp16/bf16 parameters, and
one step built from the two layers below it:

  llmkern.optim.step_scalars  found_inf and grad_coef (= clip_coef / grad_scale) on the device,
                              reduced over the process groups each gradient is sharded over;
  llmkern.optim.fused_update  one fused_adamw_/fused_sgd_ launch per (param group, cohort,
                              master/plain split).

A step, for parameters on one device: only when a loss scale or a clip asks for it, one read of the
gradients for their sum of squares (inf/nan is the overflow flag); then the launches, which unscale
and clip, update the fp32 masters and the moments and write the 16-bit weights; an overflow changes
nothing, not even a step count. Nothing reads a device value on the host, so a GPU step never
synchronises.

Step counts are per parameter, as in torch.optim: state[p]["step"] counts p's own clean updates, so a
parameter whose first gradient arrives late (an unfrozen layer, an added adapter) is bias-corrected
from 1. Parameters whose counts are equal by construction share one step tensor, a *cohort*: those
that got their first gradient in the same step() and have had a gradient in the same steps since.
The host knows who had a gradient, so a cohort splits (the members that step continue on a copy of
the tensor) when only some of its members have one; load_state_dict groups equal loaded counts.
One launch per cohort instead of one per parameter: a model whose every parameter steps every time
(the usual case) has one cohort per param group.

A loss scaler drives the step through tensors only (llmkern.optim.loss_scaler.ScaledStepOptimizer):
`step(grad_scale=, overflow_groups=)` and `last_step_skipped`.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.distributed as dist

from llmkern.ops.fused_adamw import StateRounding
from llmkern.optim.fused_update import FusedUpdate, advance_step_, launch_seed
from llmkern.optim.step_scalars import (SHARDED_OVER, GradItem, StepScalars, global_sumsq, grad_norm,
                                        sharded_over, step_scalars)

_HALF = (torch.float16, torch.bfloat16)


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """The base of FusedAdamW, FusedAdam, FusedSGD and CPUAdam; a subclass passes its update rule.

    fused_update: the rule (llmkern.optim.fused_update.AdamWUpdate or SGDUpdate); it checks every param
        group's hyperparameters when the group is added.
    master_weights: fp16/bf16 parameters get an fp32 master in state["master_param"]; the update
        writes the 16-bit parameter from it. False updates 16-bit parameters in place.
    state_dtype: torch.float32 or torch.bfloat16 for the moment buffers.
    state_rounding: "nearest" or "stochastic" rounding of bf16 states (see FusedAdamW).
    rounding_seed: int seed of stochastic rounding; each launch draws from
        launch_seed(rounding_seed, group index, master/plain split, cohort), the step and the element.
    backend: the llmkern.ops backend of every kernel of the step (the update and the sum of
        squares); None chooses per call.
    process_group: every parameter without a SHARDED_OVER attribute is taken as sharded over this
        group (its gradient's sum of squares is all-reduced over it); None: such parameters are
        replicated and count once, locally.
    """

    # Attributes beyond torch.optim's (defaults, state, param_groups) that a pickle or deepcopy keeps.
    _PICKLED = ("fused_update", "master_weights", "state_dtype", "state_rounding", "rounding_seed", "backend",
                "process_group", "last_step_skipped")

    def __init__(self, params, defaults: dict, *, fused_update: FusedUpdate, master_weights: bool = True,
                 state_dtype: torch.dtype = torch.float32, state_rounding: StateRounding = "nearest",
                 rounding_seed: int = 0, backend=None, process_group: dist.ProcessGroup | None = None):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if state_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', got {state_rounding!r}")
        if state_rounding == "stochastic" and state_dtype != torch.bfloat16:
            raise ValueError(f"state_rounding='stochastic' rounds bfloat16 states; with state_dtype={state_dtype} "
                             f"nothing is rounded (pass state_dtype=torch.bfloat16)")
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {type(rounding_seed).__name__}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        # set before torch's __init__, which calls add_param_group (and so check_group) for every group
        self.fused_update = fused_update
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.state_rounding = state_rounding
        self.rounding_seed = rounding_seed
        self.backend = backend
        self.process_group = process_group
        # a bool 0-d device tensor after each step(): whether it overflowed and changed nothing
        self.last_step_skipped: torch.Tensor | None = None
        self._pending_clip: tuple[torch.Tensor, float] | None = None   # (global sumsq, max_norm)
        super().__init__(params, defaults)

    # ---- param groups ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's add_param_group, then the checks: one device, float32/float16/bfloat16
        parameters and the update rule's hyperparameter ranges. A refused group is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                self._check_param(p)
            devices = {p.device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError(f"{type(self).__name__}: all parameters must be on one device, got "
                                 f"{sorted(str(d) for d in devices)}")
            self._check_hyperparameters(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_hyperparameters(self, group: dict) -> None:
        if group.get("maximize", False):
            raise ValueError(f"{type(self).__name__}: maximize=True is not supported")
        self.fused_update.check_group(group)

    def _check_param(self, p: torch.Tensor) -> None:
        if p.dtype not in (torch.float32, *_HALF):
            raise TypeError(f"{type(self).__name__}: parameters must be float32, float16 or bfloat16, got {p.dtype}")

    # ---- state -----------------------------------------------------------------------------------
    def _has_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in _HALF

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        for k in self.fused_update.state_keys:
            if k not in st:
                st[k] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        if self._has_master(p) and "master_param" not in st:
            st["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format).clone()
        return st

    def master_param(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 tensor the optimizer updates for p (its master, or p itself)."""
        st = self.state.get(p, {})
        return st["master_param"] if self._has_master(p) and "master_param" in st else p

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _cohorts(self, group: dict) -> list[tuple[int, list[torch.Tensor]]]:
        """The parameters of `group` that have a gradient, as (index of the first member in the group,
        members) per cohort (see the module docstring). Splits a cohort whose members do not all
        have a gradient; gives parameters stepping for the first time one new step tensor."""
        stepping: dict[int, tuple[int, list[torch.Tensor]]] = {}
        idle: set[int] = set()
        new: list[torch.Tensor] = []
        first_new = -1
        for i, p in enumerate(group["params"]):
            st = self.state.get(p)
            step = st.get("step") if st else None
            if p.grad is None:
                if step is not None:
                    idle.add(id(step))
            elif step is None:
                first_new = i if not new else first_new
                new.append(p)
            else:
                stepping.setdefault(id(step), (i, []))[1].append(p)
        cohorts = []
        for key, (first, members) in stepping.items():
            if key in idle:
                step = self.state[members[0]]["step"].clone()
                for p in members:
                    self.state[p]["step"] = step
            cohorts.append((first, members))
        if new:
            step = torch.zeros(1, dtype=torch.float32, device=self._device())
            for p in new:
                self.state[p]["step"] = step
            cohorts.append((first_new, new))
        return cohorts

    def _model_copies(self, params: list[torch.Tensor], has_master: bool) -> list[torch.Tensor]:
        """The tensors the update writes the new 16-bit weights into: the parameters themselves when
        the update runs on their fp32 masters, else none."""
        return params if has_master else []

    def state_dict(self):
        """torch.optim.AdamW's layout: per parameter a CPU float32 0-d "step" and the moments under
        torch's names, plus "master_param" for parameters with an fp32 master."""
        sd = super().state_dict()
        sd["state"] = {pid: {k: (v.detach().to("cpu", torch.float32, copy=True).reshape(()) if k == "step" else v)
                             for k, v in st.items()}
                       for pid, st in sd["state"].items()}
        return sd

    def _implied_step(self, index: int, st: dict) -> float:
        """The step count of a loaded state without a "step" entry."""
        raise ValueError(f"{type(self).__name__}.load_state_dict: the state of parameter {index} has "
                         f"{sorted(st)} but no 'step'")

    def load_state_dict(self, state_dict) -> None:
        # Everything that can be refused is checked before anything loads: the groups'
        # hyperparameters and each state's step count.
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for i, g in enumerate(state_dict["param_groups"]):
            try:
                self._check_hyperparameters(copy.copy(g))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{type(self).__name__}.load_state_dict: param group {i}: {e}") from e
        counts: dict = {}
        for i, pid in enumerate(ids):
            st = {k: v for k, v in saved.get(pid, {}).items() if v is not None}
            if st:
                counts[pid] = float(st["step"]) if "step" in st else self._implied_step(i, st)
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            self._check_hyperparameters(g)   # passes (checked above); normalizes the loaded values
        # torch's loader casts every floating state tensor to its parameter's dtype, which would round
        # an fp32 master (or the fp32 moments of an fp16 parameter) to fp16: the saved dtypes are
        # restored from the untouched input. Equal counts form one cohort per group (one step tensor,
        # one launch).
        params = [p for g in self.param_groups for p in g["params"]]
        step_of = {}
        for pid, p in zip(ids, params):
            st = self.state.get(p)
            for k, v in saved.get(pid, {}).items():
                if v is None:
                    st.pop(k, None)
                elif torch.is_tensor(v) and k != "step":
                    dtype = v.dtype if k == "master_param" else self.state_dtype
                    st[k] = v.detach().to(device=p.device, dtype=dtype).clone()
            if pid in counts:
                step_of[p] = counts[pid]
        for group in self.param_groups:
            cohorts: dict[float, torch.Tensor] = {}
            for p in group["params"]:
                if p in step_of:
                    count = step_of[p]
                    if count not in cohorts:
                        cohorts[count] = torch.full((1,), count, dtype=torch.float32, device=p.device)
                    self.state[p]["step"] = cohorts[count]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._PICKLED}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._pending_clip = None

    def __deepcopy__(self, memo: dict):
        # Process groups cannot be copied: the copy shares them (they name ranks, not data).
        params = [p for g in self.param_groups for p in g["params"]]
        for pg in (self.process_group, *(g for p in params for g in getattr(p, SHARDED_OVER, ()))):
            if pg is not None:
                memo.setdefault(id(pg), pg)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        # torch.nn.Parameter's deepcopy drops Python attributes: the copies keep their sharding.
        for old_group, new_group in zip(self.param_groups, new.param_groups):
            for p, q in zip(old_group["params"], new_group["params"]):
                if hasattr(p, SHARDED_OVER) and not hasattr(q, SHARDED_OVER):
                    setattr(q, SHARDED_OVER, getattr(p, SHARDED_OVER))
        return new

    # ---- gradients, clipping -----------------------------------------------------------------------
    def _grad_items(self) -> list[GradItem]:
        """(gradient or None, sharded-over groups) for every parameter, in group order; checks that
        each gradient is dense and shaped and placed like its parameter before anything is changed."""
        default = (self.process_group,) if self.process_group is not None else ()
        items = []
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                           f"(param group {gi}, parameter {j})")
                    if g.shape != p.shape or g.device != p.device:
                        raise ValueError(f"{type(self).__name__}: the gradient of parameter {j} of param group "
                                         f"{gi} has shape {tuple(g.shape)} on {g.device}, expected its "
                                         f"parameter's {tuple(p.shape)} on {p.device}")
                items.append((g, sharded_over(p, default)))
        return items

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, *, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """The global 2-norm of the gradients divided by grad_scale (the factor they carry: a loss
        scaler's scale; DynamicLossScaler.clip_grad_norm_ passes it), a float32 0-d tensor; every
        element counts once across ranks (SHARDED_OVER, process_group). The clip by
        max_norm / (norm + 1e-6), when below 1, is applied inside the next step()'s update, so the
        gradients themselves are not rewritten. Call it after backward and before step()."""
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        sumsq = global_sumsq(self._grad_items(), device=self._device(), backend=self.backend)
        norm = grad_norm(sumsq, grad_scale)
        self._pending_clip = (sumsq, float(max_norm))
        return norm

    # ---- step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | float | None = None,
             overflow_groups: Iterable[dist.ProcessGroup | None] = ()):
        """One fused step; returns the closure's loss (None without a closure), as torch.optim does.
        Whether the step overflowed and was skipped is `last_step_skipped` (a device tensor).

        grad_scale: the factor the gradients carry (a loss scale; a one-element tensor is read on the
            device). Given, the gradients are checked for inf/nan and unscaled inside the update.
        overflow_groups: more groups to reduce the overflow flag over (MAX), besides every group a
            gradient is sharded over: a loss scaler's group.
        Without grad_scale or a pending clip_grad_norm_, gradients are not checked, as in
        torch.optim, and the step costs no pass over them besides the update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = self._pending_clip
        scalars = step_scalars(self._grad_items(), grad_scale=grad_scale,
                               max_norm=pending[1] if pending else None, sumsq=pending[0] if pending else None,
                               overflow_groups=overflow_groups, device=self._device(), backend=self.backend)
        self._pending_clip = None
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, scalars)
        self.last_step_skipped = scalars.found_inf.bool().reshape(())
        return loss

    def _step_group(self, group_index: int, group: dict, scalars: StepScalars) -> None:
        keys = self.fused_update.state_keys
        for first, members in self._cohorts(group):
            step = self.state[members[0]]["step"]
            advance_step_(step, scalars)
            for has_master in (True, False):
                part = [p for p in members if self._has_master(p) == has_master]
                if not part:
                    continue
                states = [self._init_state(p) for p in part]
                params = [st["master_param"] for st in states] if has_master else part
                self.fused_update(group, params, [p.grad for p in part], [[st[k] for st in states] for k in keys],
                                  self._model_copies(part, has_master), step, scalars,
                                  rounding_seed=launch_seed(self.rounding_seed, group_index, has_master, first))
