"""Drop-in modules; each holds parameters and calls llmkern.ops."""
from llmkern.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
