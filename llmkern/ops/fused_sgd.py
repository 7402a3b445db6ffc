"""fused_sgd_: one multi-tensor SGD step (momentum, dampening, Nesterov, L2 weight decay), in place,
with the unscale/clip coefficient, the overflow skip and the 16-bit model-copy write fused in.

    fused_sgd_(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef,
               lr=, momentum=0, dampening=0, weight_decay=0, nesterov=False, backend=None)

The lists and the scalar tensors mean what they mean for llmkern.ops.fused_adamw_;
momentum_buffers is empty when momentum == 0. On step 1 the buffer is set to the gradient, as
torch.optim.SGD does. Schema: csrc/ops/fused_sgd.cpp.
"""
from __future__ import annotations

import math

import torch

from llmkern.ops._backends import Backend, choose, register_compiled_op
from llmkern.ops.fused_adamw import DTYPES, Tensors, check_devices

SUPPORTED: tuple[Backend, ...] = ("cpu", "cuda", "triton", "emu", "ref")

def _fake(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
              dampening, weight_decay, nesterov):
    return None  # in place on its inputs, nothing new is allocated


# The same schema is defined by _C (namespace llmkern, CPU and CUDA kernels) and by _C_emu
# (namespace llmkern_emu: the CUDA kernel compiled for the CPU).
UNAVAILABLE: dict[str, str] = register_compiled_op("fused_sgd_", _fake)


def check_hyperparameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool) -> None:
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(f"nesterov needs momentum > 0 and dampening == 0, got {momentum}, {dampening}")


def fused_sgd_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, model_copies: Tensors,
               step: torch.Tensor, found_inf: torch.Tensor, grad_coef: torch.Tensor, *, lr: float,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
               nesterov: bool = False, backend: Backend | None = None) -> None:
    check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    args = (list(params), list(grads), list(momentum_buffers), list(model_copies), step, found_inf,
            grad_coef, float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov))
    check_devices("fused_sgd_", args[:4], (step, found_inf, grad_coef))
    probe = [step] + [lst[0] for lst in args[:4] if lst]
    b = choose("fused_sgd_", probe, DTYPES, backend, SUPPORTED, UNAVAILABLE)
    if b == "cpu" or b == "cuda":
        torch.ops.llmkern.fused_sgd_(*args)
    elif b == "emu":
        torch.ops.llmkern_emu.fused_sgd_(*args)
    elif b == "triton":
        from llmkern.triton_kernels.fused_sgd import fused_sgd_triton_
        fused_sgd_triton_(*args)
    else:
        fused_sgd_ref(*args)


@torch.no_grad()
def fused_sgd_ref(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                  dampening, weight_decay, nesterov) -> None:
    """Pure-PyTorch twin of fused_sgd_ (fp32 math, fp64 for fp64 tensors); syncs on a GPU."""
    if float(found_inf) != 0.0:
        return
    first = float(step) == 1.0
    coef = grad_coef.item()
    for j, p in enumerate(params):
        ct = torch.promote_types(p.dtype, torch.float32)
        pf = p.to(ct)
        g = grads[j].to(ct) * coef + weight_decay * pf
        d = g
        if momentum != 0.0:
            buf = g if first else momentum * momentum_buffers[j].to(ct) + (1.0 - dampening) * g
            momentum_buffers[j].copy_(buf)
            d = g + momentum * buf if nesterov else buf
        pf = pf - lr * d
        p.copy_(pf)
        if model_copies:
            model_copies[j].copy_(pf)
