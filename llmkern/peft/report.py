"""What an ``apply_*`` did: replaced modules, trainable/total parameters, skips with reasons."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["InjectionReport", "count_parameters"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A parameter reachable from two modules (tied input and
    output embeddings, a LoRALinear sharing its base weight) is counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


@dataclass(kw_only=True, slots=True)
class InjectionReport:
    method: str
    """Which apply_* produced this report."""
    replaced: list[str] = field(default_factory=list)
    """Module paths that were replaced or wrapped (for prompt methods: where the prompt is injected)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Module path -> why it was not touched (excluded, unsupported type, ...)."""
    in_place: dict[str, str] = field(default_factory=dict)
    """Existing parameter -> why it now trains in place (modules_to_save, a bias mode) or was loaded."""
    trainable_params: int = 0
    """Parameters with requires_grad after the call."""
    total_params: int = 0
    """All parameters of the model after the call."""

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [f"{self.method}: {len(self.replaced)} module(s) replaced; trainable {self.trainable_params:,} / "
                 f"{self.total_params:,} ({pct:.3f}%)"]
        lines += [f"  replaced {n}" for n in self.replaced]
        lines += [f"  skipped  {n}: {why}" for n, why in self.skipped.items()]
        lines += [f"  in place {n}: {why}" for n, why in self.in_place.items()]
        return "\n".join(lines)
