"""Distributed engines on torch.distributed.

Layers, each using only the ones above it:
    groups.py       group resolution (ProcessGroup, 1-D DeviceMesh, mesh axis name), faults, timeouts
    ring.py         the ring schedule and its gloo transport (reduce-scatter / all-gather phases)
    nccl.py         NCCL communicators of the same ring on CUDA (csrc/comm)
    collectives.py  all_reduce_ / reduce_scatter / all_gather / broadcast_ / send / recv, the counter
    mesh.py         ParallelConfig / ParallelDims over init_device_mesh, mark_sharded
    buffers.py      FlatLayout + GradBuffer: flat padded buckets reduced during backward
    ddp.py          DistributedDataParallel on a GradBuffer
    zero.py         ZeRO: optimizer states, gradients (and parameters) partitioned over the group
    memory.py       estimate_memory: ZeRO's per-rank bytes without running; `llmkern plan --zero`
    checkpoint.py   DCP checkpoints keyed by parameter names, loadable at any world size and stage
    pipeline/       pipeline parallelism: schedules as checked data, partitioning, the runtime
    tensor_parallel/  Megatron-style tensor parallelism: layers, LoRA on shards, apply_tensor_parallel
    parallelize.py  parallelize: TP -> activation checkpointing -> DDP (ZeRO), the pipeline outside
"""
from llmkern.parallel.buffers import (
    AllReduce,
    BucketReducer,
    BufferStats,
    FlatLayout,
    GradBuffer,
    ReduceScatter,
)
from llmkern.parallel.collectives import (
    COUNTER,
    CommCounter,
    Handle,
    agree,
    all_gather,
    all_reduce_,
    broadcast_,
    counting,
    record_collective,
    recv,
    reduce_scatter,
    send,
)
from llmkern.parallel.ddp import DDPConfig, DDPStats, DistributedDataParallel, apply_ddp
from llmkern.parallel.groups import DEFAULT_TIMEOUT_S, CollectiveError
from llmkern.parallel.mesh import ParallelConfig, ParallelDims, init_mesh, mark_sharded, sharded_over
from llmkern.parallel.zero import ZeroConfig, ZeroMemory, ZeroModel, ZeroOptimizer, apply_zero
from llmkern.parallel.checkpoint import load_checkpoint, save_checkpoint
from llmkern.parallel.memory import estimate_memory
from llmkern.parallel.pipeline import Pipeline, PipelineConfig, PipelineError, apply_pipeline

__all__ = [
    "COUNTER", "DEFAULT_TIMEOUT_S", "AllReduce", "BucketReducer", "BufferStats", "CollectiveError", "CommCounter",
    "DDPConfig", "DDPStats", "DistributedDataParallel", "FlatLayout", "GradBuffer", "Handle", "ParallelConfig",
    "ParallelDims", "ReduceScatter", "agree", "all_gather", "all_reduce_", "apply_ddp", "broadcast_", "counting",
    "init_mesh", "mark_sharded", "record_collective", "recv", "reduce_scatter", "send",
    "sharded_over",
]
__all__ += ["Pipeline", "PipelineConfig", "PipelineError", "apply_pipeline"]
__all__ += ["ZeroConfig", "ZeroMemory", "ZeroModel", "ZeroOptimizer", "apply_zero"]
__all__ += ["estimate_memory", "load_checkpoint", "save_checkpoint"]

from llmkern.parallel.parallelize import Parallelized, ParallelizeConfig, check_degrees, parallelize  # noqa: E402

__all__ += ["Parallelized", "ParallelizeConfig", "check_degrees", "parallelize"]
