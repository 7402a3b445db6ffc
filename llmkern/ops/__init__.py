"""One public function per op: backend choice + autograd + fake + <op>_ref."""
from llmkern.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from llmkern.ops.lora_linear import lora_linear, lora_linear_ref

__all__ = ["adapter_bottleneck", "adapter_bottleneck_ref", "lora_linear", "lora_linear_ref"]
