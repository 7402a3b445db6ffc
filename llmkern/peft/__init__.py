"""Parameter-efficient fine-tuning: configs, ``apply_*(model, config)``, merge/unmerge, PEFT interop.

Every ``apply_*`` freezes the base model and returns an :class:`InjectionReport`. It checks
everything before it changes the model, so when it raises (the config selects nothing, names a
module the model lacks, or the model already carries an llmkern.peft method: one per model) the
model is as it was. ``LoraConfig`` takes PEFT's field names, and ``apply_lora`` takes a
``peft.LoraConfig`` too. ``apply_adapters`` attaches :class:`llmkern.nn.Adapter` /
:class:`~llmkern.nn.ParallelAdapter`, which run the fused op ``llmkern::adapter_bottleneck``.
Importing the package needs no transformers; the functions that do need it say which extra to install.
"""
from llmkern.peft.adapters import apply_adapters
from llmkern.peft.config import AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from llmkern.peft.interop import fuse_peft_model, load_adapter, save_adapter
from llmkern.peft.lora import apply_lora
from llmkern.peft.models import SUPPORTED_MODEL_TYPES
from llmkern.peft.prompt import apply_p_tuning, apply_prefix_tuning, apply_prompt_tuning
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.state import disable_adapters, merge, merge_and_unload, trainable_parameters, unmerge

__all__ = ["AdapterConfig", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
           "InjectionReport", "SUPPORTED_MODEL_TYPES", "apply_adapters", "apply_lora", "apply_p_tuning",
           "apply_prefix_tuning", "apply_prompt_tuning", "count_parameters", "disable_adapters", "fuse_peft_model",
           "load_adapter", "merge", "merge_and_unload", "save_adapter", "trainable_parameters", "unmerge"]
