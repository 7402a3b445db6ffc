"""How one dimension of a weight is split over the tp ranks, padding included.

A dimension of `size` elements (a Linear's output rows, a vocabulary) is cut into `world` blocks of
`per_rank = ceil(size / world)`; rank r holds dense indices [r·per_rank, r·per_rank + valid_r), the
rest of its block is zero padding. This is torch.chunk's (and DTensor Shard(dim)'s) split, with the
short or empty last blocks padded so that every rank's tensor has the same shape: collectives then
move equal shards and no rank special-cases its size. Padding is exact, not approximate:

- padded output rows of a column-parallel Linear have zero weights and zero bias, so they output
  0; the activation after them (SiLU·up, GELU: f(0) = 0) keeps them 0, the next row-parallel
  Linear's padded input columns are zero too, and their gradients are 0, so Adam leaves them 0;
- padded vocabulary rows are never looked up, and the vocab-parallel cross-entropy gives their
  logits -inf (probability 0, gradient 0).

A fused output of several parts (GPT-2's c_attn: q|k|v) splits each part on its own, so rank r's
rows are [q_r | k_r | v_r]: `parts` lists the parts' sizes, each of which world must divide (they
are head counts times head_dim; a tp degree that does not divide the heads is refused earlier).
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["TP_LAYOUT", "ShardLayout"]

TP_LAYOUT = "_llmkern_tp_layout"
"""The attribute of a tensor-parallel parameter holding its ShardLayout (absent on replicated ones)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ShardLayout:
    """Dimension `dim` of a tensor of dense length `size`, split over `world` ranks; this is `rank`'s."""

    size: int
    """Dense length of the split dimension (without padding)."""
    world: int
    """Ranks it is split over (the tp degree)."""
    rank: int
    """This rank in the tp group."""
    dim: int = 0
    """Which dimension of the parameter is split (0: rows of a Linear weight or an embedding)."""
    parts: tuple[int, ...] = ()
    """Sizes of the fused parts split one by one (sum = size); () for one part."""

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"ShardLayout: rank {self.rank} is not in a tp group of {self.world}")
        if self.size < 0:
            raise ValueError(f"ShardLayout: size must be >= 0, got {self.size}")
        if self.parts:
            if sum(self.parts) != self.size:
                raise ValueError(f"ShardLayout: parts {self.parts} do not add up to size {self.size}")
            bad = [p for p in self.parts if p % self.world]
            if bad:
                raise ValueError(f"ShardLayout: the tp degree {self.world} must divide every fused part "
                                 f"{self.parts} (it does not divide {bad})")

    @property
    def per_rank(self) -> int:
        """Length of every rank's block along dim, padding included."""
        return -(-self.size // self.world)

    @property
    def padded(self) -> int:
        """per_rank * world: the dense length rounded up to a multiple of the tp degree."""
        return self.per_rank * self.world

    @property
    def start(self) -> int:
        """First dense index of this rank's block (one-part layouts)."""
        return min(self.rank * self.per_rank, self.size)

    @property
    def valid(self) -> int:
        """Dense (non-padding) entries in this rank's block, at its beginning (one-part layouts)."""
        return max(0, min(self.per_rank, self.size - self.rank * self.per_rank))

    def dense_indices(self, rank: int | None = None) -> torch.Tensor:
        """int64 [per_rank]: the dense index of each entry of `rank`'s block (default: this rank's),
        -1 for padding."""
        rank = self.rank if rank is None else rank
        if self.parts:
            idx, base = [], 0
            for p in self.parts:
                n = p // self.world
                idx.append(torch.arange(base + rank * n, base + (rank + 1) * n))
                base += p
            return torch.cat(idx)
        idx = torch.arange(rank * self.per_rank, (rank + 1) * self.per_rank)
        return idx.masked_fill(idx >= self.size, -1)

    def gathered_order(self) -> torch.Tensor:
        """int64 [size]: for each dense index, its position in the all-gathered blocks (rank-major,
        world * per_rank): `gathered.index_select(dim, order)` gives the dense tensor."""
        pos = torch.full((self.size,), -1, dtype=torch.int64)
        for r in range(self.world):
            idx = self.dense_indices(r)
            keep = idx >= 0
            pos[idx[keep]] = torch.arange(r * self.per_rank, (r + 1) * self.per_rank)[keep]
        return pos

    def shard(self, dense: torch.Tensor) -> torch.Tensor:
        """This rank's block of a dense tensor (split along dim), zero-padded; a new tensor."""
        if dense.shape[self.dim] != self.size:
            raise ValueError(f"ShardLayout.shard: dimension {self.dim} of shape {tuple(dense.shape)} must be the "
                             f"dense size {self.size}")
        idx = self.dense_indices()
        shape = list(dense.shape)
        shape[self.dim] = self.per_rank
        out = dense.new_zeros(shape)
        keep = idx >= 0
        if bool(keep.any()):
            src = dense.index_select(self.dim, idx[keep].to(dense.device))
            out.narrow(self.dim, 0, int(keep.sum())).copy_(src)
        return out

    def unshard(self, blocks: torch.Tensor) -> torch.Tensor:
        """The dense tensor from every rank's block stacked rank-major along dim (world * per_rank)."""
        return blocks.index_select(self.dim, self.gathered_order().to(blocks.device))

    def describe(self) -> str:
        pad = f", padded {self.size} -> {self.padded}" if self.padded != self.size else ""
        parts = f" in parts {self.parts}" if self.parts else ""
        return f"dim {self.dim} split {self.size}{parts} / {self.world} = {self.per_rank} per rank{pad}"
