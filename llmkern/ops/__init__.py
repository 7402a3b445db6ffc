"""One public function per op: backend choice + autograd + fake + <op>_ref (llmkern/ops/_backends.py says
how an op is added)."""
from llmkern.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from llmkern.ops.cross_entropy import cross_entropy, cross_entropy_ref
from llmkern.ops.fused_adamw import fused_adamw_, fused_adamw_ref
from llmkern.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from llmkern.ops.fused_sgd import fused_sgd_, fused_sgd_ref
from llmkern.ops.layer_norm import layer_norm, layer_norm_ref
from llmkern.ops.lora_linear import lora_linear, lora_linear_ref
from llmkern.ops.multi_tensor_sumsq import multi_tensor_sumsq, multi_tensor_sumsq_ref
from llmkern.ops.rms_norm import rms_norm, rms_norm_ref
from llmkern.ops.rope import rope, rope_ref
from llmkern.ops.swiglu import geglu, geglu_ref, swiglu, swiglu_ref

__all__ = ["adapter_bottleneck", "adapter_bottleneck_ref", "cross_entropy", "cross_entropy_ref", "fused_adamw_",
           "fused_adamw_ref", "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref", "fused_sgd_",
           "fused_sgd_ref", "geglu", "geglu_ref", "layer_norm", "layer_norm_ref", "lora_linear", "lora_linear_ref",
           "multi_tensor_sumsq", "multi_tensor_sumsq_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref", "swiglu",
           "swiglu_ref"]
