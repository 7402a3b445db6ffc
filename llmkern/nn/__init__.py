"""Drop-in modules; each holds parameters and calls llmkern.ops."""
from llmkern.nn.adapter import Adapter, ParallelAdapter
from llmkern.nn.lora import LoRALinear
from llmkern.nn.loss import CrossEntropyLoss, FusedLinearCrossEntropyLoss
from llmkern.nn.mlp import GatedMLP
from llmkern.nn.norm import LayerNorm, RMSNorm

__all__ = ["Adapter", "CrossEntropyLoss", "FusedLinearCrossEntropyLoss", "GatedMLP", "LayerNorm", "LoRALinear",
           "ParallelAdapter", "RMSNorm"]
