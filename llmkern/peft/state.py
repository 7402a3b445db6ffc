"""Whole-model switches: merge / unmerge / unload, disable, and the trainable-parameter view."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from llmkern.nn.lora import LoRALinear
from llmkern.peft.models import require_transformers
from llmkern.peft.targets import set_submodule

__all__ = ["merge", "unmerge", "merge_and_unload", "disable_adapters", "trainable_parameters"]


def _switchables(model: nn.Module):
    """Every module with a ``disabled`` flag that llmkern.peft put in: LoRALinear, adapters, prompts."""
    return [m for m in model.modules() if getattr(m, "_llmkern_peft", False) or isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> int:
    """Folds every LoRALinear's s·B·A into its base weight. Returns how many were merged."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.merge()
    return len(mods)


def unmerge(model: nn.Module) -> int:
    """Undoes ``merge`` on every LoRALinear (the adapters stay, trainable again)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.unmerge()
    return len(mods)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges each LoRALinear and puts back a plain ``nn.Linear`` (or GPT-2 ``Conv1D``) holding the merged
    weight. Raises if non-mergeable llmkern modules (adapters, prompts) are present: they cannot be folded."""
    others = [type(m).__name__ for m in model.modules() if getattr(m, "_llmkern_peft", False)]
    if others:
        raise ValueError(f"merge_and_unload: {sorted(set(others))} cannot be merged into the base weights; only "
                         "LoRA can")
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        m.merge()
        if m.from_conv1d:
            require_transformers("merge_and_unload of a GPT-2 Conv1D layer")
            from transformers.pytorch_utils import Conv1D
            base = Conv1D(m.out_features, m.in_features).to(device=m.weight.device, dtype=m.weight.dtype)
            base.weight = nn.Parameter(m.weight.detach().t().contiguous())
        else:
            base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            base.weight = nn.Parameter(m.weight.detach())
        base.bias = None if m.bias is None else nn.Parameter(m.bias.detach())
        set_submodule(model, name, base)
    for attr in ("llmkern_lora_config", "llmkern_in_place"):  # a plain model now: nothing to save or disable
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model runs as its base model: LoRA (unmerged), adapters and prompts are off.
    A merged LoRALinear is already part of the base weight and cannot be switched off: that raises.
    So does a model whose own parameters trained in place (LoRA's modules_to_save or bias, a loaded
    classifier): their base values are gone, and the block would not run the base model."""
    mods = _switchables(model)
    merged = [m for m in mods if getattr(m, "merged", False)]
    if merged:
        raise RuntimeError(f"disable_adapters: {len(merged)} LoRA layer(s) are merged; call unmerge(model) first")
    in_place = getattr(model, "llmkern_in_place", None)
    if in_place:
        first, why = next(iter(in_place.items()))
        raise RuntimeError(f"disable_adapters: {len(in_place)} parameter(s) of the base model train or were loaded "
                           f"in place ({first}: {why}); their base values are gone, so the base model cannot be "
                           "run from this one")
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter with requires_grad (what an optimizer should get)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
