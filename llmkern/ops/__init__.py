"""One public function per op: backend choice + autograd + fake + <op>_ref."""
from llmkern.ops.lora_linear import lora_linear, lora_linear_ref

__all__ = ["lora_linear", "lora_linear_ref"]
