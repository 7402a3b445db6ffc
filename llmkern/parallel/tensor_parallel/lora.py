"""LoRA on tensor-parallel layers, in the layout Megatron users expect.

    column-parallel: W and B split by output rows (B: (C_out/tp, R)); A (R, C_in) replicated
    row-parallel:    W and A split by input columns (A: (R, C_in/tp)); B (C_out, R) replicated

Both run the fused op llmkern.ops.lora_linear on the rank's shard (a row-parallel shard in training
with dropout excepted, see below). Column-parallel: each rank holds the whole input, so its dropout
mask is the single-device mask and its output columns are the single-device ones. Row-parallel:
each rank's x_r·A_rᵀ is a partial sum of x·Aᵀ, and
Σ_r (x_r W_rᵀ + s·(x_r A_rᵀ)·Bᵀ) = x Wᵀ + s·(x Aᵀ)·Bᵀ, so the one all-reduce of the row layer sums
the base and the adapter together; the bias is added after it, once.

The replicated factor (A of a column layer, B of a row layer) gets a partial gradient on each rank
(it meets only the rank's slice of the other factor): it goes through regions.copy_to_region, whose
backward all-reduces its gradient over tp, so every rank holds the whole gradient and the factor
stays replicated. It is not marked sharded: the global norm counts it once.

Dropout masks. The op draws element (n, k) of an (N, C_in) input's mask from the counter
offset + n·C_in + k (llmkern/_rng.py). A column-parallel rank holds the whole input, so the fused op
draws the single-device mask. A row-parallel rank holds columns [c0, c0 + C_in/tp) and needs the
counters offset + n·C_in + c0 + k: a global row stride and column offset the fused op does not take.
So with dropout > 0 in training a row-parallel shard draws exactly those counters itself
(_rng.counter_hash on N·C_in/tp counters: this rank's share, no more) and runs the LoRA product
unfused (x·Wᵀ + s·((mask·x/(1-p))·Aᵀ)·Bᵀ, plain torch ops, the formula of lora_linear_ref): its mask
is the slice of the single-device mask, so a tp run equals a 1-rank run with the same seed. Without
dropout (or in eval) it runs the fused op. apply_tensor_parallel's report names the layers that take
the unfused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkern import _rng
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
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if p > 0 else 0
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

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", column-parallel {self.layout.describe()}, tp={self.tp_rank}/{self.tp_world}"
                f", sequence_parallel={self.sequence_parallel}")


class RowParallelLoRALinear(LoRALinear):
    """LoRALinear on a row-parallel layer: weight and lora_A hold this rank's input columns, lora_B and
    bias are replicated. Input and output as RowParallelLinear with input_is_parallel=True."""

    _enter, _leave, _replicated = _TPModule._enter, _TPModule._leave, _TPModule._replicated

    exact_dropout_mask = True
    """Each shard's dropout mask is the slice of the single-device mask (see the module docstring)."""

    unfused_with_dropout = True
    """With dropout > 0 in training the LoRA product runs unfused (the fused op takes no global
    column offset for its mask); without dropout it runs the fused op."""

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
            b = regions.copy_to_region(self.lora_B.weight, self.tp_group, self.comm)
            if p > 0:
                seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
                xd = x * (self._keep_mask(seed, p, x).to(x.dtype) / (1.0 - p))
                y = F.linear(x, self.weight) + self.scale * F.linear(F.linear(xd, self.lora_A.weight), b)
            else:
                y = lora_linear(x, self.weight, None, self.lora_A.weight, b, self.scale, 0.0, 0, 0,
                                backend=self.backend)
        y = self._leave(y)
        bias = self._replicated(self.bias)
        return y if bias is None else y + bias

    def _keep_mask(self, seed: int, p: float, x: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the single-device keep-mask of the dense (N, C_in) input, shaped like
        x (N, ..., per_rank); padding columns are dropped (their inputs are 0 anyway)."""
        lay, c_in = self.layout, self.dense_in
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        col = torch.arange(lay.per_rank, dtype=torch.int64, device=x.device)
        counter = torch.arange(rows, dtype=torch.int64, device=x.device)[:, None] * c_in + (lay.start + col)
        keep = (_rng.counter_hash(_rng.dropout_key(seed), counter) >> 8) >= _rng.dropout_threshold(p)
        return (keep & (col < lay.valid)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", row-parallel {self.layout.describe()}, tp={self.tp_rank}/{self.tp_world}"
                f", sequence_parallel={self.sequence_parallel}")
