"""What the Triton launchers share with the ahead-of-time static check (tests/static,
llmkern.kernel_report): the variant record, the alignment rule the JIT specialises on, and the
enumeration of the variants a launcher can pick. Each kernel module lists its variants as
``AOT_CONFIGS = distinct(make, *axes)`` with ``make(*choice) -> variant(...)``.
(Modules whose names start with "_" hold no kernels; kernel_report skips them.)"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterable, Mapping

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
    """Input dtype(s) it serves, for the report: "fp32", "fp16", "bf16", or one per argument
    ("p=fp32,g=fp16,s=fp32,copy=fp16") where they differ."""
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


def variant(kernel, config: dict, *, dtype: str, pointee: str | None = None, types: Mapping[str, str] = {},
            aligned_row: str | None = None) -> AotConfig:
    """The AotConfig of one launch of `kernel` with `config` (its constexprs plus num_warps and
    num_stages, as the launcher passes them). The runtime arguments' Triton types follow the kernel's
    argument names: `types` where it names them, else "*<pointee>" for a pointer (``*_ptr``) and "i32"
    for a scalar. aligned_row names the row-length argument the JIT marks divisible by 16 together
    with every pointer (the "aligned" variant), or None for the variant with nothing known."""
    config = dict(config)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    constexprs = {k: config[k] for k in kernel.arg_names if k in config}
    runtime = {a: types.get(a) or (f"*{pointee}" if a.endswith("_ptr") else "i32")
               for a in kernel.arg_names if a not in constexprs}
    pointers = tuple(a for a, t in runtime.items() if t.startswith("*"))
    return AotConfig(kernel=kernel, signature={**runtime, **{k: "constexpr" for k in constexprs}},
                     constexprs=constexprs, num_warps=num_warps, num_stages=num_stages, dtype=dtype,
                     divisible_by_16=pointers + (aligned_row,) if aligned_row else ())


def aligned_and_any(kernel, signature: dict, constexprs: dict, *, num_warps: int, dtype: str,
                    row: str | None = None, num_stages: int = 1) -> list[AotConfig]:
    """The two variants the JIT compiles for one launch configuration: "aligned" (every pointer of
    `signature`, and the row-length argument `row` if given, marked divisible by 16) and "any"."""
    pointers = tuple(n for n, t in signature.items() if t.startswith("*"))
    return [AotConfig(kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                      num_stages=num_stages, dtype=dtype, divisible_by_16=div)
            for div in (pointers + ((row,) if row else ()), ())]


def distinct(make: Callable[..., AotConfig], *axes: Iterable) -> list[AotConfig]:
    """make(*choice) for every choice in the product of the axes, each distinct (kernel, name) once, in
    first-seen order: many choices (e.g. R = 1..128) map onto one compiled variant."""
    seen: set[tuple[str, str]] = set()
    out = []
    for choice in itertools.product(*axes):
        c = make(*choice)
        if (c.kernel.__name__, c.name) not in seen:
            seen.add((c.kernel.__name__, c.name))
            out.append(c)
    return out
