"""Fused optimizers with fp32 master weights, the dynamic loss scaler and the CPU Adam of ZeRO-Offload."""
from llmkern.optim.adamw import FusedAdam, FusedAdamW
from llmkern.optim.cpu_adam import CPUAdam
from llmkern.optim.loss_scaler import DynamicLossScaler, LossScalerConfig
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer
from llmkern.optim.sgd import FusedSGD

__all__ = ["CPUAdam", "DynamicLossScaler", "FusedAdam", "FusedAdamW", "FusedSGD", "LossScalerConfig",
           "MixedPrecisionOptimizer"]
