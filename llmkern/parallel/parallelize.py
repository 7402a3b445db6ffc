"""parallelize: the one ordered composition of the engines over a ("pp", "dp", "tp") mesh.

    run = parallelize(model, ParallelizeConfig(tp=2, pp=2, microbatches=4))   # dp = world / 4
    opt = FusedAdamW(run.parameters(), lr=1e-4)
    for batch in loader:                       # the same global batch on every rank
        ids = run.local_batch(batch)           # this data-parallel replica's rows
        loss = run.train_step(ids, ids)        # forward + backward, loss averaged over dp
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()

With ZeRO over dp (zero_stage 1, 2 or 3) the optimizer is the engine's, built by the run:

    run = parallelize(model, ParallelizeConfig(tp=2, zero_stage=2))   # dp = world / 2
    opt = run.optimizer(FusedAdamW, lr=1e-4)  # ZeRO: steps this rank's dp shard of its tp slices
    tensor_parallel.checkpoint.save_checkpoint("ckpt", run, opt)      # loadable at another tp / dp

Order, inside out (torchtitan's): tensor parallelism first (apply_tensor_parallel on the whole
model: every rank keeps its tp slices of every layer), then activation checkpointing (each decoder
layer recomputed in backward, its TP collectives with it), then data parallelism over "dp": DDP
(zero_stage 0) or llmkern.parallel.zero's engine, which flattens and partitions the tp slices this
rank holds across its dp peers (they hold the same slices). The pipeline is outside them: with
pp > 1, apply_pipeline cuts the tp-converted model into stages, checkpoints layers with
rematerialize="layer" and wraps each stage in DDP or the ZeRO engine over "dp" (ZeRO: gpipe and
1f1b, one stage per rank, untied embeddings); its loss is the vocab-parallel one when the logits
stay split.

Gradient norms: tp slices carry the tp group in their SHARDED_OVER mark, the pipeline adds the pp
group to every parameter's mark, and DDP leaves gradients replicated over dp, so FusedAdamW's
global norm counts every element of the model once. Under ZeRO each gradient shard of a flat bucket
is cut back into its parameters' pieces, each reduced over dp and its parameter's own marks
(_ComposedZeroOptimizer), so a tp slice sums over dp x tp and a norm weight (replicated over tp)
over dp only.

Every check that can fail runs before anything is built (check_degrees: a pure function of the
config, the world size and the model), so a bad layout raises the same error on every rank and
leaves the model unchanged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from llmkern.optim import FusedAdamW
from llmkern.optim.step_scalars import sharded_over
from llmkern.parallel import collectives
from llmkern.parallel.ddp import DDPConfig, DistributedDataParallel
from llmkern.parallel.mesh import ParallelConfig, ParallelDims, init_mesh
from llmkern.parallel.zero import Zero3Model, ZeroConfig, ZeroModel, ZeroOptimizer
from llmkern.parallel.pipeline.runtime import CausalLMLoss
from llmkern.parallel.tensor_parallel import TensorParallelReport, TPComm, apply_tensor_parallel
from llmkern.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

__all__ = ["Parallelized", "ParallelizeConfig", "check_degrees", "parallelize"]

@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelizeConfig:
    """The degrees of a run and how each engine is set up."""

    dp: int = -1
    """Data-parallel replicas; -1: the world size divided by tp * pp."""
    tp: int = 1
    """Tensor-parallel ranks splitting each weight matrix (adjacent ranks of the mesh)."""
    pp: int = 1
    """Pipeline stages (the outermost mesh dimension)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """0: DDP over dp (gradients all-reduced in buckets during backward). 1-3: ZeRO over dp
    (llmkern.parallel.zero): optimizer states (1), gradients (2) and parameters (3) partitioned across
    the dp ranks; the optimizer is then run.optimizer(...). With pp > 1: the gpipe and 1f1b schedules
    and untied embeddings only (check_degrees says why)."""
    zero: ZeroConfig | None = None
    """Buckets, offload, prefetch, communication and timeouts of ZeRO; None: ZeroConfig(stage=zero_stage).
    Given, its stage must equal zero_stage."""
    sequence_parallel: bool = False
    """Split activations between tp regions along the sequence (apply_tensor_parallel); pp == 1 only."""
    loss_parallel: bool = True
    """Keep the logits split over the vocabulary and use the vocab-parallel cross-entropy."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward instead of storing its activations."""
    microbatches: int | None = None
    """Pipeline micro-batches per step (pp > 1); None: pp."""
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """The pipeline schedule (llmkern.parallel.PipelineConfig.schedule)."""
    ddp: DDPConfig = dataclasses.field(default_factory=DDPConfig)
    """Buckets, communication and timeouts of data parallelism (zero_stage 0)."""
    tp_comm: TPComm = dataclasses.field(default_factory=TPComm)
    """Backend, timeout and checks of the tensor-parallel collectives."""
    timeout_s: float = 120.0
    """Seconds a rank waits for a pipeline peer before raising."""


def _model_shape(model: nn.Module) -> dict[str, int]:
    """Decoder layers, attention heads and key/value heads of a transformers Llama or GPT-2 (those
    it has); empty for anything else."""
    cfg = getattr(model, "config", None)
    out = {}
    for key, names in (("layers", ("num_hidden_layers", "n_layer")), ("heads", ("num_attention_heads", "n_head")),
                       ("kv_heads", ("num_key_value_heads",))):
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int):
                out[key] = v
                break
    return out


def check_degrees(config: ParallelizeConfig, world_size: int, model: nn.Module | None = None) -> ParallelDims:
    """The checked degrees of `config` on `world_size` ranks for `model`, or a ValueError naming the
    numbers (dp * tp * pp against the world size, tp against the head counts, layers against the
    stages) or a NotImplementedError naming what is missing. Builds nothing, so it can run anywhere."""
    if not isinstance(config, ParallelizeConfig):
        raise TypeError(f"parallelize: config must be a ParallelizeConfig, got {type(config).__name__}")
    dims = ParallelDims.from_config(ParallelConfig(dp=config.dp, tp=config.tp, pp=config.pp), world_size)
    if config.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallelize: zero_stage must be 0, 1, 2 or 3, got {config.zero_stage!r}")
    if config.zero is not None and (not isinstance(config.zero, ZeroConfig) or config.zero.stage != config.zero_stage):
        raise ValueError(f"parallelize: zero must be None or a ZeroConfig whose stage equals zero_stage="
                         f"{config.zero_stage}, got {config.zero!r}")
    if config.zero_stage and dims.pp > 1:
        if config.schedule not in ("gpipe", "1f1b"):
            raise NotImplementedError(f"parallelize: zero_stage={config.zero_stage} with pp={dims.pp} runs the gpipe "
                                      f"and 1f1b schedules, not {config.schedule!r}: interleaved_1f1b puts several "
                                      f"stages (one ZeRO engine and optimizer each) on a rank, zero_bubble splits "
                                      f"the weight gradients out of the backward ZeRO reduces in")
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise NotImplementedError(f"parallelize: zero_stage={config.zero_stage} with pp={dims.pp} needs untied "
                                      f"embeddings: the pipeline exchanges a tied weight's gradient between the first "
                                      f"and last stage through .grad after backward, which ZeRO has already "
                                      f"reduce-scattered (tie_word_embeddings=True here)")
    if config.sequence_parallel and dims.pp > 1:
        raise NotImplementedError(f"parallelize: sequence_parallel with pp={dims.pp} is not supported: a middle "
                                  f"stage would receive T/tp tokens and build its causal mask for T/tp")
    if config.microbatches is not None and (not isinstance(config.microbatches, int) or config.microbatches < 1):
        raise ValueError(f"parallelize: microbatches must be a positive integer or None, got {config.microbatches!r}")
    shape = _model_shape(model) if model is not None else {}
    if dims.tp > 1:
        for key, what in (("heads", "attention heads"), ("kv_heads", "key/value heads")):
            if key in shape and shape[key] % dims.tp:
                raise ValueError(f"parallelize: tp={dims.tp} must divide the model's {shape[key]} {what} (heads are "
                                 f"split whole)")
    if dims.pp > 1 and "layers" in shape and shape["layers"] < dims.pp:
        raise ValueError(f"parallelize: pp={dims.pp} stages need at least {dims.pp} decoder layers, the model has "
                         f"{shape['layers']}")
    return dims


class _VocabParallelCausalLMSum(CausalLMLoss):
    """The pipeline's CausalLMLoss (sum over a micro-batch's predicted tokens; the pipeline divides by
    count() over the batch) on vocab-parallel logits."""

    def __init__(self, group, vocab_size: int, comm: TPComm, ignore_index: int = -100):
        super().__init__(ignore_index)
        self.group, self.vocab_size, self.comm = group, vocab_size, comm

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), self.group,
                                            vocab_size=self.vocab_size, ignore_index=self.ignore_index,
                                            reduction="sum", comm=self.comm)


@dataclasses.dataclass(kw_only=True, slots=True)
class Parallelized:
    """What parallelize returns: the run's parts and its train_step."""

    dims: ParallelDims
    """The checked degrees."""
    mesh: object
    """The ("pp", "dp", "tp") DeviceMesh."""
    module: nn.Module | None
    """pp == 1: the model to call (inside its DDP wrapper when dp > 1); None with a pipeline."""
    pipeline: object | None
    """pp > 1: this rank's llmkern.parallel.Pipeline; None otherwise."""
    tensor_parallel: TensorParallelReport | None
    """What apply_tensor_parallel split (tp > 1); None otherwise."""
    coordinates: dict[str, int]
    """This rank's {"pp", "dp", "tp"} coordinates."""

    def parameters(self):
        """This rank's parameters (its tp slices of its stages' layers), for the optimizer."""
        return (self.pipeline if self.pipeline is not None else self.module).parameters()

    def named_parameters(self):
        """This rank's parameters named as in the original model."""
        if self.pipeline is not None:
            return self.pipeline.named_parameters()
        m = self.module.module if isinstance(self.module, _DP_WRAPPERS) else self.module
        return m.named_parameters()

    def _engine(self):
        if self.pipeline is not None:
            (engine,) = self.pipeline.stage_modules.values() if len(self.pipeline.stage_modules) == 1 else (None,)
            return engine
        return self.module

    def whole_parameters(self):
        """A context in which this rank's parameters hold their values (its tp slices, whole over dp):
        ZeRO-3 gathers its units, stages 1 and 2 wait for the last step's all-gather; DDP needs nothing."""
        engine = self._engine()
        if isinstance(engine, (ZeroModel, Zero3Model)):
            return engine.gather_parameters()
        return contextlib.nullcontext()

    def optimizer(self, optimizer_class=FusedAdamW, **optimizer_kwargs) -> torch.optim.Optimizer:
        """The optimizer of this run: optimizer_class(self.parameters(), **optimizer_kwargs) without ZeRO;
        with ZeRO, a ZeroOptimizer stepping this rank's dp shard of the ZeRO engine's flat buckets with
        optimizer_class's update rule (one of llmkern.optim's fused optimizers), whose global gradient
        norm and overflow flag also reduce over tp (see the module docstring). Build it once."""
        engine = self._engine()  # with a pipeline under ZeRO: gpipe / 1f1b, one stage per rank
        if isinstance(engine, (ZeroModel, Zero3Model)):
            if getattr(engine, "_optimizer", None) is not None:
                raise RuntimeError("parallelize: run.optimizer() was called twice; the ZeRO engine steps with one "
                                   "optimizer (keep the first)")
            return _ComposedZeroOptimizer(engine, optimizer_class, **optimizer_kwargs)
        return optimizer_class(self.parameters(), **optimizer_kwargs)

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This data-parallel replica's rows of a global batch (every rank holds the same global batch;
        the tp and pp ranks of a replica take the same rows)."""
        rows, dp = batch.shape[0], self.dims.dp
        if rows % dp:
            raise ValueError(f"parallelize: the global batch has {rows} rows, which dp={dp} does not divide")
        per = rows // dp
        return batch[self.coordinates["dp"] * per:(self.coordinates["dp"] + 1) * per]

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this replica's batch (from local_batch); gradients land in .grad of
        this rank's parameters, reduced over dp. Returns the loss averaged over the dp replicas (a
        0-dim fp32 tensor, equal on every rank)."""
        if self.pipeline is not None:
            return self.pipeline.train_step(input_ids, labels)
        loss = self.module(input_ids=input_ids, labels=labels).loss
        loss.backward()
        loss = loss.detach().float().reshape(1).clone()
        if self.dims.dp > 1:
            collectives.all_reduce_(loss, self.mesh["dp"], op="avg", backend="torch", check=False)
        return loss[0]


def parallelize(model: nn.Module, config: ParallelizeConfig, *, device_type: str | None = None) -> Parallelized:
    """Composes tensor parallelism, activation checkpointing and data parallelism on `model` (a
    transformers Llama or GPT-2; every rank passes the same model with the same weights), with the
    pipeline outside them, over a new ("pp", "dp", "tp") mesh of the default group. See the module
    docstring."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize: torch.distributed is not initialized (launch with torchrun and call "
                           "torch.distributed.init_process_group first)")
    dims = check_degrees(config, dist.get_world_size(), model)
    mesh = init_mesh(ParallelConfig(dp=dims.dp, tp=dims.tp, pp=dims.pp), device_type=device_type)
    coords = dims.coordinates(dist.get_rank())
    report = None
    if dims.tp > 1:
        # 1. tensor parallelism on the whole model: with a pipeline, each stage then holds tp slices
        report = apply_tensor_parallel(model, mesh["tp"], sequence_parallel=config.sequence_parallel,
                                       loss_parallel=config.loss_parallel, comm=config.tp_comm)
    if dims.pp > 1:
        from llmkern.parallel.pipeline import PipelineConfig, apply_pipeline

        # 2.-3. inside the pipeline: layer checkpointing and DDP over dp per stage
        pcfg = PipelineConfig(stages=dims.pp, microbatches=config.microbatches or dims.pp, schedule=config.schedule,
                              rematerialize="layer" if config.activation_checkpointing else "none",
                              timeout_s=config.timeout_s, verbose=False)
        loss_fn = None
        if report is not None and config.loss_parallel:
            loss_fn = _VocabParallelCausalLMSum(mesh["tp"].get_group(), model.lm_head.layout.size, config.tp_comm)
        pipe = apply_pipeline(model, pcfg, mesh, loss_fn=loss_fn, data_parallel=_data_parallel(config))
        return Parallelized(dims=dims, mesh=mesh, module=None, pipeline=pipe, tensor_parallel=report,
                            coordinates=coords)
    if config.activation_checkpointing:
        # 2. activation checkpointing of every decoder layer; the layers' tp hooks run inside it
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(f"parallelize: activation_checkpointing needs a transformers model "
                            f"(gradient_checkpointing_enable), got {type(model).__name__}")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = model
    if dims.dp > 1 or config.zero_stage:
        # 3. data parallelism over dp (ZeRO even at dp = 1: its optimizer is the run's)
        module = _data_parallel(config)(model, mesh["dp"].get_group())
    return Parallelized(dims=dims, mesh=mesh, module=module, pipeline=None, tensor_parallel=report,
                        coordinates=coords)


def _data_parallel(config: ParallelizeConfig):
    """(module, dp group) -> the data-parallel wrapper with no_sync() (apply_pipeline takes the same
    callable): llmkern's DDP for zero_stage 0, else the ZeRO engine of that stage."""
    def wrap(module: nn.Module, group) -> nn.Module:
        if config.zero_stage:
            zcfg = config.zero if config.zero is not None else ZeroConfig(stage=config.zero_stage)
            return Zero3Model(module, zcfg, group) if zcfg.stage == 3 else ZeroModel(module, zcfg, group)
        return DistributedDataParallel(module, config.ddp, group)

    return wrap


_DP_WRAPPERS = (DistributedDataParallel, ZeroModel, Zero3Model)


class _ComposedZeroOptimizer(ZeroOptimizer):
    """ZeroOptimizer whose gradient items are cut at parameter boundaries: each parameter's piece of
    this rank's gradient shard is reduced over the dp group and the groups its parameter is marked
    sharded over (SHARDED_OVER: tp for tp slices). The plain ZeroOptimizer reduces whole shards over
    dp only, which counts a tp slice's squares on one tp rank alone. Every rank lists every trainable
    parameter (None where its shard holds none of it), so all ranks issue the same collectives."""

    def _items(self):
        e = self.engine
        items = []
        flats = [f for f in e.checkpoint_flats() if f["trainable"]]
        for flat, g in zip(flats, e.gradient_shards()):
            lo_r = e.rank * flat["k"]
            for p, shape, off in zip(flat["params"], flat["shapes"], flat["offsets"]):
                lo, hi = max(off, lo_r), min(off + math.prod(shape), lo_r + flat["k"])
                items.append((g[lo - lo_r:hi - lo_r] if lo < hi else None, (e.group, *sharded_over(p))))
        return items
