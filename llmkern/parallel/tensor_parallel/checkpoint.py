"""Checkpoints of a composed run (tensor parallelism x ZeRO over dp, a pipeline outside) in
llmkern.parallel.checkpoint's format, so a run saved at one (tp, pp, dp) layout resumes at another,
and `llmkern checkpoint consolidate` writes its dense weights as one safetensors file.

    run = parallelize(model, ParallelizeConfig(tp=2, zero_stage=2))
    opt = run.optimizer(FusedAdamW, lr=1e-4)
    save_checkpoint("ckpt/step100", run, opt, step=100)        # every rank calls it
    ...
    run = parallelize(model, ParallelizeConfig(zero_stage=2))   # dp = 4, tp = 1
    opt = run.optimizer(FusedAdamW, lr=1e-4)
    extra = load_checkpoint("ckpt/step100", run, opt)

The keys are llmkern.parallel.checkpoint's: "model.<name>" and "optim.<name>.<state>" hold each
parameter flattened to 1-D in its *dense* shape (tp padding dropped), "optim.step", "meta" and
"extra.<key>". A rank's ZeRO shard of a flat bucket covers a contiguous range of its tp slice of a
parameter; that range maps to dense flat indices through the slice's ShardLayout, in runs (one run
for a row split with one part; one per row for a split of dim 1; padding skipped). Each run is one
chunk of a 1-D ShardedTensor over the default group, its local data a view into the engine's
buffers, so loading writes straight into them and DCP's planner reads, for every chunk, whatever
chunks of any earlier layout overlap it.

Who writes what: every dense element has one writer. A tp slice is written by each of its dp owners
(the dp ranks partition the flat); a parameter replicated over tp (a norm weight, a row-parallel
bias) by the ranks of tp coordinate 0 alone. (The tp replicas' chunks of such a parameter have the
same offsets, which DCP's save planner would also deduplicate: a save where every rank writes them
produced the same checkpoint in the test; the rule keeps the plan free of duplicates by construction.) Loading, every
rank reads all of its chunks. The chunk list a ShardedTensor is built with is this rank's chunks
plus the gaps between them (placed on another rank); DCP's planners read only the local chunks, and
the list only has to satisfy ShardedTensor's own check (no overlap, the whole tensor covered).

Under a pipeline (gpipe or 1f1b, one stage per rank) each rank saves and loads its stage's
parameters under their names in the original model, so the stage count may change too.

Frozen parameters that stages 1 and 2 leave outside the flat buckets are saved whole when
replicated (every rank the same tensor: DCP writes it once) and as runs of their tp slice, written
by dp coordinate 0, when split. Module buffers are saved whole.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from llmkern.parallel.checkpoint import flats_with_state, read_state, state_meta, write_state
from llmkern.parallel.tensor_parallel.layout import TP_LAYOUT, ShardLayout

__all__ = ["dense_runs", "load_checkpoint", "save_checkpoint"]


def dense_runs(layout: ShardLayout | None, local_shape, lo: int, n: int) -> list[tuple[int, int, int]]:
    """The local flat range [lo, lo + n) of a tp slice of shape `local_shape` (its ShardLayout
    `layout`; None: not split) as runs (dense flat offset, offset within the range, length) of
    consecutive dense flat indices, padding left out."""
    if n == 0:
        return []
    if layout is None:
        return [(lo, 0, n)]
    shape = list(local_shape)
    d = layout.dim
    inner = math.prod(shape[d + 1:])
    dense_shape = shape.copy()
    dense_shape[d] = layout.size
    i = torch.arange(lo, lo + n, dtype=torch.int64)
    along = layout.dense_indices()[(i // inner) % shape[d]]
    g = ((i // (inner * shape[d])) * layout.size + along) * inner + i % inner
    g = g.masked_fill(along < 0, -1)
    keep = g >= 0
    # a run starts where an element is kept and is not the dense successor of a kept predecessor
    prev = torch.cat([torch.tensor([-2]), g[:-1]])
    prev_keep = torch.cat([torch.tensor([False]), keep[:-1]])
    starts = keep & ~(prev_keep & (g == prev + 1))
    s = torch.nonzero(starts).flatten().tolist()
    ends = torch.nonzero(keep & ~torch.cat([keep[1:] & (g[1:] == g[:-1] + 1), torch.tensor([False])])).flatten()
    return [(int(g[a]), a, int(b) - a + 1) for a, b in zip(s, ends.tolist())]


def _sharded(pieces: list[tuple[int, torch.Tensor]], numel: int, dtype: torch.dtype, device) -> ShardedTensor:
    """A 1-D ShardedTensor of `numel` elements over the default group whose local chunks are `pieces`
    ((dense offset, 1-D view)); the gaps between them are listed on another rank (see the module
    docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    other = (rank + 1) % world
    pieces = sorted(pieces, key=lambda p: p[0])
    metas, shards, at = [], [], 0
    for off, t in pieces:
        if off > at:
            metas.append(ShardMetadata(shard_offsets=[at], shard_sizes=[off - at], placement=f"rank:{other}/{device}"))
        m = ShardMetadata(shard_offsets=[off], shard_sizes=[t.numel()], placement=f"rank:{rank}/{device}")
        metas.append(m)
        shards.append(Shard(tensor=t, metadata=m))
        at = off + t.numel()
    if at < numel or not metas:
        metas.append(ShardMetadata(shard_offsets=[at], shard_sizes=[numel - at], placement=f"rank:{other}/{device}"))
    props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(shards_metadata=metas, size=torch.Size([numel]), tensor_properties=props))


def _engine(run):
    from llmkern.parallel.zero import Zero3Model, ZeroModel

    engine = run._engine()
    if not isinstance(engine, (ZeroModel, Zero3Model)):
        raise TypeError(f"tensor_parallel checkpoints need a parallelize run with zero_stage 1, 2 or 3 (its flat "
                        f"buckets are what is saved), got {type(engine).__name__}")
    return engine


def _named(run, engine):
    """(name in the original model, parameter) and (name, buffer) of this rank: a pipeline stage's
    modules name them differently, the checkpoint by the model's names (each rank writes its stages)."""
    if run.pipeline is None:
        return list(engine.module.named_parameters()), list(engine.module.named_buffers())
    return (list(run.pipeline.named_parameters()),
            [(n, b) for n, b in run.pipeline.model.named_buffers() if b.device.type != "meta"])


def _dense_shape(p: torch.Tensor) -> list[int]:
    layout = getattr(p, TP_LAYOUT, None)
    shape = list(p.shape)
    if layout is not None:
        shape[layout.dim] = layout.size
    return shape


def _state(run, optimizer, saving: bool) -> tuple[dict, dict]:
    """The DCP state dict of (run, optimizer) aliasing the engine's buffers, and the meta."""
    engine = _engine(run)
    tp0 = run.coordinates["tp"] == 0
    dp0 = run.coordinates["dp"] == 0
    sd: dict = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    params, bufs = _named(run, engine)
    model_name = {id(p): n for n, p in params}
    flats = engine.checkpoint_flats()
    for flat, opt_tensors in flats_with_state(flats, optimizer):
        sources = {"model": flat["shard"], **opt_tensors}
        lo_r, k = engine.rank * flat["k"], flat["k"]
        for i, (p, off) in enumerate(zip(flat["params"], flat["offsets"])):
            name = model_name[id(p)]
            local_shape = list(flat["shapes"][i])  # the tp slice's (stage 3 parameters are empty at rest)
            layout = getattr(p, TP_LAYOUT, None)
            dense = local_shape.copy()
            if layout is not None:
                dense[layout.dim] = layout.size
            shapes[name], dtypes[name] = dense, str(flat["shard"].dtype)
            lo, hi = max(off, lo_r), min(off + math.prod(local_shape), lo_r + k)
            runs = dense_runs(layout, local_shape, lo - off, hi - lo) if lo < hi else []
            writes = not saving or layout is not None or tp0
            for key, src in sources.items():
                pieces = [(g, src[lo - lo_r + a:lo - lo_r + a + n]) for g, a, n in runs] if writes else []
                full_key = f"model.{name}" if key == "model" else f"optim.{name}.{key}"
                sd[full_key] = _sharded(pieces, math.prod(dense), src.dtype, src.device)
    in_flats = {id(p) for flat in flats for p in flat["params"]}
    for name, p in params:
        if id(p) in in_flats:
            continue
        shapes[name], dtypes[name] = _dense_shape(p), str(p.dtype)
        layout = getattr(p, TP_LAYOUT, None)
        if layout is None:
            sd[f"model.{name}"] = p.data
        else:
            flat_p = p.data.reshape(-1)
            runs = dense_runs(layout, p.shape, 0, flat_p.numel()) if (dp0 or not saving) else []
            sd[f"model.{name}"] = _sharded([(g, flat_p[a:a + n]) for g, a, n in runs], math.prod(shapes[name]),
                                           p.dtype, p.device)
    for name, b in bufs:
        sd[f"buffer.{name}"] = b
    if optimizer is not None:
        sd["optim.step"] = optimizer.step_count
    return sd, state_meta(shapes, dtypes, optimizer)


def save_checkpoint(directory, run, optimizer=None, **extra) -> None:
    """Saves `run` (parallelize's result with zero_stage >= 1), its optimizer (run.optimizer(...)) and
    `extra` (objects with a state_dict(), or picklable values) to `directory` with DCP, in
    llmkern.parallel.checkpoint's format. A collective call over the default group."""
    engine = _engine(run)
    engine.wait_for_parameters()
    write_state(directory, *_state(run, optimizer, saving=True), extra)


def load_checkpoint(directory, run, optimizer=None, **extra) -> dict:
    """Loads a checkpoint of this save_checkpoint or llmkern.parallel.save_checkpoint, written at any
    (tp, dp) layout and ZeRO stage, into `run` and `optimizer`; `extra` names the keywords to restore
    (an object with load_state_dict() is loaded in place). Returns {key: the saved value} of `extra`.
    A collective call over the default group."""
    engine = _engine(run)
    engine.wait_for_parameters()
    out = read_state(directory, *_state(run, optimizer, saving=False), optimizer, extra, shapes="dense shapes")
    engine.after_load()
    return out
