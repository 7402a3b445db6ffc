"""What the Triton launchers share with the ahead-of-time static check (tests/static,
llmkern.kernel_report): the variant record and the alignment rule the JIT specialises on.
(Modules whose names start with "_" hold no kernels; kernel_report skips them.)"""
from __future__ import annotations

import dataclasses

import torch

TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""The input dtypes the kernels take, by their Triton type names."""


def is_aligned(row_len: int, *tensors: torch.Tensor) -> bool:
    """The JIT's view: every pointer 16-byte aligned and the row length divisible by 16."""
    return row_len % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AotConfig:
    """One kernel variant the launchers can run, as the static check compiles it."""

    kernel: object
    """The @triton.jit function."""
    signature: dict
    """Argument name → Triton type ("*bf16", "i32", "fp32", "constexpr")."""
    constexprs: dict
    """Values of the constexpr arguments."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining stages."""
    dtype: str
    """Input dtype it serves ("fp32", "fp16", "bf16"), for the report."""
    divisible_by_16: tuple = ()
    """Arguments the JIT marks tt.divisibility=16 in this variant (pointers, and the row length when
    aligned)."""

    @property
    def attrs(self) -> dict:
        """ASTSource attrs: {(argument index,): [["tt.divisibility", 16]]}."""
        names = list(self.signature)
        return {(names.index(a),): [["tt.divisibility", 16]] for a in self.divisible_by_16}

    @property
    def name(self) -> str:
        c = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        align = "aligned" if self.divisible_by_16 else "any"
        return f"{self.dtype},{align},{c},w{self.num_warps},s{self.num_stages}"
