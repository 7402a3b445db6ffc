"""The one place `llmkern train` turns its `parallel` section into engines.

`missing_engines(layout)` says (before any process starts) which requested engine this tree lacks;
`parallelize(model, layout, ...)` applies the layout on every rank and returns a `Layout`: how to
run a training step's forward/backward, this rank's trainable parameters, the module a checkpoint
saves, and the traffic counters the summary reports.

    dp only          llmkern DistributedDataParallel over the world (fp32 gradient reduction)
    pp (x dp)        llmkern.parallel.apply_pipeline over the ("pp", "dp", "tp") mesh, each stage
                     wrapped in llmkern DDP over "dp"
    zero_stage 1-3   needs llmkern.parallel.apply_zero (the ZeRO engine)
    tp > 1           needs llmkern.parallel.apply_tensor_parallel / parallelize (the TP engine)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

import llmkern.parallel as lpar


def missing_engines(layout) -> list[str]:
    """Errors, naming the field, for the engines `layout` needs that llmkern.parallel lacks."""
    out = []
    if layout.zero_stage > 0 and not hasattr(lpar, "apply_zero"):
        out.append(f"parallel.zero_stage: {layout.zero_stage} needs the ZeRO engine (llmkern.parallel.apply_zero), "
                   f"which this build of llmkern does not have; use zero_stage: 0 (llmkern DDP)")
    elif layout.zero_stage > 0:
        # The ZeRO engine exists but is not routed yet: the lead wires apply_zero into parallelize()
        # below (model, optimizer = apply_zero(model, ZeroConfig(stage=..., offload_optimizer=...),
        # optimizer_class=FusedAdamW, mesh=dp group)).
        out.append(f"parallel.zero_stage: {layout.zero_stage}: llmkern.parallel.apply_zero exists but llmkern train "
                   f"does not route it yet (llmkern/train/layout.py parallelize)")
    if layout.tp > 1 and not hasattr(lpar, "apply_tensor_parallel"):
        out.append(f"parallel.tp: {layout.tp} needs the tensor-parallel engine (llmkern.parallel."
                   f"apply_tensor_parallel), which this build of llmkern does not have; use tp: 1")
    elif layout.tp > 1:
        # Wired at merge: apply_tensor_parallel(model, mesh["tp"]) before the data-parallel wrapper,
        # or llmkern.parallel.parallelize(model, ParallelConfig(dp=, tp=, pp=, zero_stage=)).
        out.append(f"parallel.tp: {layout.tp}: llmkern.parallel.apply_tensor_parallel exists but llmkern train does "
                   f"not route it yet (llmkern/train/layout.py parallelize)")
    return out


@dataclasses.dataclass(slots=True)
class Layout:
    """A model laid out over the ranks (made by `parallelize`)."""

    kind: str
    """"single", "ddp" or "pipeline"."""
    model: nn.Module
    """The original model (under a pipeline: the other stages' layers on the meta device)."""
    forward: nn.Module | None
    """What a training forward calls (the DDP wrapper or the model); None under a pipeline."""
    pipe: lpar.Pipeline | None
    """The pipeline (pp > 1)."""
    ddp: list
    """The DistributedDataParallel wrappers (one, or one per pipeline stage)."""
    data_rank: int
    """Index of this rank's data-parallel replica: ranks of one replica read the same batches."""
    data_world: int
    """Data-parallel replicas."""
    optimizer: torch.optim.Optimizer
    """The optimizer over this rank's trainable parameters (an engine that shards the optimizer
    state, ZeRO, builds its own: that is why the layout makes it)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's trainable parameters."""
        src = self.pipe.parameters() if self.pipe is not None else self.model.parameters()
        return [p for p in src if p.requires_grad]

    def bytes_sent(self) -> int:
        """Bytes this rank sent for gradients (DDP) and activations (pipeline) so far."""
        return sum(d.stats.bytes_sent for d in self.ddp)

    def close(self) -> None:
        for d in self.ddp:
            d.close()


def parallelize(model: nn.Module, layout, *, optimizer_class: type, optimizer_kwargs: dict,
                loss_fn: Callable | None = None) -> Layout:
    """Applies `layout` (a ParallelLayout, already checked) to `model` on this rank and builds
    `optimizer_class(this rank's trainable parameters, **optimizer_kwargs)`. Call on every rank with
    the same model. Gradients are reduced in fp32 whatever the parameters' dtype."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world != layout.nproc:
        raise ValueError(f"parallel.nproc is {layout.nproc} but this job has {world} processes")
    missing = missing_engines(layout)
    if missing:
        raise ValueError(missing[0])
    ddp_config = lpar.DDPConfig(reduce_dtype=torch.float32, timeout_s=layout.timeout_s)

    def optimizer_of(params) -> torch.optim.Optimizer:
        return optimizer_class([p for p in params if p.requires_grad], **optimizer_kwargs)

    # ZeRO goes here when it is routed: model, optimizer = lpar.apply_zero(model, ZeroConfig(stage=
    # layout.zero_stage, offload_optimizer=layout.offload, ...), optimizer_class=optimizer_class,
    # mesh=<the dp group>, **optimizer_kwargs), as the data-parallel wrapper instead of DDP (and as
    # apply_pipeline's data_parallel= callable under pp); TP before it (apply_tensor_parallel on
    # mesh["tp"]). The checkpoint then takes the sharded optimizer state from the engine (runner.py
    # Run._state keys full-size states by parameter name).
    if layout.pp > 1:
        mesh = lpar.init_mesh(lpar.ParallelConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp))
        cfg = lpar.PipelineConfig(stages=layout.pp, microbatches=layout.microbatches, schedule=layout.schedule,
                                  timeout_s=layout.timeout_s, verbose=False)
        pipe = lpar.apply_pipeline(model, cfg, mesh=mesh, loss_fn=loss_fn, data_parallel=ddp_config)
        wrappers = [m for m in pipe.stage_modules.values() if isinstance(m, lpar.DistributedDataParallel)]
        coords = lpar.ParallelDims.from_config(lpar.ParallelConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp),
                                               world).coordinates(rank)
        return Layout(kind="pipeline", model=model, forward=None, pipe=pipe, ddp=wrappers,
                      data_rank=coords["dp"], data_world=layout.dp, optimizer=optimizer_of(pipe.parameters()))
    if layout.dp > 1:
        ddp = lpar.DistributedDataParallel(model, ddp_config)
        return Layout(kind="ddp", model=model, forward=ddp, pipe=None, ddp=[ddp], data_rank=rank, data_world=world,
                      optimizer=optimizer_of(model.parameters()))
    return Layout(kind="single", model=model, forward=model, pipe=None, ddp=[], data_rank=0, data_world=1,
                  optimizer=optimizer_of(model.parameters()))
