"""Triton kernels and launchers of the gated activations swiglu and geglu (llmkern/ops/swiglu.py).

    forward   out = act(gate)·up
    backward  grad_gate = grad·up·act'(gate),  grad_up = grad·act(gate)    (act recomputed from gate)

Element-wise over the flattened tensors, BLOCK elements per program, fp32 math. The activation is a
constexpr (ACT: 0 silu, 1 gelu, 2 gelu_tanh): the kernels are short and the three variants differ in
their transcendental calls, which a runtime branch would keep in every variant's register budget.
gelu_tanh uses 0.5·(1 + tanh(v)) = sigmoid(2v) (Triton has no tanh; sigmoid saturates cleanly).
Offsets are int64: F·T passes 2^31 at T = 200K tokens of a 11008-wide MLP (the JIT then types n as
i64 and compiles that variant; AOT_CONFIGS holds the i32 ones).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import TL_DTYPE as _TL_DTYPE, AotConfig, aligned_and_any

__all__ = ["swiglu_fwd", "swiglu_bwd", "geglu_fwd", "geglu_bwd", "AOT_CONFIGS"]

_ACT = {"silu": 0, "none": 1, "tanh": 2}  # swiglu, geglu(approximate="none"), geglu(approximate="tanh")
# 1024 elements per program, 4 warps: 8 per thread, 16-byte loads for 16-bit dtypes when aligned.
BLOCK = 1024


@triton.jit
def _swiglu_act(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for fp32 z."""
    # 0.7071067811865476 = 1/√2, 0.3989422804014327 = 1/√(2π), 1.5957691216057308 = 2·√(2/π).
    if ACT == 0:
        s = tl.sigmoid(z)
        a = z * s
        da = s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        s = tl.sigmoid((z + z * z * z * 0.044715) * 1.5957691216057308)
        a = z * s
        da = s + z * s * (1.0 - s) * 1.5957691216057308 * (1.0 + z * z * 0.134145)
    return a, da


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _swiglu_act(g, ACT)
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _swiglu_act(g, ACT)
    tl.store(dgate_ptr + offs, (d * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (d * a).to(dup_ptr.dtype.element_ty), mask=mask)


def _aot_configs() -> list[AotConfig]:
    out = []
    for t in _TL_DTYPE.values():
        for act in _ACT.values():
            for fn, ptrs in ((_swiglu_fwd_kernel, ("gate_ptr", "up_ptr", "out_ptr")),
                             (_swiglu_bwd_kernel, ("grad_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr"))):
                sig = {**{p: f"*{t}" for p in ptrs}, "n": "i32", "ACT": "constexpr", "BLOCK": "constexpr"}
                out += aligned_and_any(fn, sig, {"ACT": act, "BLOCK": BLOCK}, num_warps=4, dtype=t, row="n")
    return out


AOT_CONFIGS: list[AotConfig] = _aot_configs()


def _check(op: str, *tensors):
    first = tensors[0]
    if first.dtype not in _TL_DTYPE:
        raise ValueError(f"{op} (Triton): dtype {first.dtype}; supported: float32, float16, bfloat16")
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{op} (Triton): every tensor must be {tuple(first.shape)} {first.dtype} on "
                             f"{first.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _fwd(op: str, gate, up, act: int):
    _check(op, gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, ACT=act, BLOCK=BLOCK, num_warps=4)
    return out


def _bwd(op: str, grad, gate, up, act: int):
    _check(op, gate, up, grad)
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad, gate, up, dgate, dup, n, ACT=act, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


def swiglu_fwd(gate, up):
    return _fwd("swiglu", gate, up, _ACT["silu"])


def swiglu_bwd(grad_out, gate, up):
    return _bwd("_swiglu_backward", grad_out, gate, up, _ACT["silu"])


def _act_of(approximate: str) -> int:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"geglu (Triton): approximate must be 'none' or 'tanh', got {approximate!r}")
    return _ACT[approximate]


def geglu_fwd(gate, up, approximate: str):
    return _fwd("geglu", gate, up, _act_of(approximate))


def geglu_bwd(grad_out, gate, up, approximate: str):
    return _bwd("_geglu_backward", grad_out, gate, up, _act_of(approximate))
