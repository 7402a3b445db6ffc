"""The one place `llmkern train` turns its `parallel` section into engines.

`missing_engines(layout)` says (before any process starts) which requested composition llmkern.parallel
refuses; `parallelize(model, layout, ...)` applies the layout on every rank and returns a `Layout`:
how to run a training step's forward/backward, this rank's trainable parameters, the optimizer,
how to read whole parameters, and the traffic counters the summary reports.

    dp only          llmkern DistributedDataParallel over the world (fp32 gradient reduction)
    zero_stage 1-3   llmkern.parallel.apply_zero over the world (dp only), offload: ZeRO-Offload;
                     the optimizer is the engine's ZeroOptimizer (sharded state)
    tp or pp         llmkern.parallel.parallelize over the ("pp", "dp", "tp") mesh: TP inside, DDP or
                     ZeRO (stage 1-3, offload) over "dp", the pipeline outside; with ZeRO the optimizer
                     is the run's (run.optimizer) and checkpoints go through
                     llmkern.parallel.tensor_parallel.checkpoint (the DCP format of
                     llmkern.parallel.checkpoint, reshardable across tp, pp and dp)

What parallelize refuses (ZeRO under the interleaved_1f1b or zero_bubble schedules) missing_engines
reports before launch, with parallelize's own reason.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch import nn

import llmkern.parallel as lpar
from llmkern.parallel.zero import Zero3Model, ZeroModel


def missing_engines(layout) -> list[str]:
    """Errors, naming the field, for the compositions of `layout` that llmkern.parallel refuses."""
    out = []
    if layout.zero_stage > 0 and (layout.tp > 1 or layout.pp > 1):
        try:  # parallelize's own refusal is the reason (degrees are checked against nproc elsewhere)
            lpar.check_degrees(lpar.ParallelizeConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp,
                                                      zero_stage=layout.zero_stage, schedule=layout.schedule),
                               layout.nproc)
        except NotImplementedError as e:
            out.append(f"parallel.zero_stage: {layout.zero_stage} with tp={layout.tp}, pp={layout.pp}, schedule="
                       f"{layout.schedule}: {e}")
        except ValueError:
            pass
    return out


@dataclasses.dataclass(slots=True)
class Layout:
    """A model laid out over the ranks (made by `parallelize`)."""

    kind: str
    """"single", "ddp", "zero" (apply_zero over the world) or "composed" (llmkern.parallel.parallelize:
    tp and/or pp, DDP or ZeRO over dp)."""
    model: nn.Module
    """The original model (under a pipeline: the other stages' layers on the meta device; under tp: this
    rank's slices)."""
    forward: nn.Module | None
    """What a training forward calls (the DDP or ZeRO wrapper, or the model); None under a pipeline."""
    pipe: lpar.Pipeline | None
    """The pipeline (pp > 1)."""
    ddp: list
    """The DistributedDataParallel wrappers (one, or one per pipeline stage), closed by close()."""
    data_rank: int
    """Index of this rank's data-parallel replica: ranks of one replica read the same batches."""
    data_world: int
    """Data-parallel replicas."""
    optimizer: torch.optim.Optimizer
    """The optimizer over this rank's trainable parameters (an engine that shards the optimizer
    state, ZeRO, builds its own: that is why the layout makes it)."""

    zero: ZeroModel | Zero3Model | None = None
    """This rank's ZeRO engine (under a pipeline: its stage's): checkpoints and memory come from it."""
    run: lpar.Parallelized | None = None
    """parallelize's run (kind "composed")."""
    tp_rank: int = 0
    """This rank's tensor-parallel coordinate (its slices of the TP layers)."""
    sent0: int = 0
    """llmkern's collective counter (bytes sent) when the layout was made."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters (its stages', its tp slices), named as in the original model."""
        return list(self.pipe.named_parameters() if self.pipe is not None else self.model.named_parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's trainable parameters."""
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def whole_parameters(self):
        """A context in which this rank's parameters hold their values (ZeRO-3 gathers its units, stages 1
        and 2 wait for the last step's all-gather): a collective over dp under ZeRO-3."""
        if self.run is not None:
            return self.run.whole_parameters()
        if self.zero is not None:
            return self.zero.gather_parameters()
        return contextlib.nullcontext()

    def bytes_sent(self) -> int:
        """Bytes this rank sent so far: gradients (DDP, ZeRO), parameters (ZeRO), activations (pipeline,
        TP)."""
        if self.kind in ("zero", "composed"):  # every engine of these goes through llmkern's counter
            return lpar.COUNTER.get().bytes_sent - self.sent0
        return sum(d.stats.bytes_sent for d in self.ddp)

    def close(self) -> None:
        for d in self.ddp:
            d.close()
        if self.zero is not None:
            self.zero.close()


def parallelize(model: nn.Module, layout, *, optimizer_class: type, optimizer_kwargs: dict) -> Layout:
    """Applies `layout` (a ParallelLayout, already checked) to `model` on this rank and builds the
    optimizer (`optimizer_class(this rank's trainable parameters, **optimizer_kwargs)`, or ZeRO's
    over its shards). Call on every rank with the same model. Gradients are reduced in fp32 whatever
    the parameters' dtype."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world != layout.nproc:
        raise ValueError(f"parallel.nproc is {layout.nproc} but this job has {world} processes")
    missing = missing_engines(layout)
    if missing:
        raise ValueError(missing[0])
    ddp_config = lpar.DDPConfig(reduce_dtype=torch.float32, timeout_s=layout.timeout_s)
    zero_config = lpar.ZeroConfig(stage=layout.zero_stage, offload_optimizer=layout.offload,
                                  reduce_dtype=torch.float32, timeout_s=layout.timeout_s) if layout.zero_stage else None

    def optimizer_of(params) -> torch.optim.Optimizer:
        return optimizer_class([p for p in params if p.requires_grad], **optimizer_kwargs)

    sent0 = lpar.COUNTER.get().bytes_sent
    if layout.tp > 1 or layout.pp > 1:
        # The logits are gathered (loss_parallel=False) so the runner's loss reads whole logits; the
        # vocab-parallel loss would save a (B, T, V) gather the tiny demo models do not need.
        run = lpar.parallelize(model, lpar.ParallelizeConfig(
            dp=layout.dp, tp=layout.tp, pp=layout.pp, zero_stage=layout.zero_stage,
            zero=zero_config, loss_parallel=False,
            microbatches=layout.microbatches, schedule=layout.schedule, ddp=ddp_config, timeout_s=layout.timeout_s))
        engine = run._engine()
        zero = engine if isinstance(engine, (ZeroModel, Zero3Model)) else None
        optimizer = run.optimizer(optimizer_class, **optimizer_kwargs) if zero is not None else \
            optimizer_of(run.parameters())
        stage_modules = run.pipeline.stage_modules.values() if run.pipeline is not None else [run.module]
        wrappers = [m for m in stage_modules if isinstance(m, lpar.DistributedDataParallel)]
        return Layout(kind="composed", model=model, forward=run.module, pipe=run.pipeline, ddp=wrappers,
                      data_rank=run.coordinates["dp"], data_world=run.dims.dp, optimizer=optimizer, zero=zero,
                      run=run, tp_rank=run.coordinates["tp"], sent0=sent0)
    if layout.zero_stage > 0:
        zmodel, zopt = lpar.apply_zero(model, zero_config, optimizer_class, **optimizer_kwargs)
        return Layout(kind="zero", model=model, forward=zmodel, pipe=None, ddp=[], data_rank=rank, data_world=world,
                      optimizer=zopt, zero=zmodel, sent0=sent0)
    if layout.dp > 1:
        ddp = lpar.DistributedDataParallel(model, ddp_config)
        return Layout(kind="ddp", model=model, forward=ddp, pipe=None, ddp=[ddp], data_rank=rank, data_world=world,
                      optimizer=optimizer_of(model.parameters()))
    return Layout(kind="single", model=model, forward=model, pipe=None, ddp=[], data_rank=0, data_world=1,
                  optimizer=optimizer_of(model.parameters()))
