"""``apply_adapters``: Houlsby series adapters after the attention and FFN output projections, or He et
al. parallel adapters beside each FFN. Adapters hang off the wrapped module as ``llmkern_adapter``
and run in a forward hook, so the base model's state-dict keys do not move. Every adapter is built
(and so validated) before the model is touched: a failed call leaves it as it was."""
from __future__ import annotations

from torch import nn

from llmkern.nn.adapter import Adapter, ParallelAdapter
from llmkern.peft.config import AdapterConfig
from llmkern.peft.models import freeze_base, model_dims, refuse_second_method
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.targets import select_modules

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
    """Freezes the model and attaches one adapter per selected sublayer. Raises, leaving the model
    unchanged, when the model already carries an llmkern.peft method (a second set of series
    adapters would run after the first) or the config selects nothing."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"apply_adapters: config must be an llmkern.peft.AdapterConfig, got {type(config).__name__}")
    refuse_second_method(model, "apply_adapters")
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
    w = model.get_input_embeddings().weight
    cls, hook = (Adapter, _series_hook) if config.form == "series" else (ParallelAdapter, _parallel_hook)
    adapters = {n: cls(_channels(model.get_submodule(n), config.form, dims["hidden"]), config.bottleneck,
                       config.activation, config.scale, config.layer_norm, device=w.device, dtype=w.dtype)
                for n in selected}
    freeze_base(model)
    for n, adapter in adapters.items():
        m = model.get_submodule(n)
        m.llmkern_adapter = adapter.train(m.training)
        m.register_forward_hook(hook)
    trainable, total = count_parameters(model)
    return InjectionReport(method="apply_adapters", replaced=selected, skipped=skipped, trainable_params=trainable,
                           total_params=total)
