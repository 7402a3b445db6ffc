"""``apply_lora``: swap selected ``nn.Linear`` (and GPT-2 ``Conv1D``) modules for ``LoRALinear``.

Two phases, so that a failed call leaves the model as it was: :func:`plan_lora` reads the model and
the config and raises on anything wrong (nothing changed yet); :func:`commit_lora` changes the model
and has nothing left to check. ``load_adapter`` checks the saved tensors against the plan between
the two.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from llmkern.nn.lora import LoRALinear
from llmkern.peft.config import LoraConfig
from llmkern.peft.models import default_lora_targets, freeze_base, refuse_second_method
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.targets import as_linear, matches, select_modules, set_submodule

__all__ = ["LoraPlan", "apply_lora", "as_lora_config", "commit_lora", "plan_lora"]

_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}
"""PEFT adds these to modules_to_save for its classification task types (peft_model.py), keeping
the ones the model has; a saved PEFT config therefore lists both ``classifier`` and ``score``."""
_HEAD_NAMES = {h for heads in _TASK_HEADS.values() for h in heads}


@dataclass(kw_only=True, slots=True)
class LoraPlan:
    """What ``commit_lora`` will do; computed without changing the model."""

    config: LoraConfig
    """The config the plan was made from."""
    selected: list[str]
    """Paths of the linears that become LoRALinear."""
    skipped: dict[str, str]
    """Path -> why a matching module is left alone."""
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Path -> (C_in, C_out) of each selected linear: lora_A is (R, C_in), lora_B (C_out, R)."""
    in_place: dict[str, str] = field(default_factory=dict)
    """Name of each existing parameter that trains (modules_to_save, bias) -> why."""


def as_lora_config(config, method: str) -> LoraConfig:
    """An llmkern LoraConfig, or a ``peft.LoraConfig`` converted by :meth:`LoraConfig.from_peft`."""
    if isinstance(config, LoraConfig):
        return config
    if type(config).__name__ == "LoraConfig" and type(config).__module__.startswith("peft."):
        return LoraConfig.from_peft(config)
    raise TypeError(f"{method}: config must be a llmkern.peft.LoraConfig (or a peft.LoraConfig), got "
                    f"{type(config).__name__}")


def _modules_to_save(model: nn.Module, config: LoraConfig, method: str) -> list[str]:
    """Paths of the modules that train whole. A name the user gave must match; PEFT's task heads
    (``classifier`` and ``score`` for SEQ_CLS) are taken where the model has them."""
    names = list(config.modules_to_save or [])
    heads = _TASK_HEADS.get(config.task_type, [])
    paths = [n for n, _ in model.named_modules() if n]
    found = []
    for name in names + [h for h in heads if h not in names]:
        hits = [p for p in paths if matches(p, [name])]
        if not hits and name not in _HEAD_NAMES:
            raise ValueError(f"{method}: modules_to_save entry {name!r} matches no module of {type(model).__name__}")
        found += [p for p in hits if p not in found and not any(p.startswith(f + ".") for f in found)]
    return found


def plan_lora(model: nn.Module, config, method: str = "apply_lora") -> LoraPlan:
    """Everything apply_lora will do, checked against the model; raises before any change."""
    config = as_lora_config(config, method)
    refuse_second_method(model, method)
    target = config.target_modules if config.target_modules is not None else default_lora_targets(model, method)
    save = _modules_to_save(model, config, method)
    selected, skipped = select_modules(model, target, config.exclude_modules, method,
                                       layers=config.layers_to_transform, layers_pattern=config.layers_pattern,
                                       protected=save)
    shapes, flipped = {}, []
    for n in selected:
        m = model.get_submodule(n)
        rows, cols = m.weight.shape
        conv1d = not isinstance(m, nn.Linear)
        shapes[n] = (rows, cols) if conv1d else (cols, rows)  # Linear stores (C_out, C_in), Conv1D (C_in, C_out)
        if config.fan_in_fan_out and not conv1d:
            flipped.append(n)
    if flipped:
        # PEFT corrects the flag per module (with a warning both ways); the module's type decides here
        # too. Only a flag set against the model is worth a warning: False is the default on GPT-2.
        warnings.warn(f"{method}: fan_in_fan_out=True, but {len(flipped)} selected module(s) are nn.Linear "
                      f"({flipped[0]}); each module's own layout is used, as PEFT does", stacklevel=3)
    in_place = {}
    for s in save:
        for pn, _ in model.get_submodule(s).named_parameters():
            in_place[f"{s}.{pn}"] = "modules_to_save"
    if config.bias != "none":
        owners = set(selected) if config.bias == "lora_only" else None
        for pn, p in model.named_parameters():
            path, _, leaf = pn.rpartition(".")
            if leaf == "bias" and (owners is None or path in owners) and pn not in in_place:
                in_place[pn] = f"bias={config.bias!r}"
    return LoraPlan(config=config, selected=selected, skipped=skipped, shapes=shapes, in_place=in_place)


def _init_factors(lora: LoRALinear, init) -> None:
    """PEFT's ``init_lora_weights``: True is LoRALinear's own init (A Kaiming-uniform, B zero)."""
    if init == "gaussian":
        nn.init.normal_(lora.lora_A.weight, std=1 / lora.r)
    elif init is False:  # nn.Linear's default for both, as PEFT leaves them: U(±1/sqrt(fan_in))
        for lin in (lora.lora_A, lora.lora_B):
            nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))


@torch.no_grad()
def commit_lora(model: nn.Module, plan: LoraPlan, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                method: str = "apply_lora") -> InjectionReport:
    """Freezes the model, swaps in the LoRALinear layers (with `factors`, path -> (A, B), if given),
    unfreezes the in-place parameters and records the config on the model for ``save_adapter``."""
    cfg = plan.config
    freeze_base(model)
    for n in plan.selected:
        old = model.get_submodule(n)
        lin, from_conv1d = as_linear(old)
        lora = LoRALinear.from_linear(lin, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.backend,
                                      from_conv1d=from_conv1d)
        lora.train(old.training)  # a model in eval mode stays there: no dropout until model.train()
        _init_factors(lora, cfg.init_lora_weights)
        if factors is not None:
            lora.lora_A.weight.copy_(factors[n][0])
            lora.lora_B.weight.copy_(factors[n][1])
        set_submodule(model, n, lora)
    params = dict(model.named_parameters())
    for pn in plan.in_place:
        params[pn].requires_grad_(True)
    if cfg.inference_mode:
        freeze_base(model)
    model.llmkern_lora_config = cfg
    model.llmkern_in_place = dict(plan.in_place)
    trainable, total = count_parameters(model)
    return InjectionReport(method=method, replaced=list(plan.selected), skipped=plan.skipped,
                           in_place=dict(plan.in_place), trainable_params=trainable, total_params=total)


def apply_lora(model: nn.Module, config) -> InjectionReport:
    """Freezes the model and replaces each selected linear by a ``LoRALinear`` sharing its weight.

    `config`: a :class:`LoraConfig`, or PEFT's ``peft.LoraConfig`` (converted; what llmkern cannot
    honour is refused). The replaced module keeps its path, so state-dict keys of the base weights
    are unchanged (a GPT-2 Conv1D becomes a Linear whose weight is the transpose;
    ``merge_and_unload`` turns it back). Raises, leaving the model unchanged, when the config selects
    nothing, names a module the model lacks, or the model already carries an llmkern.peft method."""
    return commit_lora(model, plan_lora(model, config, "apply_lora"))
