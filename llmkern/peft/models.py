"""What llmkern.peft reads from a model before changing it: its dimensions and default targets,
the llmkern method it already carries, and the one switch every method flips (freezing the base).
"""
from __future__ import annotations

from torch import nn

from llmkern.nn.lora import LoRALinear

__all__ = ["DEFAULT_LORA_TARGETS", "HF_EXTRA", "SUPPORTED_MODEL_TYPES", "carried_method", "default_lora_targets",
           "freeze_base", "model_dims", "refuse_second_method", "require_transformers"]

HF_EXTRA = "pip install 'llmkern[hf]'"
"""The install command of the optional Hugging Face dependencies (transformers, peft, safetensors)."""

SUPPORTED_MODEL_TYPES = ("bert", "gpt2", "llama")
"""``config.model_type`` values the prompt methods and adapters are tested on (transformers 5.23)."""

DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
}
"""``LoraConfig(target_modules=None)``: the modules PEFT 0.21 adapts by default for each model type
(its ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; tests/peft check that the two agree)."""


def require_transformers(what: str):
    """The ``transformers`` module, or an ImportError naming the extra that provides it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{what} needs transformers, which is not installed: {HF_EXTRA}") from e
    return transformers


def model_dims(model: nn.Module, method: str) -> dict:
    """Hidden size, layers, KV heads and head dim, or a ValueError naming the supported architectures."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{method}: model type {mt!r} ({type(model).__name__}) is not supported; supported "
                         f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"model_type": mt, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "kv_heads": kv_heads,
            "head_dim": head_dim}


def default_lora_targets(model: nn.Module, method: str) -> list[str]:
    """PEFT's default LoRA targets for the model's type, or a ValueError asking for target_modules."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"{method}: target_modules=None needs a default for the model type, and {mt!r} "
                         f"({type(model).__name__}) has none; defaults exist for {sorted(DEFAULT_LORA_TARGETS)}. "
                         "Pass target_modules (names, a regex or 'all-linear')")
    return list(DEFAULT_LORA_TARGETS[mt])


def freeze_base(model: nn.Module) -> None:
    """requires_grad=False on every parameter of the model (the new method's parameters come after)."""
    for p in model.parameters():
        p.requires_grad_(False)


def carried_method(model: nn.Module) -> str | None:
    """The llmkern.peft method the model carries ("LoRA (14 layers)", "prompt_tuning", ...), or None."""
    loras = sum(isinstance(m, LoRALinear) for m in model.modules())
    if loras:
        return f"LoRA ({loras} layer{'s' if loras > 1 else ''})"
    prompt = getattr(model, "llmkern_prompt", None)
    if prompt is not None:
        return prompt.kind
    adapters = [m for m in model.modules() if getattr(m, "_llmkern_peft", False)]
    if adapters:
        return f"{type(adapters[0]).__name__} ({len(adapters)} module{'s' if len(adapters) > 1 else ''})"
    return None


def refuse_second_method(model: nn.Module, method: str) -> None:
    """One llmkern.peft method per model: a second ``apply_*`` (or a load into an adapted model) would
    stack adapters (two series adapters on one output run twice) or leave layers no config describes,
    so it raises before anything changes."""
    carried = carried_method(model)
    if carried is not None:
        raise ValueError(f"{method}: the model already carries an llmkern.peft method: {carried}. One method "
                         "per model: apply it to a fresh base model, or call merge_and_unload(model) first "
                         "(LoRA only)")
