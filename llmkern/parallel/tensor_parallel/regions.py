"""The conjugate autograd collectives of tensor parallelism (Megatron's "mappings").

A tensor-parallel region is the stretch of a layer where each rank of the tp group computes a
different slice (its heads, its MLP columns, its vocabulary rows). Tensors cross the region's
border through these functions, each the autograd conjugate of the other:

    copy_to_region(x)          fwd: identity                  bwd: all-reduce (sum of partial grads)
    reduce_from_region(x)      fwd: all-reduce (sum)           bwd: identity
    gather_from_region(x, d)   fwd: all-gather along dim d     bwd: this rank's chunk of the grad
    scatter_to_region(x, d)    fwd: this rank's chunk          bwd: all-gather along dim d

With sequence parallelism the activations between regions are split along the sequence dimension
(dim 1 of HF's (B, T, C)), and the all-reduces become reduce-scatter/all-gather pairs of the same
bytes:

    gather_from_sequence(x)         fwd: all-gather along T    bwd: reduce-scatter along T (the
                                                                consumer is a tp region: partial
                                                                grads), or this rank's chunk when
                                                                the consumer is replicated
    reduce_scatter_to_sequence(x)   fwd: reduce-scatter along T  bwd: all-gather along T
    scatter_to_region(x, 1)         fwd: this rank's chunk of T  bwd: all-gather along T

Every collective goes through llmkern.parallel.collectives, so it has the group's timeout (a dead or
stalled rank raises CollectiveError on every rank instead of hanging), is counted in the collective
counter under the group's label ("tp" on a mesh) and kind, and optionally checks its layout across
the ranks first (`TPComm.check`). Rank r owns chunk r along the split dimension, as in
torch.distributed's reduce_scatter_tensor and DTensor's Shard(dim).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.distributed as dist

from llmkern.parallel import collectives, groups

__all__ = ["DEFAULT_COMM", "TPComm", "copy_to_region", "reduce_from_region", "gather_from_region", "scatter_to_region",
           "gather_from_sequence", "reduce_scatter_to_sequence"]


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class TPComm:
    """How the tensor-parallel layers communicate."""

    backend: collectives.Backend = "torch"
    """"torch": torch.distributed's collectives (gloo on CPU, NCCL on CUDA). "ring": llmkern's ring
    (llmkern.parallel.ring over gloo, the NCCL ring of csrc/comm on CUDA). TP moves activations of
    0.1-10 MiB per call, where latency dominates: bench/parallel/bench_tensor_parallel.py measures both."""

    check: bool = True
    """Exchange each call's layout (collective, dtype, element count) before moving data, so ranks
    fed different shapes raise a ValueError naming them instead of gloo aborting the process. One
    small message per peer per call. apply_tensor_parallel checks the first collective of each
    forward (the embedding's, or the first region entry) and no other: every later shape follows
    from it."""

    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    """Seconds a collective waits for a peer before it raises CollectiveError on every rank."""

    accumulate_dtype: torch.dtype | None = None
    """Reduce fp16/bf16 partial sums in this wider dtype (e.g. torch.float32); None reduces in the
    activation's dtype, as Megatron and DTensor do."""

    def __post_init__(self):
        if self.backend not in collectives.BACKENDS:
            raise ValueError(f"TPComm.backend must be one of {collectives.BACKENDS}, got {self.backend!r}")
        if not isinstance(self.check, bool):
            raise TypeError(f"TPComm.check must be a bool, got {self.check!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"TPComm.timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")


DEFAULT_COMM = TPComm()
"""The settings every layer and collective uses unless given others (frozen, so one shared instance)."""


def _kw(comm: TPComm) -> dict:
    return {"backend": comm.backend, "check": comm.check, "timeout": comm.timeout_s}


def _all_reduce(x: torch.Tensor, pg: dist.ProcessGroup, comm: TPComm) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)  # out of place: autograd may hold x
    if dist.get_world_size(pg) > 1:
        collectives.all_reduce_(out, pg, accumulate_dtype=comm.accumulate_dtype, **_kw(comm))
    return out


def _split_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0


def _all_gather(x: torch.Tensor, dim: int, pg: dist.ProcessGroup, comm: TPComm) -> torch.Tensor:
    """(..., n, ...) on each rank -> (..., world*n, ...), rank r's block at [r*n, (r+1)*n) along dim."""
    world = dist.get_world_size(pg)
    if world == 1:
        return x.clone()
    dim = _split_dim(dim, x.dim())
    flat = collectives.all_gather(x.contiguous().view(-1), group=pg, **_kw(comm))
    blocks = flat.view(world, *x.shape)  # rank-major
    if dim == 0:
        return blocks.view(world * x.shape[0], *x.shape[1:])
    shape = list(x.shape)
    shape[dim] *= world
    return blocks.movedim(0, dim).reshape(shape)


def _reduce_scatter(x: torch.Tensor, dim: int, pg: dist.ProcessGroup, comm: TPComm) -> torch.Tensor:
    """(..., world*n, ...) on each rank -> this rank's (..., n, ...) block of the sum over ranks."""
    world = dist.get_world_size(pg)
    dim = _split_dim(dim, x.dim())
    n = _chunk_len(x, dim, world, "reduce-scatter")
    if world == 1:
        return x.clone()
    shape = list(x.shape)
    shape[dim:dim + 1] = [world, n]
    blocks = x.reshape(shape).movedim(dim, 0).contiguous()  # rank-major: block r is what rank r keeps
    out = collectives.reduce_scatter(blocks.view(-1), group=pg, accumulate_dtype=comm.accumulate_dtype,
                                     **_kw(comm))
    local = list(x.shape)
    local[dim] = n
    return out.view(local)


def _chunk_len(x: torch.Tensor, dim: int, world: int, what: str) -> int:
    size = x.shape[dim]
    if size % world:
        raise ValueError(f"tensor parallel {what}: dimension {dim} of shape {tuple(x.shape)} has size {size}, "
                         f"which the tp degree {world} does not divide (with sequence parallelism the sequence "
                         f"length T must be a multiple of tp)")
    return size // world


def _chunk(x: torch.Tensor, dim: int, pg: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(pg)
    dim = _split_dim(dim, x.dim())
    n = _chunk_len(x, dim, world, "split")
    return x.narrow(dim, dist.get_rank(pg) * n, n).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, comm):
        ctx.pg, ctx.comm = pg, comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.pg, ctx.comm), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pg, comm):
        return _all_reduce(x, pg, comm)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along dim; backward keeps this rank's chunk (the consumer is replicated)."""

    @staticmethod
    def forward(ctx, x, dim, pg, comm):
        ctx.dim, ctx.pg = dim, pg
        return _all_gather(x, dim, pg, comm)

    @staticmethod
    def backward(ctx, g):
        return _chunk(g, ctx.dim, ctx.pg), None, None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, comm):
        ctx.dim, ctx.pg, ctx.comm = dim, pg, comm
        return _chunk(x, dim, pg)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g.contiguous(), ctx.dim, ctx.pg, ctx.comm), None, None, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather along dim; backward reduce-scatters (the consumer computes per-rank partials)."""

    @staticmethod
    def forward(ctx, x, dim, pg, comm):
        ctx.dim, ctx.pg, ctx.comm = dim, pg, comm
        return _all_gather(x, dim, pg, comm)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.pg, ctx.comm), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, pg, comm):
        ctx.dim, ctx.pg, ctx.comm = dim, pg, comm
        return _reduce_scatter(x, dim, pg, comm)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g.contiguous(), ctx.dim, ctx.pg, ctx.comm), None, None, None


def copy_to_region(x: torch.Tensor, group, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """x enters a tp region: identity forward; backward all-reduces (sums) the ranks' partial grads.
    Also for a replicated parameter used inside a region (a LoRA factor, a sequence-parallel norm
    weight), whose grad each rank computes only in part."""
    return _CopyToRegion.apply(x, groups.resolve(group), comm)


def reduce_from_region(x: torch.Tensor, group, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """x leaves a tp region as the sum of the ranks' partial results (all-reduce); backward: identity."""
    return _ReduceFromRegion.apply(x, groups.resolve(group), comm)


def gather_from_region(x: torch.Tensor, group, dim: int = -1, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """The ranks' slices of x concatenated along dim (all-gather); backward keeps this rank's slice."""
    return _GatherFromRegion.apply(x, dim, groups.resolve(group), comm)


def scatter_to_region(x: torch.Tensor, group, dim: int = -1, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """This rank's chunk of a replicated x along dim (no communication); backward all-gathers."""
    return _ScatterToRegion.apply(x, dim, groups.resolve(group), comm)


def gather_from_sequence(x: torch.Tensor, group, dim: int = 1, comm: TPComm = DEFAULT_COMM, *,
                         grad: Literal["reduce_scatter", "split"] = "reduce_scatter") -> torch.Tensor:
    """Sequence shards of x all-gathered along dim. Backward: "reduce_scatter" when the result feeds a
    tp region (each rank's grad is a partial sum), "split" when it feeds replicated code."""
    if grad == "split":
        return _GatherFromRegion.apply(x, dim, groups.resolve(group), comm)
    if grad != "reduce_scatter":
        raise ValueError(f"gather_from_sequence: grad must be 'reduce_scatter' or 'split', got {grad!r}")
    return _GatherFromSequence.apply(x, dim, groups.resolve(group), comm)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = 1, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """The sum of the ranks' partial x, this rank keeping its chunk along dim; backward all-gathers."""
    return _ReduceScatterToSequence.apply(x, dim, groups.resolve(group), comm)
