"""fused_adamw_: one multi-tensor AdamW (or Adam) step, in place, with the loss-scale unscale, the
gradient clip, the overflow skip and the 16-bit model-copy write fused into the same pass.

    fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf,
                 grad_coef, lr=, beta1=, beta2=, eps=, weight_decay=, decoupled_weight_decay=True,
                 state_rounding="nearest", rounding_seed=0, backend=None)

Lists hold one tensor per parameter (any shapes; tensor j of every list has the shape and strides of
params[j]); max_exp_avg_sqs is empty, or AMSGrad's running max. `step`, `found_inf` and `grad_coef` are float32 one-element tensors on the parameters'
device, so a GPU step never waits for the host:
  step       the 1-based number t of this update (the caller counts it only for clean steps)
  found_inf  nonzero: the gradients overflowed and nothing is changed
  grad_coef  every gradient is multiplied by it; = clip_coef / loss_scale
state_rounding: how bf16 moments are stored after the fp32 update (fp32 moments are not rounded):
  "nearest"     round to nearest even (the default)
  "stochastic"  round up with probability equal to the dropped fraction, so the stored value is
                unbiased; the random bits are a function of (rounding_seed, step, the element's
                index in the call's concatenated params) only (csrc/include/llmkern/rng.h), so every
                backend (cpu, cuda/emu, triton, ref) stores the same bits for the same fp32 value
Schema and per-dtype rules: csrc/ops/fused_adamw.cpp. Element math: csrc/include/llmkern/optim_math.h.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from llmkern.ops import _rng
from llmkern.ops._backends import Backend, choose, register_compiled_op

Tensors = Sequence[torch.Tensor]
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
# fp64 only for the reference, which is also the fp64 test oracle.
DTYPES = {"cpu": _HALF_AND_FLOAT, "cuda": _HALF_AND_FLOAT, "emu": _HALF_AND_FLOAT, "triton": _HALF_AND_FLOAT,
          "ref": _HALF_AND_FLOAT + (torch.float64,)}
SUPPORTED: tuple[Backend, ...] = ("cpu", "cuda", "triton", "emu", "ref")
StateRounding = Literal["nearest", "stochastic"]
_INT64 = (1 << 63) - 1


def _fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr, beta1,
          beta2, eps, weight_decay, decoupled_weight_decay, stochastic_rounding=False, rounding_seed=0):
    return None  # in place on its inputs, nothing new is allocated


# The same schema is defined by _C (namespace llmkern, CPU and CUDA kernels) and by _C_emu
# (namespace llmkern_emu: the CUDA kernel compiled for the CPU).
UNAVAILABLE: dict[str, str] = register_compiled_op("fused_adamw_", _fake)


def check_hyperparameters(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Raise ValueError naming the first bad hyper-parameter."""
    if not (isinstance(lr, (int, float)) and 0.0 <= lr < math.inf):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    if not 0.0 < eps < math.inf:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def check_devices(op: str, lists, scalars) -> None:
    """Every tensor of one call on one device; the message names the first one that is not."""
    device = scalars[0].device
    names = ("step", "found_inf", "grad_coef")
    for name, t in zip(names, scalars):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but step is on {device}")
    for k, lst in enumerate(lists):
        for j, t in enumerate(lst):
            if t.device != device:
                raise ValueError(f"{op}: tensor {j} of list {k} is on {t.device} but step is on {device}; "
                                 f"one call takes tensors on one device")


def fused_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                 max_exp_avg_sqs: Tensors, model_copies: Tensors, step: torch.Tensor, found_inf: torch.Tensor,
                 grad_coef: torch.Tensor, *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = True,
                 state_rounding: StateRounding = "nearest", rounding_seed: int = 0,
                 backend: Backend | None = None) -> None:
    check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    if state_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', got {state_rounding!r}")
    if not (isinstance(rounding_seed, int) and -_INT64 - 1 <= rounding_seed <= _INT64):
        raise ValueError(f"rounding_seed must be an int64, got {rounding_seed!r}")
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(model_copies), step,
            found_inf, grad_coef, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            bool(decoupled_weight_decay), state_rounding == "stochastic", int(rounding_seed))
    check_devices("fused_adamw_", args[:6], (step, found_inf, grad_coef))
    probe = [step] + [lst[0] for lst in args[:6] if lst]
    b = choose("fused_adamw_", probe, DTYPES, backend, SUPPORTED, UNAVAILABLE)
    if b == "cpu" or b == "cuda":
        torch.ops.llmkern.fused_adamw_(*args)
    elif b == "emu":
        torch.ops.llmkern_emu.fused_adamw_(*args)
    elif b == "triton":
        from llmkern.triton_kernels.fused_adamw import fused_adamw_triton_
        fused_adamw_triton_(*args)
    else:
        fused_adamw_ref(*args)


def fused_adam_(*args, **kwargs) -> None:
    """Adam with L2 weight decay (g += wd * p before the moments): fused_adamw_ with
    decoupled_weight_decay=False."""
    fused_adamw_(*args, decoupled_weight_decay=False, **kwargs)


def _store(dst: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, shift: int) -> None:
    """dst <- x, to nearest, or stochastically with bits shift..shift+15 of the draws h."""
    dst.copy_(x if h is None else _rng.bf16_round_stochastic(x, h >> shift))


@torch.no_grad()
def fused_adamw_ref(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr,
                    beta1, beta2, eps, weight_decay, decoupled_weight_decay=True, stochastic_rounding=False,
                    rounding_seed=0) -> None:
    """Pure-PyTorch twin of fused_adamw_ on any device. It computes in fp32, or in fp64 when given fp64
    tensors (the test oracle). It reads found_inf and step on the host, so on a GPU it synchronises.
    Stochastic rounding of bf16 moments draws the bits of rng.h, as every backend does."""
    if float(found_inf) != 0.0:
        return
    t = float(step)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    coef = grad_coef.item()
    key = _rng.rounding_key(rounding_seed, int(t))
    base = 0  # the call-wide index of tensor j's first element
    for j, p in enumerate(params):
        base += p.numel()
        h = None  # the draws of stochastic rounding (int64 holding 32 bits), or None: nearest
        if stochastic_rounding and exp_avgs[j].dtype == torch.bfloat16:
            h = _rng.counter_hash(key, _rng.storage_index(p) + (base - p.numel()))
        ct = torch.promote_types(p.dtype, torch.float32)
        pf, m, v = p.to(ct), exp_avgs[j].to(ct), exp_avg_sqs[j].to(ct)
        g = grads[j].to(ct) * coef
        if decoupled_weight_decay:
            pf = pf * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * pf
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        vhat = v
        if max_exp_avg_sqs:
            vhat = torch.maximum(max_exp_avg_sqs[j].to(ct), v)
            _store(max_exp_avg_sqs[j], vhat, h, 16)  # v's bits: the stored max stays >= the stored v
        pf = pf - (lr / bc1) * m / (vhat.sqrt() / math.sqrt(bc2) + eps)
        p.copy_(pf)
        _store(exp_avgs[j], m, h, 0)
        _store(exp_avg_sqs[j], v, h, 16)
        if model_copies:
            model_copies[j].copy_(pf)
