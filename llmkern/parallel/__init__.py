"""Distributed engines on torch.distributed: communication (comm) and data parallelism (ddp)."""
from llmkern.parallel.comm import CommStats, ring_all_reduce
from llmkern.parallel.ddp import DDPConfig, DDPStats, DistributedDataParallel, apply_ddp
from llmkern.parallel.pipeline import Pipeline, PipelineConfig, PipelineError, apply_pipeline

__all__ = ["CommStats", "DDPConfig", "DDPStats", "DistributedDataParallel", "apply_ddp", "ring_all_reduce"]
__all__ += ["Pipeline", "PipelineConfig", "PipelineError", "apply_pipeline"]
