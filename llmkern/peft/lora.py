"""``apply_lora``: swap selected ``nn.Linear`` (and GPT-2 ``Conv1D``) modules for ``LoRALinear``."""
from __future__ import annotations

from torch import nn

from llmkern.nn.lora import LoRALinear
from llmkern.peft.config import LoraConfig
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.targets import is_linear_like, matches, output_head_names

__all__ = ["apply_lora", "as_linear", "freeze_base", "set_submodule", "select_modules"]


def freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def as_linear(m: nn.Module) -> tuple[nn.Linear, bool]:
    """The module as an nn.Linear; a Conv1D (weight (C_in, C_out)) gets a transposed copy of its weight."""
    if isinstance(m, nn.Linear):
        return m, False
    c_in, c_out = m.weight.shape
    lin = nn.Linear(c_in, c_out, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False)
    lin.bias = m.bias
    return lin, True


def select_modules(model: nn.Module, target, exclude, method: str, accept=is_linear_like,
                   kind: str = "nn.Linear or transformers Conv1D") -> tuple[list[str], dict[str, str]]:
    """(selected paths, skipped path -> reason). Raises when a listed target names no module, or when
    nothing at all is selected: a config that silently applies to nothing is the failure we refuse."""
    heads = output_head_names(model)
    selected, skipped = [], {}
    # Never select inside an existing LoRALinear (its lora_A / lora_B are nn.Linear too).
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    named = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p) for p in inside)]
    if isinstance(target, list):
        for t in target:
            if not any(matches(n, [t]) for n, _ in named):
                leaves = sorted({n.split(".")[-1] for n, m in named if accept(m)})
                raise ValueError(f"{method}: target module {t!r} matches no module of {type(model).__name__}; "
                                 f"candidate {kind} names are {leaves}")
    for n, m in named:
        if isinstance(m, LoRALinear) or any(n.startswith(s + ".") for s in selected):
            continue
        if target == "all-linear":
            if not accept(m):
                continue
            if n in heads:
                skipped[n] = "output head (all-linear leaves it alone)"
                continue
        elif not matches(n, target):
            continue
        if not accept(m):
            skipped[n] = f"{type(m).__name__} is not a {kind}"
            continue
        if exclude is not None and matches(n, exclude):
            skipped[n] = "excluded by exclude_modules"
            continue
        selected.append(n)
    if not selected:
        raise ValueError(f"{method}: target_modules={target!r} selected no module of {type(model).__name__} "
                         f"(skipped: {skipped or 'none matched'})")
    return selected, skipped


def apply_lora(model: nn.Module, config: LoraConfig) -> InjectionReport:
    """Freezes the model and replaces each selected linear by a ``LoRALinear`` sharing its weight.

    The replaced module keeps its path, so state-dict keys of the base weights are unchanged (a GPT-2
    Conv1D becomes a Linear whose weight is the transpose; ``merge_and_unload`` turns it back)."""
    selected, skipped = select_modules(model, config.target_modules, config.exclude_modules, "apply_lora")
    freeze_base(model)
    for n in selected:
        lin, from_conv1d = as_linear(model.get_submodule(n))
        lora = LoRALinear.from_linear(lin, config.r, config.alpha, config.dropout, config.use_rslora,
                                      config.backend)
        lora.from_conv1d = from_conv1d
        set_submodule(model, n, lora)
    trainable, total = count_parameters(model)
    return InjectionReport(method="apply_lora", replaced=selected, skipped=skipped, trainable_params=trainable,
                           total_params=total)
