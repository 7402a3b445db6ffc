"""Drop-in modules; each holds parameters and calls llmkern.ops."""
from llmkern.nn.adapter import Adapter, ParallelAdapter
from llmkern.nn.lora import LoRALinear

__all__ = ["Adapter", "LoRALinear", "ParallelAdapter"]
