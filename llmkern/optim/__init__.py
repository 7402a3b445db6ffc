"""Fused optimizers with fp32 master weights, the dynamic loss scaler and the CPU Adam of ZeRO-Offload.

Three layers, each usable alone (ZeRO calls the first two on 1-D shards of flat fp32 masters):
  step_scalars   found_inf and grad_coef on the device; global sums of squares over the process
                 groups each gradient is sharded over (SHARDED_OVER)
  fused_update   one fused_adamw_/fused_sgd_ launch over lists of tensors sharing a step count
  the classes    torch.optim.Optimizer façades: FusedAdamW, FusedAdam, FusedSGD, CPUAdam
"""
from llmkern.optim.adamw import FusedAdam, FusedAdamW
from llmkern.optim.cpu_adam import CPUAdam
from llmkern.optim.fused_update import AdamWUpdate, FusedUpdate, SGDUpdate, advance_step_, launch_seed
from llmkern.optim.loss_scaler import DynamicLossScaler, LossScalerConfig, ScaledStepOptimizer
from llmkern.optim.mixed_precision import MixedPrecisionOptimizer
from llmkern.optim.sgd import FusedSGD
from llmkern.optim.step_scalars import (SHARDED_OVER, StepScalars, global_sumsq, grad_norm, inverse_scale,
                                        sharded_over, step_scalars, union_of_groups)

__all__ = ["AdamWUpdate", "CPUAdam", "DynamicLossScaler", "FusedAdam", "FusedAdamW", "FusedSGD", "FusedUpdate",
           "LossScalerConfig", "MixedPrecisionOptimizer", "SGDUpdate", "SHARDED_OVER", "ScaledStepOptimizer",
           "StepScalars", "advance_step_", "global_sumsq", "grad_norm", "inverse_scale", "launch_seed",
           "sharded_over", "step_scalars", "union_of_groups"]
