"""Megatron-style tensor-parallel layers over a tp process group.

    ColumnParallelLinear    W (C_out, C_in) split by output rows: rank r computes its C_out/tp outputs
    RowParallelLinear       W split by input columns: partial sums over C_in/tp, all-reduced
    VocabParallelEmbedding  the vocabulary split by rows: ids outside this rank's range look up 0,
                            the ranks' rows are summed

A column-parallel layer followed by a row-parallel one (attention: q/k/v then o; MLP: gate/up then
down) needs one collective forward (the row layer's all-reduce) and one backward (the column
layer's input-grad all-reduce), 2 + 2 per transformer layer. Several column layers that read the
same input (q, k, v) share one region entry: build them with input_is_parallel=True and call
regions.copy_to_region (or gather_from_sequence) once before them, as apply_tensor_parallel does.

sequence_parallel=True: the activations outside the regions are split along the sequence (dim 1
of (B, T, C)); the column layer's entry all-gathers them (backward: reduce-scatter) and the row
layer's exit reduce-scatters (backward: all-gather): the same bytes as the all-reduces, and the
norms and dropouts between regions work on T/tp tokens.

Every parameter split over tp carries its ShardLayout (attribute TP_LAYOUT) and is marked sharded
over the tp group (llmkern.optim's SHARDED_OVER), so a global gradient norm adds its square once per
rank; replicated parameters (row-parallel bias, norms) are not marked and count once. Sizes tp does
not divide are padded (see layout.py). Parameters are sliced from a dense module built with the
same initialization (`from_linear`, `from_embedding`, or the constructors, which build the dense
module on `device` first: use device="meta" and load weights afterwards for models that do not fit).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkern.parallel import groups
from llmkern.parallel.mesh import mark_sharded
from llmkern.parallel.tensor_parallel import regions
from llmkern.parallel.tensor_parallel.layout import TP_LAYOUT, ShardLayout
from llmkern.parallel.tensor_parallel.regions import DEFAULT_COMM, TPComm

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "gather_full", "shard_parameter",
           "tp_group_info"]


def tp_group_info(group) -> tuple[dist.ProcessGroup, int, int]:
    """(process group, rank in it, its size) for anything groups.resolve takes."""
    pg = groups.resolve(group)
    return pg, dist.get_rank(pg), dist.get_world_size(pg)


def shard_parameter(dense: torch.Tensor, layout: ShardLayout, pg: dist.ProcessGroup,
                    requires_grad: bool) -> nn.Parameter:
    """A Parameter holding this rank's block of `dense`, tagged with its layout and marked sharded over pg."""
    p = nn.Parameter(layout.shard(dense.detach()), requires_grad=requires_grad)
    setattr(p, TP_LAYOUT, layout)
    mark_sharded(p, pg)
    return p


def gather_full(t: torch.Tensor, layout: ShardLayout, group, comm: TPComm = DEFAULT_COMM) -> torch.Tensor:
    """The dense tensor (padding dropped) from every rank's block `t` of a split parameter or its
    gradient: an all-gather on the tp group (every rank calls it), for checks, checkpoints and merged
    exports."""
    pg = groups.resolve(group)
    blocks = regions._all_gather(t.detach(), layout.dim, pg, comm)
    return layout.unshard(blocks)


def _check_comm(comm) -> TPComm:
    if not isinstance(comm, TPComm):
        raise TypeError(f"comm must be a llmkern.parallel.tensor_parallel.TPComm, got {type(comm).__name__}")
    return comm


class _TPModule(nn.Module):
    """The tp group, the communication settings and the region helpers shared by the layers."""

    def _init_tp(self, group, comm: TPComm, sequence_parallel: bool) -> None:
        self.tp_group, self.tp_rank, self.tp_world = tp_group_info(group)
        self.comm = _check_comm(comm)
        self.sequence_parallel = bool(sequence_parallel)

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return regions.gather_from_sequence(x, self.tp_group, 1, self.comm)
        return regions.copy_to_region(x, self.tp_group, self.comm)

    def _leave(self, y: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return regions.reduce_scatter_to_sequence(y, self.tp_group, 1, self.comm)
        return regions.reduce_from_region(y, self.tp_group, self.comm)

    def _replicated(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """A replicated parameter used on a sequence shard gets a partial gradient per rank: summed
        over tp in backward (no-op without sequence parallelism)."""
        if p is None or not self.sequence_parallel or not p.requires_grad:
            return p
        return regions.copy_to_region(p, self.tp_group, self.comm)


class ColumnParallelLinear(_TPModule):
    """y = x·Wᵀ + b with W's output rows (and b) split over tp.

    x (..., C_in) replicated (a (B, T/tp, C_in) sequence shard with sequence_parallel) -> y (...,
    C_out/tp) of this rank's outputs, or (..., C_out) with gather_output=True.

    input_is_parallel: x is already inside the region (several column layers share one entry).
    gather_output: all-gather the outputs (backward keeps this rank's slice) and drop the padding.
    parts: sizes of fused outputs split one by one (GPT-2's q|k|v), see layout.py.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group, gather_output: bool = False,
                 input_is_parallel: bool = False, sequence_parallel: bool = False, parts: tuple[int, ...] = (),
                 comm: TPComm = DEFAULT_COMM, device=None, dtype=None):
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._build(dense.weight, dense.bias, group, gather_output, input_is_parallel, sequence_parallel, parts, comm,
                    requires_grad=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> ColumnParallelLinear:
        """This rank's rows of `linear` (its weights are copied; requires_grad is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ColumnParallelLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._build(linear.weight, linear.bias, group, kwargs.pop("gather_output", False),
                   kwargs.pop("input_is_parallel", False), kwargs.pop("sequence_parallel", False),
                   kwargs.pop("parts", ()), kwargs.pop("comm", TPComm()), requires_grad=linear.weight.requires_grad)
        if kwargs:
            raise TypeError(f"ColumnParallelLinear.from_linear: unexpected arguments {sorted(kwargs)}")
        return mod

    def _build(self, weight, bias, group, gather_output, input_is_parallel, sequence_parallel, parts, comm, *,
               requires_grad) -> None:
        self._init_tp(group, comm, sequence_parallel)
        self.out_features, self.in_features = weight.shape
        self.layout = ShardLayout(self.out_features, self.tp_world, self.tp_rank, 0, tuple(parts))
        self.gather_output, self.input_is_parallel = bool(gather_output), bool(input_is_parallel)
        self.weight = shard_parameter(weight, self.layout, self.tp_group, requires_grad)
        self.bias = None
        if bias is not None:
            self.bias = shard_parameter(bias, self.layout, self.tp_group, bias.requires_grad)
        self._order: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = self._enter(x)
        y = F.linear(x, self.weight, self.bias)
        return self._gather(y) if self.gather_output else y

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        y = regions.gather_from_region(y, self.tp_group, -1, self.comm)
        if self.layout.padded == self.out_features and not self.layout.parts:
            return y
        if self._order is None or self._order.device != y.device:
            self._order = self.layout.gathered_order().to(y.device)
        return y.index_select(-1, self._order)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} ({self.layout.describe()}), "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_world}, gather_output={self.gather_output}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TPModule):
    """y = x·Wᵀ + b with W's input columns split over tp; b is replicated and added once, after the sum.

    x (..., C_in/tp) this rank's slice (input_is_parallel=True, the output of a column-parallel layer;
    padded to per_rank) or (..., C_in) replicated (input_is_parallel=False: this rank takes its slice)
    -> y (..., C_out) replicated, or a (B, T/tp, C_out) sequence shard with sequence_parallel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, comm: TPComm = DEFAULT_COMM,
                 device=None, dtype=None):
        super().__init__()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._build(dense.weight, dense.bias, group, input_is_parallel, sequence_parallel, comm, requires_grad=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kwargs) -> RowParallelLinear:
        """This rank's input columns of `linear` (its weights are copied; requires_grad is kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RowParallelLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._build(linear.weight, linear.bias, group, kwargs.pop("input_is_parallel", True),
                   kwargs.pop("sequence_parallel", False), kwargs.pop("comm", TPComm()),
                   requires_grad=linear.weight.requires_grad)
        if kwargs:
            raise TypeError(f"RowParallelLinear.from_linear: unexpected arguments {sorted(kwargs)}")
        return mod

    def _build(self, weight, bias, group, input_is_parallel, sequence_parallel, comm, *, requires_grad) -> None:
        self._init_tp(group, comm, sequence_parallel)
        self.out_features, self.in_features = weight.shape
        self.layout = ShardLayout(self.in_features, self.tp_world, self.tp_rank, 1)
        self.input_is_parallel = bool(input_is_parallel)
        self.weight = shard_parameter(weight, self.layout, self.tp_group, requires_grad)
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _local_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            if x.shape[-1] != self.layout.per_rank:
                raise ValueError(f"RowParallelLinear: with input_is_parallel the input is this rank's slice of "
                                 f"{self.layout.per_rank} features ({self.layout.describe()}), got shape "
                                 f"{tuple(x.shape)}")
            return x
        if x.shape[-1] != self.in_features:
            raise ValueError(f"RowParallelLinear: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if self.layout.padded != self.in_features:
            x = F.pad(x, (0, self.layout.padded - self.in_features))
        return regions.scatter_to_region(x, self.tp_group, -1, self.comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._leave(F.linear(self._local_input(x), self.weight))
        bias = self._replicated(self.bias)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.layout.describe()}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, tp={self.tp_rank}/{self.tp_world}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TPModule):
    """An embedding whose vocabulary rows are split over tp: each rank looks up the ids in its range
    (others give 0) and the ranks' results are summed (all-reduce; reduce-scatter along T with
    sequence_parallel). ids (...) -> (..., C)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, group,
                 sequence_parallel: bool = False, comm: TPComm = DEFAULT_COMM, device=None, dtype=None):
        super().__init__()
        dense = nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self._build(dense.weight, dense.padding_idx, group, sequence_parallel, comm, requires_grad=True)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, *, sequence_parallel: bool = False,
                       comm: TPComm = DEFAULT_COMM) -> VocabParallelEmbedding:
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_embedding expects an nn.Embedding, got {type(emb).__name__}")
        unsupported = {k: v for k, v in (("max_norm", emb.max_norm), ("scale_grad_by_freq", emb.scale_grad_by_freq),
                                         ("sparse", emb.sparse)) if v}
        if unsupported:
            raise ValueError(f"VocabParallelEmbedding: nn.Embedding options {unsupported} are not supported "
                             f"(they need the whole vocabulary on one rank)")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._build(emb.weight, emb.padding_idx, group, sequence_parallel, comm, requires_grad=emb.weight.requires_grad)
        return mod

    def _build(self, weight, padding_idx, group, sequence_parallel, comm, *, requires_grad) -> None:
        self._init_tp(group, comm, sequence_parallel)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.layout = ShardLayout(self.num_embeddings, self.tp_world, self.tp_rank, 0)
        self.padding_idx = padding_idx
        lo, n = self.layout.start, self.layout.valid
        self._local_padding_idx = (padding_idx - lo) if padding_idx is not None and lo <= padding_idx < lo + n else None
        # Every id is checked against the vocabulary (one host read of min/max per call): an id out of
        # range would otherwise look up zeros on every rank, silently. False skips it (torch.compile).
        self.check_ids = True
        self.weight = shard_parameter(weight, self.layout, self.tp_group, requires_grad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"VocabParallelEmbedding: ids must be int64 or int32, got {ids.dtype}")
        if self.check_ids and ids.numel() and ids.device.type != "meta":  # meta ids have no values to check
            lo_id, hi_id = (int(v) for v in torch.aminmax(ids))
            if lo_id < 0 or hi_id >= self.num_embeddings:
                raise IndexError(f"VocabParallelEmbedding: ids must be in [0, {self.num_embeddings}), got ids in "
                                 f"[{lo_id}, {hi_id}]")
        lo, n = self.layout.start, self.layout.valid
        outside = (ids < lo) | (ids >= lo + n)
        local = (ids - lo).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self._local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self._leave(out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} ({self.layout.describe()}), "
                f"padding_idx={self.padding_idx}, tp={self.tp_rank}/{self.tp_world}, "
                f"sequence_parallel={self.sequence_parallel}")
