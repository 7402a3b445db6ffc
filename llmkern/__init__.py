"""llmkern: fused kernels, PEFT modules and distributed engines for LLM training on PyTorch."""
__version__ = "0.1.0"
