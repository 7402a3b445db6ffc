"""Fused bottleneck adapter: ``y = r + s·(act(LN?(x)·Dᵀ + d)·Uᵀ + u)``, with ``r = x`` (series,
Houlsby) or the wrapped sublayer's output (parallel, He et al.).

Shapes: x (..., C), down_weight D (R, C), down_bias d (R), up_weight U (C, R), up_bias u (C),
optional LayerNorm weight/bias (C) (LayerNorm iff ln_weight is given), residual like x.
fp32, fp16 and bf16 on the compiled backends, accumulating in fp32; fp64 runs on ``ref`` only.
Under torch.autocast every float input is cast to the autocast dtype (``_backends``' "lower" policy):
the adapter's two GEMMs run as nn.Linear's do, its LayerNorm in fp32 inside the kernel.

Eager PyTorch stores, per token, LN(x), the pre-activation z, act(z) and (for the up projection)
act(z) again as its input: the kernels store only z (T, R) in fp32 and the LayerNorm row statistics
mean/rstd (T) besides x, and recompute LN(x) and act(z) in the backward.

Backends (see ``_backends``): ``cpu`` (llmkern._C), ``cuda`` (llmkern._C_cuda), ``triton``
(``llmkern.triton_kernels.adapter_bottleneck``), ``emu`` (the CUDA kernels compiled for the CPU)
and ``ref`` (:func:`adapter_bottleneck_ref`). Each compiled backend is a dispatcher op
``<ns>::adapter_bottleneck`` with the schema of csrc/ops/adapter_bottleneck.cpp, and the same fake
function and autograd formula, registered below.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from llmkern.ops import _backends
from llmkern.ops._backends import FP32_FP16_BF16, FP32_FP16_BF16_FP64

__all__ = ["adapter_bottleneck", "adapter_bottleneck_ref", "check_adapter_inputs", "check_backward_inputs",
           "Activation", "ACTIVATIONS", "UNAVAILABLE"]

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
"""The adapter's nonlinearity: the one spelling in Python. C++ has the same names in the same order in
csrc/include/llmkern/activation.h (tests/ops/test_adapter_bottleneck.py checks that they agree); the
Triton kernels take the code 1 + index (triton_kernels/adapter_bottleneck.py)."""
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

DTYPES = {"cpu": FP32_FP16_BF16, "cuda": FP32_FP16_BF16, "emu": FP32_FP16_BF16, "triton": FP32_FP16_BF16,
          "ref": FP32_FP16_BF16_FP64}


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"adapter_bottleneck: activation must be one of {ACTIVATIONS}, got {activation!r}")


def adapter_bottleneck_ref(x, down_weight, down_bias, up_weight, up_bias, scale=1.0, activation: Activation = "relu",
                           ln_weight=None, ln_bias=None, eps=1e-5, residual=None):
    """The oracle and fallback, in plain PyTorch autograd (which stores every intermediate)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    out = F.linear(_act(F.linear(h, down_weight, down_bias), activation), up_weight, up_bias)
    return (x if residual is None else residual) + scale * out


def check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, residual,
                         eps: float | None = None):
    """Shape, dtype, device and value checks with messages that name what was expected. The C++ ops
    check the same things; this keeps the ``ref`` and ``triton`` paths as strict. `eps` (the forward's;
    None for the backward, which has none) must be >= 0, with or without LayerNorm, as in C++."""
    if eps is not None and not eps >= 0.0:  # NaN too
        raise ValueError(f"adapter_bottleneck: eps must be >= 0, got {eps}")
    if x.dim() < 1:
        raise ValueError("adapter_bottleneck: x must have shape (..., C), got a 0-d tensor")
    c = x.shape[-1]
    if c < 1:
        raise ValueError(f"adapter_bottleneck: x must have C >= 1 channels, got shape {tuple(x.shape)}")
    if down_weight.dim() != 2 or down_weight.shape[1] != c or down_weight.shape[0] < 1:
        raise ValueError(f"adapter_bottleneck: down_weight must be (R, {c}) with R >= 1, got "
                         f"{tuple(down_weight.shape)}")
    r = down_weight.shape[0]
    if tuple(up_weight.shape) != (c, r):
        raise ValueError(f"adapter_bottleneck: up_weight must be (C, R) = ({c}, {r}), got {tuple(up_weight.shape)}")
    for name, t, n in (("down_bias", down_bias, r), ("up_bias", up_bias, c), ("ln_weight", ln_weight, c),
                       ("ln_bias", ln_bias, c)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"adapter_bottleneck: {name} must be ({n},), got {tuple(t.shape)}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("adapter_bottleneck: ln_bias is given without ln_weight; LayerNorm is applied iff "
                         "ln_weight is given")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"adapter_bottleneck: residual must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter_bottleneck: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in FP32_FP16_BF16_FP64:
        raise TypeError(f"adapter_bottleneck: dtype must be one of float32, float16, bfloat16, float64; got {x.dtype}")
    for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                    ("up_bias", up_bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"adapter_bottleneck: x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"adapter_bottleneck: x and {name} must be on the same device, got {x.device} and "
                             f"{t.device}")


def check_backward_inputs(grad_out, x, down_weight, down_bias, up_weight, activation, ln_weight, ln_bias, z, mean,
                          rstd) -> None:
    """The checks of _adapter_bottleneck_backward (csrc/ops/adapter_bottleneck.h prepare_adapter_backward), for
    the Triton backend: x (T, C) and the parameters as in the forward, grad_out like x, z (T, R) and
    mean/rstd (T) with LayerNorm, (0) without, in fp32 on x's device."""
    check_adapter_inputs(x, down_weight, down_bias, up_weight, None, activation, ln_weight, ln_bias, None)
    if x.dim() != 2:
        raise ValueError(f"_adapter_bottleneck_backward: x must be (T, C), got shape {tuple(x.shape)}")
    (t, _), r = x.shape, down_weight.shape[0]
    nstat = t if ln_weight is not None else 0
    for name, v, shape in (("grad_out", grad_out, tuple(x.shape)), ("z", z, (t, r)), ("mean", mean, (nstat,)),
                           ("rstd", rstd, (nstat,))):
        dtype = x.dtype if name == "grad_out" else torch.float32
        if tuple(v.shape) != shape or v.dtype != dtype or v.device != x.device:
            raise ValueError(f"_adapter_bottleneck_backward: {name} has shape {tuple(v.shape)}, dtype {v.dtype} on "
                             f"{v.device}; expected {shape}, {dtype} on {x.device}")


# ---------------------------------------------------------------------------------------------
# Fake functions and autograd, shared by every namespace that carries the op.

def _fake_forward(x, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_weight, ln_bias, eps,
                  residual):
    t, r = x.shape[0], down_weight.shape[0]
    nstat = t if ln_weight is not None else 0
    f32 = torch.float32
    return (x.new_empty(x.shape), x.new_empty((t, r), dtype=f32), x.new_empty((nstat,), dtype=f32),
            x.new_empty((nstat,), dtype=f32))


def _fake_backward(grad_out, x, down_weight, down_bias, up_weight, scale, activation, ln_weight, ln_bias, z, mean,
                   rstd, residual_is_x):
    c, r = x.shape[1], down_weight.shape[0]
    nln = c if ln_weight is not None else 0
    return (x.new_empty(x.shape), x.new_empty((r, c)), x.new_empty((r,)), x.new_empty((c, r)), x.new_empty((c,)),
            x.new_empty((nln,)), x.new_empty((nln,)))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_weight, ln_bias, eps, residual = inputs
    _, z, mean, rstd = output
    # The only activations kept: x, z (T, R) fp32 and mean/rstd (T) fp32. The parameters are saved
    # too (they are not activations: no extra memory).
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, ln_weight, ln_bias, z, mean, rstd)
    ctx.hparams = (float(scale), activation)
    ctx.has = (down_bias is not None, up_bias is not None, ln_weight is not None, ln_bias is not None,
               residual is not None)


def _make_backward(ns: str):
    def backward(ctx, grad_out, _gz, _gmean, _grstd):
        x, down_weight, down_bias, up_weight, ln_weight, ln_bias, z, mean, rstd = ctx.saved_tensors
        scale, activation = ctx.hparams
        has_db, has_ub, has_lnw, has_lnb, has_res = ctx.has
        need = ctx.needs_input_grad
        gx, gdw, gdb, guw, gub, glnw, glnb = getattr(torch.ops, ns)._adapter_bottleneck_backward(
            grad_out.contiguous(), x, down_weight, down_bias, up_weight, scale, activation, ln_weight, ln_bias, z,
            mean, rstd, not has_res)
        return (gx if need[0] else None, gdw if need[1] else None, gdb if has_db and need[2] else None,
                guw if need[3] else None, gub if has_ub and need[4] else None, None, None,
                glnw if has_lnw and need[7] else None, glnb if has_lnb and need[8] else None, None,
                grad_out if has_res and need[10] else None)
    return backward


def _triton():
    """The Triton backend as the dispatcher ops llmkern_triton::adapter_bottleneck and its backward, checked
    here as the C++ ops check theirs. The launchers take contiguous rows and vectors, and the activation
    as its code (1 + its index)."""
    from llmkern.triton_kernels import adapter_bottleneck as tk

    def code(activation: str) -> int:  # the name was checked
        return ACTIVATIONS.index(activation) + 1

    def vec(t):
        return None if t is None else t.contiguous()

    def fwd(x, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_weight, ln_bias, eps, residual):
        check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, residual,
                             eps)
        if x.dim() != 2:
            raise ValueError(f"adapter_bottleneck: x must be (T, C) here (the op flattens x), got {tuple(x.shape)}")
        return tuple(tk.adapter_bottleneck_fwd(
            x.contiguous(), down_weight.contiguous(), vec(down_bias), up_weight.contiguous(), vec(up_bias), scale,
            code(activation), vec(ln_weight), vec(ln_bias), eps, vec(residual)))

    def bwd(grad_out, x, down_weight, down_bias, up_weight, scale, activation, ln_weight, ln_bias, z, mean, rstd,
            residual_is_x):
        check_backward_inputs(grad_out, x, down_weight, down_bias, up_weight, activation, ln_weight, ln_bias, z, mean,
                              rstd)
        return tuple(tk.adapter_bottleneck_bwd(
            grad_out.contiguous(), x.contiguous(), down_weight.contiguous(), vec(down_bias), up_weight.contiguous(),
            scale, code(activation), vec(ln_weight), vec(ln_bias), z.contiguous(), vec(mean), vec(rstd),
            residual_is_x))

    return {"adapter_bottleneck": fwd, "_adapter_bottleneck_backward": bwd}


UNAVAILABLE = _backends.register_op(
    "adapter_bottleneck", fake=_fake_forward, triton=_triton,
    backward=_backends.Backward(name="_adapter_bottleneck_backward", fake=_fake_backward, formula=_make_backward,
                                setup_context=_setup_context), autocast="lower")


def adapter_bottleneck(x, down_weight, down_bias, up_weight, up_bias, scale: float = 1.0,
                       activation: Activation = "relu", ln_weight=None, ln_bias=None, eps: float = 1e-5,
                       residual=None, *, backend: _backends.Backend | None = None) -> torch.Tensor:
    """Fused ``r + scale·up(act(down(LN?(x))))`` (see the module docstring). x: (..., C).

    ``residual=None`` is the series form (r = x); a tensor shaped like x is the parallel form.
    ``backend`` (or ``LLMKERN_BACKEND``) forces a backend; a refused one raises
    :class:`~llmkern.ops._backends.BackendRefused` with the reason.
    """
    x, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias, residual = _backends.autocast(
        "adapter_bottleneck", x, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias, residual)
    check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, activation, ln_weight, ln_bias, residual, eps)
    tensors = [t for t in (x, down_weight, down_bias, up_weight, up_bias, ln_weight, ln_bias, residual)
               if t is not None]
    chosen = _backends.choose("adapter_bottleneck", tensors, DTYPES, backend)
    if chosen == "ref":
        return _backends.run("adapter_bottleneck", chosen, adapter_bottleneck_ref, x, down_weight, down_bias,
                             up_weight, up_bias, scale, activation, ln_weight, ln_bias, eps, residual)
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    res2 = residual.reshape(-1, c) if residual is not None else None
    op = _backends.op("adapter_bottleneck", chosen)
    out = op(x2, down_weight, down_bias, up_weight, up_bias, float(scale), activation, ln_weight, ln_bias,
             float(eps), res2)[0]
    return out.reshape(x.shape)
