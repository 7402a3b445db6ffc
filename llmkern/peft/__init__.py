"""Parameter-efficient fine-tuning: configs, ``apply_*(model, config)``, merge/unmerge, PEFT interop.

Every ``apply_*`` freezes the base model, returns an :class:`InjectionReport`, and raises when its
config selects nothing. ``apply_adapters`` attaches :class:`llmkern.nn.Adapter` /
:class:`~llmkern.nn.ParallelAdapter`, which run the fused op ``llmkern::adapter_bottleneck``.
"""
from llmkern.peft.adapters import apply_adapters
from llmkern.peft.config import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from llmkern.peft.interop import fuse_peft_model, load_adapter, save_adapter
from llmkern.peft.lora import apply_lora
from llmkern.peft.prompt import SUPPORTED_MODEL_TYPES, apply_p_tuning, apply_prefix_tuning, apply_prompt_tuning
from llmkern.peft.report import InjectionReport
from llmkern.peft.state import disable_adapters, merge, merge_and_unload, trainable_parameters, unmerge

__all__ = ["AdapterConfig", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
           "InjectionReport", "SUPPORTED_MODEL_TYPES", "apply_adapters", "apply_lora", "apply_p_tuning",
           "apply_prefix_tuning", "apply_prompt_tuning", "disable_adapters", "fuse_peft_model", "load_adapter",
           "merge", "merge_and_unload", "save_adapter", "trainable_parameters", "unmerge"]
