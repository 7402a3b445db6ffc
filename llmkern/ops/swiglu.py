"""The gated activations of LLaMA-style MLPs: ``swiglu(gate, up) = silu(gate)·up`` and
``geglu(gate, up, approximate) = gelu(gate)·up`` ("none": erf, "tanh": the tanh approximation).

Shapes: gate and up of one shape (..., F), e.g. the outputs of gate_proj and up_proj. fp32, fp16 and
bf16 (fp64 on ``ref``); fp32 math, one rounding of the output (eager rounds act(gate) and the
product separately).

Memory: eager autograd keeps gate, act(gate) and up (and the product for the down projection).
Here the backward recomputes act(gate) and act'(gate) from gate: autograd keeps gate and up only,
never the activation.

Backends: ``cpu`` (llmkern._C), ``triton`` and ``ref`` (:func:`swiglu_ref`, :func:`geglu_ref`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from llmkern.ops import _backends

__all__ = ["swiglu", "geglu", "swiglu_ref", "geglu_ref", "Approximate", "UNAVAILABLE"]

Approximate = Literal["none", "tanh"]
DTYPES = {"cpu": _backends.FP32_FP16_BF16, "triton": _backends.FP32_FP16_BF16, "ref": _backends.FP32_FP16_BF16_FP64}
SUPPORTED: tuple[_backends.Backend, ...] = ("cpu", "triton", "ref")  # on GPU this family runs on Triton


def swiglu_ref(gate, up):
    """The oracle and fallback: LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with act_fn = SiLU."""
    return F.silu(gate) * up


def geglu_ref(gate, up, approximate: Approximate = "tanh"):
    """The oracle and fallback: GemmaMLP's gated GELU (``gelu_pytorch_tanh`` is approximate="tanh")."""
    return F.gelu(gate, approximate=approximate) * up


def _check(op: str, gate, up, approximate=None) -> None:
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"{op}: gate and up must be tensors")
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"{op}: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{op}: gate and up must be on the same device, got {gate.device} and {up.device}")
    if gate.dtype not in DTYPES["ref"]:
        raise TypeError(f"{op}: dtype must be float32, float16, bfloat16 or float64, got {gate.dtype}")
    if approximate is not None and approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def _fake_forward(gate, up, *approximate):
    return gate.new_empty(gate.shape)


def _fake_backward(grad_out, gate, up, *approximate):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up = inputs[:2]
    ctx.save_for_backward(gate, up)  # the activation is recomputed, never saved
    ctx.extra = tuple(inputs[2:])


def _backward_of(name: str):
    def make(ns: str):
        def backward(ctx, grad_out):
            gate, up = ctx.saved_tensors
            dg, du = getattr(getattr(torch.ops, ns), name)(grad_out.contiguous(), gate, up, *ctx.extra)
            need = ctx.needs_input_grad
            return (dg if need[0] else None, du if need[1] else None) + (None,) * len(ctx.extra)
        return backward
    return make


def _triton(op: str):
    def impls():
        from llmkern.triton_kernels import swiglu as tk

        return {op: getattr(tk, f"{op}_fwd"), f"_{op}_backward": getattr(tk, f"{op}_bwd")}
    return impls


def _register(op: str) -> dict[str, str]:
    return _backends.register_op(
        op, fake=_fake_forward, triton=_triton(op),
        backward=_backends.Backward(name=f"_{op}_backward", fake=_fake_backward, formula=_backward_of(f"_{op}_backward"),
                                    setup_context=_setup_context))


# One op per activation family; both share the kernels. UNAVAILABLE says, per backend, why swiglu's or
# geglu's kernels are missing (the same reasons for both on any build).
UNAVAILABLE = {**_register("swiglu"), **_register("geglu")}


def swiglu(gate, up, *, backend: _backends.Backend | None = None):
    """``silu(gate)·up`` (see the module docstring)."""
    _check("swiglu", gate, up)
    chosen = _backends.choose("swiglu", [gate, up], DTYPES, backend, supported=SUPPORTED)
    return _backends.run("swiglu", chosen, swiglu_ref, gate, up)


def geglu(gate, up, approximate: Approximate = "tanh", *, backend: _backends.Backend | None = None):
    """``gelu(gate, approximate)·up`` (see the module docstring)."""
    _check("geglu", gate, up, approximate)
    chosen = _backends.choose("geglu", [gate, up], DTYPES, backend, supported=SUPPORTED)
    return _backends.run("geglu", chosen, geglu_ref, gate, up, approximate)
