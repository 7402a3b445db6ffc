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

from llmkern.ops import _backends
from llmkern.ops._backends import Backend
from llmkern.ops._multi_tensor import (check_hyper, check_model_copies, check_scalar_tensors, check_step,
                                       check_tensor_lists)
from llmkern.ops.fused_adamw import DTYPES, Tensors, check_devices

__all__ = ["fused_sgd_", "fused_sgd_ref", "check_hyperparameters", "UNAVAILABLE"]


def _fake(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum, dampening,
          weight_decay, nesterov):
    return None  # in place on its inputs, nothing new is allocated


def check_hyperparameters(lr: float, momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool) -> None:
    """ValueError naming the first hyper-parameter out of its range, as every backend (csrc/ops/fused_sgd.h):
    lr in [0, inf), momentum in [0, 1), dampening in [0, 1], weight_decay in [0, inf); Nesterov needs
    momentum > 0 and dampening 0."""
    check_hyper(lr, "lr", 0.0, False, math.inf, True)
    check_hyper(momentum, "momentum", 0.0, False, 1.0, True)
    check_hyper(dampening, "dampening", 0.0, False, 1.0, False)
    check_hyper(weight_decay, "weight_decay", 0.0, False, math.inf, True)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(f"nesterov needs momentum > 0 and dampening == 0, got momentum {momentum:g}, dampening "
                         f"{dampening:g}")


def check_args(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum, dampening,
               weight_decay, nesterov, *, fp64: bool = False) -> None:
    """Every check of csrc/ops/fused_sgd.h, in its order, for the backends written in Python (triton, and ref
    with fp64 for the fp64 oracle): nothing is written after one fails."""
    check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    check_scalar_tensors((step, found_inf, grad_coef), step.device)
    check_step(step, found_inf)
    if (momentum == 0.0) != (len(momentum_buffers) == 0):
        raise RuntimeError(f"momentum_buffers must be given exactly when momentum > 0 (momentum {momentum:g}, "
                           f"{len(momentum_buffers)} buffers)")
    check_tensor_lists({"params": params, "grads": grads, "momentum_buffers": momentum_buffers,
                        "model_copies": model_copies}, ("momentum_buffers", "model_copies"), step.device, fp64=fp64)
    check_model_copies(params, model_copies)


def _triton():
    from llmkern.triton_kernels.fused_sgd import fused_sgd_triton_

    def fused_sgd_triton(*args) -> None:
        check_args(*args)
        fused_sgd_triton_(*args)

    return {"fused_sgd_": fused_sgd_triton}


UNAVAILABLE: dict[str, str] = _backends.register_op("fused_sgd_", fake=_fake, triton=_triton)


def fused_sgd_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, model_copies: Tensors,
               step: torch.Tensor, found_inf: torch.Tensor, grad_coef: torch.Tensor, *, lr: float,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
               nesterov: bool = False, backend: Backend | None = None) -> None:
    check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    args = (list(params), list(grads), list(momentum_buffers), list(model_copies), step, found_inf,
            grad_coef, float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov))
    probe = check_devices("fused_sgd_", args[:4], (step, found_inf, grad_coef))
    b = _backends.choose("fused_sgd_", probe, DTYPES, backend)
    if b == "ref":
        check_args(*args, fp64=True)
    _backends.run("fused_sgd_", b, fused_sgd_ref, *args)


@torch.no_grad()
def fused_sgd_ref(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                  dampening, weight_decay, nesterov) -> None:
    """Pure-PyTorch twin of fused_sgd_ (fp32 math, fp64 for fp64 tensors); syncs on a GPU. The arguments are
    checked by fused_sgd_ (check_args), not here."""
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
