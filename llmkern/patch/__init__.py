"""One-call patching of transformers models with llmkern's fused kernels (see llmkern/patch/apply.py).

    report = apply_llmkern_kernels(model)   # Llama, Mistral, Qwen2, Qwen3, Gemma, GPT-2
    print(report)                           # what was patched, what was skipped and why
    revert(model)                           # back to transformers' own forwards
"""
from llmkern.patch.apply import KERNELS, PatchReport, apply_llmkern_kernels, revert
from llmkern.patch.architectures import ARCHITECTURES

__all__ = ["apply_llmkern_kernels", "revert", "PatchReport", "KERNELS", "ARCHITECTURES"]
