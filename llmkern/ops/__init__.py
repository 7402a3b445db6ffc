"""One public function per op: backend choice + autograd + fake + <op>_ref (llmkern/ops/_backends.py says
how an op is added)."""
from llmkern.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from llmkern.ops.fused_adamw import fused_adamw_, fused_adamw_ref
from llmkern.ops.fused_sgd import fused_sgd_, fused_sgd_ref
from llmkern.ops.lora_linear import lora_linear, lora_linear_ref
from llmkern.ops.multi_tensor_sumsq import multi_tensor_sumsq, multi_tensor_sumsq_ref

__all__ = ["adapter_bottleneck", "adapter_bottleneck_ref", "fused_adamw_", "fused_adamw_ref", "fused_sgd_",
           "fused_sgd_ref", "lora_linear", "lora_linear_ref", "multi_tensor_sumsq", "multi_tensor_sumsq_ref"]
