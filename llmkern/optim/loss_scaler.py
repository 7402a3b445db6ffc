"""Dynamic loss scaling for fp16 training, with every state change on the device (no host sync).

The state machine, exactly (one `update(found_inf)` per optimizer step):

    overflow step (found_inf != 0):
        growth_tracker = 0
        hysteresis_left -= 1
        if hysteresis_left == 0:            # the `hysteresis`-th consecutive overflow
            scale = max(scale * backoff_factor, min_scale);  hysteresis_left = hysteresis
            if scale * backoff_factor < min_scale: min_scale_hits += 1  (and a warning)
        overflow_steps += 1
    clean step:
        hysteresis_left = hysteresis        # only consecutive overflows count
        growth_tracker += 1
        if growth_tracker == growth_interval:
            scale = min(scale * growth_factor, max_scale);  growth_tracker = 0

With hysteresis=1 and a scale that stays inside [min_scale, max_scale] this is exactly
torch.amp.GradScaler's `_amp_update_scale_` (tests/optim/test_loss_scaler.py checks it on a
scripted overflow sequence). Hysteresis refills on every clean step, like DeepSpeed's
`consecutive_hysteresis=True`; DeepSpeed's default never refills, which makes two overflows a
thousand steps apart cut the scale. At `min_scale` the scaler clamps and warns: it never raises,
unlike DeepSpeed's "Current loss scale already at minimum" exit.

Usage (gradient accumulation: scale every micro-batch's loss; one step and one update per step):

    scaler = DynamicLossScaler(init_scale=2.0 ** 16)      # or DynamicLossScaler(LossScalerConfig(...))
    for micro in batches:
        scaler.scale(model(**micro).loss).backward()
    norm = scaler.clip_grad_norm_(optimizer, 1.0)          # optional: the unscaled global norm
    skipped = scaler.step(optimizer)                       # a bool tensor; fused optimizers unscale in-kernel
    scaler.update()

The scaler drives llmkern's optimizers through tensors only (ScaledStepOptimizer): it hands its
scale and its process group to `optimizer.step(grad_scale=, overflow_groups=)` and reads
`optimizer.last_step_skipped` back. Any optimizer with that interface (a ZeRO or pipeline-stage
optimizer) is driven the same way; any other torch.optim optimizer gets GradScaler's path.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from llmkern.optim.step_scalars import inverse_scale, sharded_over, union_of_groups

_FLOAT32_MAX = torch.finfo(torch.float32).max   # the scale is a float32 tensor


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"LossScalerConfig.{name} must be a number, got {type(v).__name__} {v!r}")
    return float(v)


@dataclass(kw_only=True, slots=True)
class LossScalerConfig:
    init_scale: float = 2.0 ** 16
    """Scale of the first step, finite, in [min_scale, max_scale]. 2^16 is GradScaler's and
    DeepSpeed's documented default."""
    growth_factor: float = 2.0
    """The scale is multiplied by this after `growth_interval` consecutive clean steps (finite, > 1)."""
    backoff_factor: float = 0.5
    """The scale is multiplied by this when it is cut (in (0, 1))."""
    growth_interval: int = 2000
    """Consecutive clean steps before the scale grows (an int >= 1)."""
    hysteresis: int = 1
    """The scale is cut on this many consecutive overflow steps (an int >= 1); 1 cuts on every
    overflow (GradScaler), 2 tolerates one isolated overflow (DeepSpeed's and Megatron's default).
    Every overflow step is skipped whatever this is."""
    min_scale: float = 1.0
    """The scale never goes below this (> 0); reaching it warns and counts `min_scale_hits`."""
    max_scale: float = 2.0 ** 24
    """The scale never grows above this; at most float32's largest value, 3.4e38 (the scale is a
    float32 tensor)."""

    def __post_init__(self):
        for f in ("init_scale", "growth_factor", "backoff_factor", "min_scale", "max_scale"):
            setattr(self, f, _number(f, getattr(self, f)))
        for f in ("growth_interval", "hysteresis"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LossScalerConfig.{f} must be an int >= 1, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"LossScalerConfig.{f} must be an int >= 1, got {v}")
        if not 1.0 < self.growth_factor < math.inf:
            raise ValueError(f"LossScalerConfig.growth_factor must be finite and > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"LossScalerConfig.backoff_factor must be in (0, 1), got {self.backoff_factor}")
        for f in ("min_scale", "init_scale", "max_scale"):
            v = getattr(self, f)
            if not 0.0 < v <= _FLOAT32_MAX:
                raise ValueError(f"LossScalerConfig.{f} must be in (0, {_FLOAT32_MAX:.4g}] (finite and "
                                 f"representable in float32), got {v}")
        if not self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(f"LossScalerConfig needs min_scale <= init_scale <= max_scale, got min_scale="
                             f"{self.min_scale}, init_scale={self.init_scale}, max_scale={self.max_scale}")


@runtime_checkable
class ScaledStepOptimizer(Protocol):
    """An optimizer that unscales, checks for overflow and skips inside its own step, driven by a
    loss scaler through tensors (llmkern's fused optimizers; a ZeRO or pipeline-stage optimizer can
    implement it too)."""

    last_step_skipped: torch.Tensor | None
    """After step(): a bool device tensor, whether the step overflowed and changed nothing."""

    def step(self, closure=None, *, grad_scale: torch.Tensor | float | None = None,
             overflow_groups: Iterable[dist.ProcessGroup | None] = ()):
        """Step on gradients that carry the factor grad_scale; reduce the overflow flag (MAX) over
        overflow_groups as well as the gradients' own groups, so every rank skips together."""
        ...

    def clip_grad_norm_(self, max_norm: float, *, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """Clip the next step's update to max_norm; return the global norm of gradients / grad_scale."""
        ...


class DynamicLossScaler:
    """fp16 dynamic loss scaler; see the module docstring for the exact state machine.

    config: a LossScalerConfig, or its fields as keywords (`DynamicLossScaler(init_scale=2.0 ** 12,
        growth_interval=100)`, as GradScaler users write it); not both.
    process_group: when given, the overflow flag is all-reduced (MAX) over it as well as over every
        group the gradients are sharded over, so ranks whose gradients differ skip the same steps.
    device: where the scale lives until the first scale() moves it to the loss's device.
    """

    def __init__(self, config: LossScalerConfig | None = None, *, process_group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, **config_fields):
        if config is not None and config_fields:
            raise TypeError(f"DynamicLossScaler takes a LossScalerConfig or its fields as keywords, not both "
                            f"(got a config and {sorted(config_fields)})")
        if config is not None and not isinstance(config, LossScalerConfig):
            raise TypeError(f"DynamicLossScaler's first argument is a LossScalerConfig, got {type(config).__name__} "
                            f"{config!r} (pass the device as device=)")
        unknown = set(config_fields) - {f.name for f in fields(LossScalerConfig)}
        if unknown:
            raise TypeError(f"DynamicLossScaler got unknown keyword(s) {sorted(unknown)}; it takes process_group, "
                            f"device and LossScalerConfig's fields {[f.name for f in fields(LossScalerConfig)]}")
        self.config = config if config is not None else LossScalerConfig(**config_fields)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        self.process_group = process_group
        self._device = None
        self._found_inf: torch.Tensor | None = None   # set by step(), consumed by update()
        self._last_found_inf: torch.Tensor | None = None
        self._warned_min = 0
        self._updates = 0
        self._to(torch.device(device) if device is not None else torch.device("cpu"))
        self.reset()

    # ---- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        c, d = self.config, self._device
        self._scale = torch.full((1,), c.init_scale, dtype=torch.float32, device=d)
        self._growth_tracker = torch.zeros(1, dtype=torch.int32, device=d)
        self._hysteresis_left = torch.full((1,), c.hysteresis, dtype=torch.int32, device=d)
        self._overflow_steps = torch.zeros(1, dtype=torch.int64, device=d)
        self._min_scale_hits = torch.zeros(1, dtype=torch.int64, device=d)

    def _to(self, device: torch.device) -> None:
        if self._device == device:
            return
        self._device = device
        for name in ("_scale", "_growth_tracker", "_hysteresis_left", "_overflow_steps", "_min_scale_hits"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))

    def get_scale(self) -> float:
        """The current scale as a Python float (synchronises with the device)."""
        return float(self._scale.item())

    @property
    def overflow_steps(self) -> int:
        return int(self._overflow_steps.item())

    @property
    def min_scale_hits(self) -> int:
        return int(self._min_scale_hits.item())

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step() (or, before any, the last update()) overflowed and was skipped
        (synchronises)."""
        flag = self._found_inf if self._found_inf is not None else self._last_found_inf
        return flag is not None and bool(flag.item() != 0)

    # ---- the training-loop API -------------------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * scale. Call it on every micro-batch; the scale only changes in update()."""
        self._to(loss.device)
        return loss * self._scale  # as GradScaler: a float32 [1] scale, so an fp16 loss is scaled in fp32

    def clip_grad_norm_(self, optimizer: ScaledStepOptimizer, max_norm: float) -> torch.Tensor:
        """optimizer.clip_grad_norm_ on the scaled gradients: the clip applies in the next step's
        update, and the returned norm (a float32 0-d tensor) is that of the unscaled gradients."""
        if not isinstance(optimizer, ScaledStepOptimizer):
            raise TypeError(f"DynamicLossScaler.clip_grad_norm_ needs an optimizer that unscales in its step "
                            f"(llmkern.optim.ScaledStepOptimizer, e.g. FusedAdamW), got {type(optimizer).__name__}; "
                            f"for torch.optim optimizers use torch.amp.GradScaler's unscale_ and "
                            f"torch.nn.utils.clip_grad_norm_")
        return optimizer.clip_grad_norm_(max_norm, grad_scale=self._scale)

    def step(self, optimizer, lr_scheduler=None) -> torch.Tensor:
        """Run optimizer.step unless the gradients overflowed; returns the overflow flag as a bool
        tensor. lr_scheduler, when given, is stepped only after a step that was not skipped (this
        reads the flag on the host: one sync per step on a GPU).

        A ScaledStepOptimizer (llmkern's fused optimizers) gets the scale and unscales, checks and
        skips inside its update, with no host sync. Any other torch optimizer gets GradScaler's
        path: an in-place unscale of every gradient, then a host read of the flag to decide whether
        to call its step()."""
        if isinstance(optimizer, ScaledStepOptimizer):
            groups = () if self.process_group is None else (self.process_group,)
            optimizer.step(grad_scale=self._scale, overflow_groups=groups)
            found_inf = optimizer.last_step_skipped
        else:
            found_inf = self._step_unfused(optimizer)
        self._found_inf = found_inf
        if lr_scheduler is not None and not bool(found_inf):
            lr_scheduler.step()
        return found_inf.bool()

    def _step_unfused(self, optimizer) -> torch.Tensor:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        dev = grads[0].device if grads else self._device
        self._to(dev)
        found_inf = torch.zeros(1, dtype=torch.float32, device=dev)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse_scale(self._scale, dev))
        for g in union_of_groups(((None, sharded_over(p)) for p in params), (self.process_group,)):
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=g)
        if found_inf.item() == 0:
            optimizer.step()
        return found_inf

    @staticmethod
    def _flag(found_inf) -> torch.Tensor | None:
        """update()'s argument as a tensor (nonzero: overflow), or None for "the last step()'s"."""
        if found_inf is None or isinstance(found_inf, torch.Tensor):
            if found_inf is not None and found_inf.numel() != 1:
                raise ValueError(f"update(found_inf): a found_inf tensor has one element, got shape "
                                 f"{tuple(found_inf.shape)}")
            return found_inf
        if isinstance(found_inf, bool):
            return torch.tensor([found_inf])
        raise TypeError(f"update(found_inf) takes None (the flag of the last step()), a bool, or a one-element "
                        f"tensor (nonzero: the step overflowed); got {type(found_inf).__name__} {found_inf!r}. "
                        f"(torch.amp.GradScaler.update(new_scale) sets the scale instead: here the scale "
                        f"follows the config's state machine, or load_state_dict.)")

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None) -> None:
        """Advance the state machine by one step. `found_inf` defaults to the flag of the last step()."""
        found_inf = self._flag(found_inf)
        if found_inf is None:
            found_inf = self._found_inf
        if found_inf is None:
            raise RuntimeError("DynamicLossScaler.update(): no step() was taken since the last update; "
                               "pass found_inf explicitly")
        c = self.config
        f = found_inf.to(self._device).reshape(1) != 0
        hyst = torch.where(f, self._hysteresis_left - 1, torch.full_like(self._hysteresis_left, c.hysteresis))
        cut = f & (hyst <= 0)
        backed = self._scale * c.backoff_factor
        self._min_scale_hits += (cut & (backed < c.min_scale)).long()
        scale = torch.where(cut, backed.clamp(min=c.min_scale), self._scale)
        self._hysteresis_left = torch.where(cut, torch.full_like(hyst, c.hysteresis), hyst)
        tracker = torch.where(f, torch.zeros_like(self._growth_tracker), self._growth_tracker + 1)
        grow = (~f) & (tracker >= c.growth_interval)
        self._scale = torch.where(grow, (scale * c.growth_factor).clamp(max=c.max_scale), scale)
        self._growth_tracker = torch.where(grow, torch.zeros_like(tracker), tracker)
        self._overflow_steps += f.long()
        self._last_found_inf, self._found_inf = found_inf, None
        self._updates += 1
        # The min-scale warning needs the count on the host: at once on CPU, every 100 updates on a
        # GPU (one 8-byte read per 100 steps instead of a sync per step).
        if self._device.type == "cpu" or self._updates % 100 == 0:
            self._warn_min_scale()

    def _warn_min_scale(self) -> None:
        hits = self.min_scale_hits
        if hits > self._warned_min:
            self._warned_min = hits
            warnings.warn(f"DynamicLossScaler: the loss scale is clamped at min_scale="
                          f"{self.config.min_scale} ({hits} cut(s) clamped, {self.overflow_steps} overflow "
                          f"steps skipped so far); gradients overflow even at the minimum scale. Training "
                          f"continues; consider bf16 or a lower learning rate.", RuntimeWarning, stacklevel=3)

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_tracker": int(self._growth_tracker.item()),
                "hysteresis_left": int(self._hysteresis_left.item()), "overflow_steps": self.overflow_steps,
                "min_scale_hits": self.min_scale_hits, "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.config = LossScalerConfig(**state["config"])
        d = self._device
        self._scale = torch.tensor([state["scale"]], dtype=torch.float32, device=d)
        self._growth_tracker = torch.tensor([state["growth_tracker"]], dtype=torch.int32, device=d)
        self._hysteresis_left = torch.tensor([state["hysteresis_left"]], dtype=torch.int32, device=d)
        self._overflow_steps = torch.tensor([state["overflow_steps"]], dtype=torch.int64, device=d)
        self._min_scale_hits = torch.tensor([state["min_scale_hits"]], dtype=torch.int64, device=d)
        self._warned_min = state["min_scale_hits"]
