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

    scaler = DynamicLossScaler(LossScalerConfig(), process_group=None)
    for micro in batches:
        scaler.scale(model(micro)).backward()
    skipped = scaler.step(optimizer)        # a bool tensor; the fused optimizers unscale in-kernel
    scaler.update()
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass(kw_only=True, slots=True)
class LossScalerConfig:
    init_scale: float = 2.0 ** 16
    """Scale of the first step. 2^16 is GradScaler's and DeepSpeed's documented default."""
    growth_factor: float = 2.0
    """The scale is multiplied by this after `growth_interval` consecutive clean steps (> 1)."""
    backoff_factor: float = 0.5
    """The scale is multiplied by this when it is cut (in (0, 1))."""
    growth_interval: int = 2000
    """Consecutive clean steps before the scale grows (>= 1)."""
    hysteresis: int = 1
    """The scale is cut on this many consecutive overflow steps; 1 cuts on every overflow
    (GradScaler), 2 tolerates one isolated overflow (DeepSpeed's and Megatron's default). Every
    overflow step is skipped whatever this is."""
    min_scale: float = 1.0
    """The scale never goes below this; reaching it warns and counts `min_scale_hits`."""
    max_scale: float = 2.0 ** 24
    """The scale never grows above this."""

    def __post_init__(self):
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError(f"growth_interval and hysteresis must be >= 1, got {self.growth_interval} "
                             f"and {self.hysteresis}")
        if not 0.0 < self.min_scale <= self.init_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= init_scale <= max_scale, got {self.min_scale}, "
                             f"{self.init_scale}, {self.max_scale}")


class DynamicLossScaler:
    """fp16 dynamic loss scaler; see the module docstring for the exact state machine.

    `process_group`: when given, the overflow flag is all-reduced (MAX) over it, so ranks whose
    gradients are sharded (ZeRO, tensor parallel) skip the same steps."""

    def __init__(self, config: LossScalerConfig | None = None, *, process_group=None,
                 device: torch.device | str | None = None):
        self.config = config or LossScalerConfig()
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

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale, a float32 [1] tensor on the gradients' device."""
        return self._scale

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
        """Whether the last updated step overflowed and was skipped (synchronises)."""
        return self._last_found_inf is not None and bool(self._last_found_inf.item() != 0)

    # ---- the training-loop API -------------------------------------------------------------
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * scale. Call it on every micro-batch; the scale only changes in update()."""
        self._to(loss.device)
        return loss * self._scale  # as GradScaler: a float32 [1] scale, so an fp16 loss is scaled in fp32

    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    def reduce_found_inf(self, found_inf: torch.Tensor) -> torch.Tensor:
        """All-reduce the overflow flag (MAX) over the process group, in place; a no-op without one."""
        if self.process_group is not None:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self.process_group)
        return found_inf

    def step(self, optimizer, lr_scheduler=None) -> torch.Tensor:
        """Run optimizer.step unless the gradients overflowed; returns found_inf as a bool tensor.
        lr_scheduler, when given, is stepped only after a step that was not skipped.

        llmkern's fused optimizers unscale, check and skip inside their kernel (no host sync). Any
        other torch optimizer gets GradScaler's path: an in-place unscale of every gradient, then a
        host read of the flag to decide whether to call its step()."""
        from llmkern.optim.mixed_precision import MixedPrecisionOptimizer

        if isinstance(optimizer, MixedPrecisionOptimizer):
            return optimizer.step(loss_scaler=self, lr_scheduler=lr_scheduler)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        dev = grads[0].device if grads else self._device
        self._to(dev)
        found_inf = torch.zeros(1, dtype=torch.float32, device=dev)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.inv_scale())
        self.record_found_inf(self.reduce_found_inf(found_inf))
        if found_inf.item() == 0:
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
        return found_inf.bool()

    def record_found_inf(self, found_inf: torch.Tensor) -> None:
        """Called by the optimizer with the (already reduced) flag of this step."""
        self._found_inf = found_inf

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None) -> None:
        """Advance the state machine by one step. `found_inf` defaults to the flag of the last step()."""
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
