"""LoRA on tensor-parallel layers, in the layout Megatron users expect.

    column-parallel: W and B split by output rows (B: (C_out/tp, R)); A (R, C_in) replicated
    row-parallel:    W and A split by input columns (A: (R, C_in/tp)); B (C_out, R) replicated

Both run the fused op llmkern.ops.lora_linear on the rank's shard, in training and in eval, with
and without dropout. Column-parallel: each rank holds the whole input, so its dropout mask is the
single-device mask and its output columns are the single-device ones. Row-parallel: each rank's
x_r·A_rᵀ is a partial sum of x·Aᵀ, and
Σ_r (x_r W_rᵀ + s·(x_r A_rᵀ)·Bᵀ) = x Wᵀ + s·(x Aᵀ)·Bᵀ, so the one all-reduce of the row layer sums
the base and the adapter together; the bias is added after it, once.

The replicated factor (A of a column layer, B of a row layer) gets a partial gradient on each rank
(it meets only the rank's slice of the other factor): it goes through regions.copy_to_region, whose
backward all-reduces its gradient over tp, so every rank holds the whole gradient and the factor
stays replicated. It is not marked sharded: the global norm counts it once.

Dropout masks. The op draws element (n, k) of an (N, C_in) input's mask from the counter
offset + col_offset + n·row_stride + k (llmkern/_rng.py; row_stride defaults to C_in, col_offset to 0).
A column-parallel rank holds the whole input and passes the defaults: the single-device mask. A
row-parallel rank holds dense columns [c0, c0 + valid) of the C_in-wide input and passes
col_offset=c0, row_stride=C_in: it draws exactly those columns of the single-device mask, so a tp run
equals a 1-rank run with the same seed. The seed is drawn from torch's CPU generator as LoRALinear
draws it, an int64 tensor (no .item(): no device sync, no graph break), the same on every tp rank.
A rank whose block ends in padding (C_in not a multiple of tp: the last ranks, whose padding inputs
and weight columns are 0) runs the op on its `valid` dense columns only (none at all is a valid
call: the product is 0), since the counter of a padding column would be the next row's first one;
the op makes the column slices of x and of the frozen weight contiguous on those ranks (C_out·valid
elements a call), never on a layout tp divides.
apply_tensor_parallel's report (TensorParallelReport.lora) names the kernel and the mask slice of
every LoRA layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern.nn.lora import LoRALinear
from llmkern.ops.lora_linear import lora_linear
from llmkern.parallel.mesh import mark_sharded
from llmkern.parallel.tensor_parallel import regions
from llmkern.parallel.tensor_parallel.layers import _TPModule, tp_group_info
from llmkern.parallel.tensor_parallel.layout import TP_LAYOUT, ShardLayout
from llmkern.parallel.tensor_parallel.regions import DEFAULT_COMM, TPComm

__all__ = ["ColumnParallelLoRALinear", "RowParallelLoRALinear"]


def _check_source(lora: LoRALinear, cls_name: str) -> None:
    if not isinstance(lora, LoRALinear):
        raise TypeError(f"{cls_name}.from_lora expects an llmkern.nn.LoRALinear, got {type(lora).__name__}")
    if lora.merged:
        raise ValueError(f"{cls_name}.from_lora: the LoRALinear is merged (s·B·A is folded into its weight); unmerge "
                         f"it first so that the base weight and the factors can be split")


def _mark(t: torch.Tensor, layout: ShardLayout, pg) -> None:
    setattr(t, TP_LAYOUT, layout)
    mark_sharded(t, pg)


def _new_lora(cls, lora: LoRALinear, weight: torch.Tensor, bias, group, comm: TPComm, sequence_parallel: bool):
    """A `cls` (a LoRALinear subclass) set up like `lora` on the local `weight` shape (LoRALinear._setup
    sizes the factors from the weight, so they come out in their local shapes)."""
    mod = cls.__new__(cls)
    torch.nn.Module.__init__(mod)
    # The factors' initialization is overwritten by the source's values: keep torch's generator where it
    # was, so the dropout seeds drawn later match a run without tensor parallelism.
    with torch.random.fork_rng(devices=[]):
        mod._setup(weight, bias, lora.r, lora.alpha, lora.dropout, lora.use_rslora, lora.backend)
    mod.disabled = lora.disabled
    _TPModule._init_tp(mod, group, comm, sequence_parallel)
    return mod


class ColumnParallelLoRALinear(LoRALinear):
    """LoRALinear on a column-parallel layer: weight, bias and lora_B hold this rank's output rows,
    lora_A is replicated. Input and output as ColumnParallelLinear."""

    _enter, _leave, _replicated = _TPModule._enter, _TPModule._leave, _TPModule._replicated

    @classmethod
    def from_lora(cls, lora: LoRALinear, group, *, gather_output: bool = False, input_is_parallel: bool = False,
                  sequence_parallel: bool = False, parts: tuple[int, ...] = (),
                  comm: TPComm = DEFAULT_COMM) -> ColumnParallelLoRALinear:
        _check_source(lora, cls.__name__)
        _, rank, world = tp_group_info(group)
        out_features, in_features = lora.weight.shape
        layout = ShardLayout(out_features, world, rank, 0, tuple(parts))
        weight = torch.nn.Parameter(layout.shard(lora.weight.detach()), requires_grad=False)
        bias = None if lora.bias is None else torch.nn.Parameter(layout.shard(lora.bias.detach()), requires_grad=False)
        mod = _new_lora(cls, lora, weight, bias, group, comm, sequence_parallel)
        for p in (mod.weight, mod.bias, mod.lora_B.weight):
            if p is not None:
                _mark(p, layout, mod.tp_group)
        mod.lora_A.weight.data.copy_(lora.lora_A.weight.detach())
        mod.lora_B.weight.data.copy_(layout.shard(lora.lora_B.weight.detach()))
        mod.lora_A.weight.requires_grad_(lora.lora_A.weight.requires_grad)
        mod.lora_B.weight.requires_grad_(lora.lora_B.weight.requires_grad)
        mod.layout, mod.dense_in, mod.dense_out = layout, in_features, out_features
        mod.gather_output, mod.input_is_parallel = bool(gather_output), bool(input_is_parallel)
        mod._order = None
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = self._enter(x)
        if self.merged or self.disabled:
            y = F.linear(x, self.weight, self.bias)
        else:
            p = self.dropout if self.training else 0.0
            seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else 0
            a = regions.copy_to_region(self.lora_A.weight, self.tp_group, self.comm)
            y = lora_linear(x, self.weight, self.bias, a, self.lora_B.weight, self.scale, p, seed, 0,
                            backend=self.backend)
        if not self.gather_output:
            return y
        y = regions.gather_from_region(y, self.tp_group, -1, self.comm)
        if self.layout.padded == self.dense_out and not self.layout.parts:
            return y
        if self._order is None or self._order.device != y.device:
            self._order = self.layout.gathered_order().to(y.device)
        return y.index_select(-1, self._order)

    def kernel(self) -> str:
        """Which kernel runs the LoRA product and which dropout mask it draws (for the tp report)."""
        mask = (f"dropout {self.dropout}: the single-device mask (every rank holds the whole input)" if self.dropout > 0
                else "no dropout")
        return f"fused lora_linear, {mask}"

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", column-parallel {self.layout.describe()}, tp={self.tp_rank}/{self.tp_world}"
                f", sequence_parallel={self.sequence_parallel}")


class RowParallelLoRALinear(LoRALinear):
    """LoRALinear on a row-parallel layer: weight and lora_A hold this rank's input columns, lora_B and
    bias are replicated. Input and output as RowParallelLinear with input_is_parallel=True."""

    _enter, _leave, _replicated = _TPModule._enter, _TPModule._leave, _TPModule._replicated

    @classmethod
    def from_lora(cls, lora: LoRALinear, group, *, sequence_parallel: bool = False,
                  comm: TPComm = DEFAULT_COMM) -> RowParallelLoRALinear:
        _check_source(lora, cls.__name__)
        _, rank, world = tp_group_info(group)
        out_features, in_features = lora.weight.shape
        layout = ShardLayout(in_features, world, rank, 1)
        weight = torch.nn.Parameter(layout.shard(lora.weight.detach()), requires_grad=False)
        bias = None if lora.bias is None else torch.nn.Parameter(lora.bias.detach().clone(), requires_grad=False)
        mod = _new_lora(cls, lora, weight, bias, group, comm, sequence_parallel)
        _mark(mod.weight, layout, mod.tp_group)
        _mark(mod.lora_A.weight, layout, mod.tp_group)
        mod.lora_A.weight.data.copy_(layout.shard(lora.lora_A.weight.detach()))
        mod.lora_A.weight.requires_grad_(lora.lora_A.weight.requires_grad)
        mod.lora_B.weight.data.copy_(lora.lora_B.weight.detach())
        mod.lora_B.weight.requires_grad_(lora.lora_B.weight.requires_grad)
        mod.layout, mod.dense_in, mod.dense_out = layout, in_features, out_features
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.layout.per_rank:
            raise ValueError(f"RowParallelLoRALinear: the input is this rank's slice of {self.layout.per_rank} "
                             f"features ({self.layout.describe()}), got shape {tuple(x.shape)}")
        if self.merged or self.disabled:
            y = F.linear(x, self.weight)
        else:
            p = self.dropout if self.training else 0.0
            seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else 0
            b = regions.copy_to_region(self.lora_B.weight, self.tp_group, self.comm)
            w, a, lay = self.weight, self.lora_A.weight, self.layout
            if lay.valid < lay.per_rank:  # the padded last block: its dense columns only (module docstring)
                x, w, a = x[..., :lay.valid], w[:, :lay.valid], a[:, :lay.valid]
            y = lora_linear(x, w, None, a, b, self.scale, p, seed, 0, col_offset=lay.start, row_stride=self.dense_in,
                            backend=self.backend)
        y = self._leave(y)
        bias = self._replicated(self.bias)
        return y if bias is None else y + bias

    def kernel(self) -> str:
        """Which kernel runs the LoRA product and which dropout mask it draws (for the tp report)."""
        lay = self.layout
        if self.dropout <= 0:
            return "fused lora_linear, no dropout"
        return (f"fused lora_linear, dropout {self.dropout}: columns [{lay.start}, {lay.start + lay.valid}) of the "
                f"{self.dense_in}-column single-device mask (col_offset={lay.start}, row_stride={self.dense_in})")

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", row-parallel {self.layout.describe()}, tp={self.tp_rank}/{self.tp_world}"
                f", sequence_parallel={self.sequence_parallel}")
