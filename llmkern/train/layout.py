"""The one place `llmkern train` turns its `parallel` section into engines.

`missing_engines(layout)` says (before any process starts) which requested engine this tree lacks;
`parallelize(model, layout, ...)` applies the layout on every rank and returns a `Layout`: how to
run a training step's forward/backward, this rank's trainable parameters, the module a checkpoint
saves, and the traffic counters the summary reports.

    dp only          llmkern DistributedDataParallel over the world (fp32 gradient reduction)
    pp (x dp)        llmkern.parallel.apply_pipeline over the ("pp", "dp", "tp") mesh, each stage
                     wrapped in llmkern DDP over "dp"
    tp (x dp x pp)   llmkern.parallel.parallelize (TP inside, DDP over "dp", the pipeline outside)
    zero_stage 1-3   llmkern.parallel.apply_zero over the world (dp only), offload: ZeRO-Offload;
                     the optimizer is the engine's ZeroOptimizer (sharded state)

ZeRO with tp or pp: llmkern.parallel.parallelize composes them, but this runner's evaluation and
checkpoint paths do not take such a run yet (its checkpoint is llmkern.parallel.tensor_parallel.
checkpoint's); missing_engines refuses it before launch, naming why.
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
    if layout.zero_stage > 0 and (layout.tp > 1 or layout.pp > 1):
        try:  # parallelize's own refusals (e.g. ZeRO under interleaved_1f1b) are the more specific reason
            lpar.check_degrees(lpar.ParallelizeConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp,
                                                      zero_stage=layout.zero_stage), layout.nproc)
        except NotImplementedError as e:
            out.append(f"parallel.zero_stage: {layout.zero_stage} with tp={layout.tp}, pp={layout.pp}: {e}")
        else:
            out.append(f"parallel.zero_stage: {layout.zero_stage} with tp={layout.tp}, pp={layout.pp}: llmkern "
                       f"train routes ZeRO with dp only (llmkern/train/layout.py parallelize)")
    return out


@dataclasses.dataclass(slots=True)
class Layout:
    """A model laid out over the ranks (made by `parallelize`)."""

    kind: str
    """"single", "ddp", "pipeline", "tp" (parallelize without a pipeline) or "zero"."""
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

    zero: lpar.ZeroModel | None = None
    """The ZeRO engine (kind "zero"): checkpoints and memory come from it."""
    tp_rank: int = 0
    """This rank's tensor-parallel coordinate (its slices of the TP layers)."""
    collective_eval: bool = False
    """Evaluating the model is a collective (its TP layers): every rank runs it. (ZeRO-3 gathers a
    whole copy onto rank 0 instead.)"""
    sent0: int = 0
    """llmkern's collective counter (bytes sent) when the layout was made."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's trainable parameters."""
        src = self.pipe.parameters() if self.pipe is not None else self.model.parameters()
        return [p for p in src if p.requires_grad]

    def bytes_sent(self) -> int:
        """Bytes this rank sent for gradients (DDP) and activations (pipeline) so far."""
        if self.kind in ("zero", "tp"):  # ZeRO's and TP's collectives go through llmkern's counter
            return lpar.COUNTER.get().bytes_sent - self.sent0
        return sum(d.stats.bytes_sent for d in self.ddp)

    def close(self) -> None:
        for d in self.ddp:
            d.close()
        if self.zero is not None:
            self.zero.close()


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

    if layout.zero_stage > 0:  # dp only (missing_engines refuses it with tp or pp)
        zcfg = lpar.ZeroConfig(stage=layout.zero_stage, offload_optimizer=layout.offload, reduce_dtype=torch.float32,
                               timeout_s=layout.timeout_s)
        sent0 = lpar.COUNTER.get().bytes_sent
        zmodel, zopt = lpar.apply_zero(model, zcfg, optimizer_class, **optimizer_kwargs)
        return Layout(kind="zero", model=model, forward=zmodel, pipe=None, ddp=[], data_rank=rank, data_world=world,
                      optimizer=zopt, zero=zmodel, sent0=sent0)
    if layout.tp > 1:
        # The logits are gathered (loss_parallel=False) so the runner's loss and evaluation read whole
        # logits; the vocab-parallel loss would save a (B, T, V) gather the tiny demo models do not need.
        sent0 = lpar.COUNTER.get().bytes_sent
        run = lpar.parallelize(model, lpar.ParallelizeConfig(
            dp=layout.dp, tp=layout.tp, pp=layout.pp, loss_parallel=False, microbatches=layout.microbatches,
            schedule=layout.schedule, ddp=ddp_config, timeout_s=layout.timeout_s))
        wrappers = [run.module] if isinstance(run.module, lpar.DistributedDataParallel) else []
        if run.pipeline is not None:
            wrappers = [m for m in run.pipeline.stage_modules.values() if isinstance(m, lpar.DistributedDataParallel)]
        return Layout(kind="pipeline" if run.pipeline is not None else "tp", model=model, forward=run.module,
                      pipe=run.pipeline, ddp=wrappers, data_rank=run.coordinates["dp"], data_world=run.dims.dp,
                      optimizer=optimizer_of(run.parameters()), tp_rank=run.coordinates["tp"],
                      collective_eval=True, sent0=sent0)
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
