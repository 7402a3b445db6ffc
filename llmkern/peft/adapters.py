"""``apply_adapters``: Houlsby series adapters after the attention and FFN output projections, or He et
al. parallel adapters beside each FFN. Adapters hang off the wrapped module as ``llmkern_adapter``
and run in a forward hook, so the base model's state-dict keys do not move."""
from __future__ import annotations

from torch import nn

from llmkern.nn.adapter import Adapter, ParallelAdapter
from llmkern.peft.config import AdapterConfig
from llmkern.peft.lora import freeze_base, select_modules
from llmkern.peft.prompt import model_dims
from llmkern.peft.report import InjectionReport, count_parameters

__all__ = ["apply_adapters", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = {
    "series": {"llama": ["self_attn.o_proj", "mlp.down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"],
               "bert": r".*\.attention\.output\.dense|.*\.layer\.\d+\.output\.dense"},
    "parallel": {"llama": ["mlp"], "gpt2": ["mlp"]},
}
"""Per form and model type, the sublayers wrapped when ``target_modules`` is None."""


def _series_hook(module, args, output):
    return module.llmkern_adapter(output)


def _parallel_hook(module, args, output):
    return module.llmkern_adapter(args[0], output)


def _channels(m: nn.Module, form: str, hidden: int) -> int:
    if form == "parallel":
        return hidden
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        return m.out_features
    return w.shape[1] if w is not None and w.dim() == 2 else hidden  # GPT-2 Conv1D: (C_in, C_out)


def apply_adapters(model: nn.Module, config: AdapterConfig) -> InjectionReport:
    """Freezes the model and attaches one adapter per selected sublayer."""
    dims = model_dims(model, "apply_adapters")
    target = config.target_modules
    if target is None:
        table = DEFAULT_TARGETS[config.form]
        if dims["model_type"] not in table:
            raise ValueError(f"apply_adapters: no default {config.form} targets for {dims['model_type']!r}; "
                             f"defaults exist for {sorted(table)}; pass target_modules")
        target = table[dims["model_type"]]
    accept = (lambda m: True) if config.form == "parallel" else None
    kw = {"accept": accept, "kind": "module"} if accept else {}
    selected, skipped = select_modules(model, target, config.exclude_modules, "apply_adapters", **kw)
    freeze_base(model)
    w = model.get_input_embeddings().weight
    for n in selected:
        m = model.get_submodule(n)
        cls, hook = (Adapter, _series_hook) if config.form == "series" else (ParallelAdapter, _parallel_hook)
        m.llmkern_adapter = cls(_channels(m, config.form, dims["hidden"]), config.bottleneck, config.activation,
                                config.scale, config.layer_norm, device=w.device, dtype=w.dtype)
        m.register_forward_hook(hook)
    trainable, total = count_parameters(model)
    return InjectionReport(method="apply_adapters", replaced=selected, skipped=skipped, trainable_params=trainable,
                           total_params=total)
