"""The base of llmkern's fused optimizers: fp32 master weights for fp16/bf16 parameters, the loss
scaler and the gradient clip folded into one fused kernel call per parameter group.

One step, for parameters on one device:
  1. only when a loss scaler or clip_grad_norm_ asks for it: the sum of squares of all gradients
     (one read of the gradients, fp32 accumulation). A non-finite sum is the overflow flag, which
     the loss scaler all-reduces (MAX) over its process group;
  2. per group, one fused_adamw_/fused_sgd_ call: unscale and clip (grad_coef =
     clip_coef / loss_scale), update the fp32 master and the moments, write the fp16/bf16 model
     weight. With an overflow the kernel changes nothing, not even the step count.
Nothing reads device values on the host, so a GPU step never synchronises.

state_dict keeps torch.optim.AdamW's layout (per-parameter "step", "exp_avg", "exp_avg_sq";
SGD's "momentum_buffer") plus "master_param" for parameters with an fp32 master, so checkpoints
load in both directions.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from llmkern.ops._backends import Backend
from llmkern.ops.fused_adamw import StateRounding
from llmkern.ops.multi_tensor_sumsq import multi_tensor_sumsq

_HALF = (torch.float16, torch.bfloat16)
_M64 = (1 << 64) - 1


def launch_seed(seed: int, group_index: int, has_master: bool) -> int:
    """The rounding seed of one kernel call: the optimizer's seed, made distinct per param group and
    per master/plain split, so that element 0 of two calls of one step draws different bits. Signed
    int64 (the op schema's int)."""
    s = (seed * 0x9E3779B97F4A7C15 + 2 * group_index + int(has_master)) & _M64
    return s - (1 << 64) if s >= (1 << 63) else s


class MixedPrecisionOptimizer(torch.optim.Optimizer):
    """Subclasses set `_state_keys` (the moment buffers) and implement `_launch`.

    master_weights: fp16/bf16 parameters get an fp32 master in state["master_param"].
    state_dtype: torch.float32 or torch.bfloat16 for the moment buffers.
    state_rounding: "nearest" (default) or "stochastic": how bf16 states are rounded after each
        fp32 update (see FusedAdamW); "stochastic" needs state_dtype=torch.bfloat16.
    rounding_seed: int64 seed of stochastic rounding. Each kernel call draws from
        launch_seed(rounding_seed, group index, master/plain split), the step and the element's index.
    backend: "cpu", "cuda", "triton", "emu" or "ref" for every kernel of the step (the fused update
        and the gradient sum of squares); None chooses per call.
    process_group: the group the gradients are sharded over; clip_grad_norm_ sums over it.
    """

    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, master_weights: bool = True,
                 state_dtype: torch.dtype = torch.float32, state_rounding: StateRounding = "nearest",
                 rounding_seed: int = 0, backend: Backend | None = None, process_group=None):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if state_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', got {state_rounding!r}")
        if state_rounding == "stochastic" and state_dtype != torch.bfloat16:
            raise ValueError(f"state_rounding='stochastic' rounds bfloat16 states; with state_dtype={state_dtype} "
                             f"nothing is rounded (pass state_dtype=torch.bfloat16)")
        if not isinstance(rounding_seed, int):
            raise TypeError(f"rounding_seed must be an int, got {type(rounding_seed).__name__}")
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.state_rounding = state_rounding
        self.rounding_seed = rounding_seed
        self.backend = backend
        self.process_group = process_group   # gradients sharded over it: the clip norm is summed
        self._pending_clip: tuple[torch.Tensor, torch.Tensor] | None = None  # (sumsq, max_norm)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__}: all parameters must be on one device, got "
                             f"{sorted(str(d) for d in devices)}")
        for g in self.param_groups:
            for p in g["params"]:
                if p.dtype not in (torch.float32, *_HALF):
                    raise TypeError(f"{type(self).__name__}: parameters must be float32, float16 or "
                                    f"bfloat16, got {p.dtype}")

    # ---- state --------------------------------------------------------------------------------
    def _has_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in _HALF

    def _group_step(self, group) -> torch.Tensor:
        """One float32 [1] step tensor per group, shared by every parameter's state["step"]."""
        if "_step" not in group:
            p0 = group["params"][0]
            old = self.state[p0].get("step") if p0 in self.state else None
            group["_step"] = (old.detach().to(device=p0.device, dtype=torch.float32).reshape(1).clone()
                              if old is not None else torch.zeros(1, dtype=torch.float32, device=p0.device))
        return group["_step"]

    def _init_state(self, group, p: torch.Tensor) -> dict:
        st = self.state[p]
        if "step" not in st or st["step"] is not self._group_step(group):
            st["step"] = self._group_step(group)
        for k in self._state_keys:
            if k not in st:
                st[k] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        if self._has_master(p) and "master_param" not in st:
            st["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format).clone()
        return st

    def master_param(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 tensor the optimizer updates for p (its master, or p itself)."""
        return self.state[p]["master_param"] if self._has_master(p) and "master_param" in self.state[p] else p

    def state_dict(self):
        """torch.optim.AdamW's layout: each parameter gets its own CPU float32 "step" tensor (ours
        are one shared device tensor per group; torch's for-loop AdamW would count a shared one
        once per parameter)."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("_step", None)
        sd["state"] = {pid: {k: (v.detach().to("cpu", copy=True) if k == "step" else v) for k, v in st.items()}
                       for pid, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        # torch's loader casts every floating state tensor to its parameter's dtype, which would
        # round an fp32 master (or fp32 moments of an fp16 parameter) to fp16. Restore the saved
        # dtypes afterwards from the untouched input.
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in saved.get(pid, {}).items():
                if torch.is_tensor(v) and k != "step":
                    dtype = v.dtype if k == "master_param" else self.state_dtype
                    self.state[p][k] = v.detach().to(device=p.device, dtype=dtype).clone()
        for g in self.param_groups:
            g.pop("_step", None)
            for p in g["params"]:
                if "step" in self.state.get(p, {}):
                    self._init_state(g, p)

    # ---- clipping ----------------------------------------------------------------------------
    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _sumsq(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """fp32 sum of squares of all gradients (inf/nan if any element is): one read of the
        gradients, accumulated in fp32 (the norm of fp16 gradients routinely exceeds 65504)."""
        return multi_tensor_sumsq(grads, backend=self.backend)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, *, loss_scaler=None) -> torch.Tensor:
        """Total 2-norm of the (unscaled) gradients, a float32 tensor; the clip by
        max_norm / (norm + 1e-6), when below 1, is applied inside the next step()'s kernel, so the
        gradients themselves are not rewritten. Call it after backward and before step()."""
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        sumsq = self._sumsq(self._grads())
        if self.process_group is not None:
            dist.all_reduce(sumsq, group=self.process_group)
        norm = sumsq.sqrt()
        if loss_scaler is not None:
            norm = norm * loss_scaler.inv_scale().to(norm.device)
        self._pending_clip = (sumsq, torch.full_like(norm, float(max_norm)))
        return norm.float().reshape(())  # sumsq is float64: the norm of finite fp32 gradients is finite

    # ---- step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, loss_scaler=None, lr_scheduler=None) -> torch.Tensor:
        """One fused step. Returns whether it was skipped as a bool tensor (reading it with bool()
        synchronises a GPU). Without a loss scaler or a pending clip, gradients are not checked
        for inf/nan, as in torch.optim, and the step costs no extra pass over them.

        lr_scheduler: stepped only when this step was not skipped, so overflow steps do not advance
        the schedule (this reads the 4-byte flag on the host: one sync per step on a GPU)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._grads()
        dev = grads[0].device if grads else self.param_groups[0]["params"][0].device
        one = torch.ones(1, dtype=torch.float32, device=dev)
        grad_coef = one
        found_inf = torch.zeros(1, dtype=torch.float32, device=dev)
        sumsq = None
        if self._pending_clip is not None:
            sumsq, max_norm = self._pending_clip
        elif loss_scaler is not None and grads:
            sumsq = self._sumsq(grads)
        if loss_scaler is not None:
            loss_scaler._to(dev)
            inv = loss_scaler.inv_scale()
            grad_coef = inv
        if sumsq is not None:
            found_inf = (~torch.isfinite(sumsq)).float()
            if loss_scaler is not None:
                loss_scaler.reduce_found_inf(found_inf)
            if self._pending_clip is not None:
                norm = sumsq.sqrt() * grad_coef
                clip = (max_norm / (norm + 1e-6)).clamp(max=1.0)
                grad_coef = (grad_coef * torch.where(torch.isfinite(clip), clip, one)).float()  # sumsq is float64
        self._pending_clip = None
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, found_inf, grad_coef)
        if loss_scaler is not None:
            loss_scaler.record_found_inf(found_inf)
        skipped = found_inf.bool().reshape(())
        if lr_scheduler is not None and not bool(skipped):
            lr_scheduler.step()
        self._last_loss = loss
        return skipped

    def _step_group(self, group_index: int, group, found_inf: torch.Tensor, grad_coef: torch.Tensor) -> None:
        with_master: list[tuple[torch.Tensor, dict]] = []
        plain: list[tuple[torch.Tensor, dict]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            st = self._init_state(group, p)
            (with_master if self._has_master(p) else plain).append((p, st))
        if not with_master and not plain:
            return
        step = self._group_step(group)
        step.add_(1.0 - found_inf)   # counted only for clean steps, on the device
        for items, has_master in ((with_master, True), (plain, False)):
            if not items:
                continue
            params = [st["master_param"] if has_master else p for p, st in items]
            copies = [p for p, _ in items] if has_master else []
            grads = [p.grad for p, _ in items]
            states = [[st[k] for _, st in items] for k in self._state_keys]
            self._launch(group, params, grads, states, copies, step, found_inf, grad_coef,
                         rounding_seed=launch_seed(self.rounding_seed, group_index, has_master))

    def _launch(self, group, params, grads, states, copies, step, found_inf, grad_coef, *,
                rounding_seed: int) -> None:
        raise NotImplementedError


def check_betas(betas) -> tuple[float, float]:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def check_lr(lr) -> float:
    if isinstance(lr, torch.Tensor):
        raise TypeError("lr must be a Python float (a tensor lr is not supported by the fused kernels)")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return float(lr)
