"""fused_adamw_: one multi-tensor AdamW (or Adam) step, in place, with the loss-scale unscale, the
gradient clip, the overflow skip and the 16-bit model-copy write fused into the same pass.

    fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf,
                 grad_coef, lr=, beta1=, beta2=, eps=, weight_decay=, decoupled_weight_decay=True,
                 state_rounding="nearest", rounding_seed=0, element_offset=0, backend=None)

Lists hold one tensor per parameter (any shapes; tensor j of every list has the shape and strides of
params[j]); max_exp_avg_sqs is empty, or AMSGrad's running max. `step`, `found_inf` and `grad_coef`
are float32 one-element tensors on the parameters' device, so a GPU step never waits for the host:
  step       the 1-based number t of this update (the caller counts it only for clean steps); a
             step < 1 with found_inf 0 is refused before anything is written (ValueError for CPU
             tensors; on CUDA the kernels write nothing and a device-side assert reports it, as a
             raise would need a host sync: _multi_tensor.check_step)
  found_inf  nonzero: the gradients overflowed and nothing is changed
  grad_coef  every gradient is multiplied by it; = clip_coef / loss_scale
state_rounding: how bf16 moments are stored after the fp32 update (fp32 moments are not rounded):
  "nearest"     round to nearest even (the default)
  "stochastic"  round up with probability equal to the dropped fraction, so the stored value is
                unbiased; the random bits are a function of (rounding_seed, step, the element's
                index in the call's concatenated params + element_offset) only (csrc/include/llmkern/
                rng.h), so every backend (cpu, cuda/emu, triton, ref) stores the same bits for the
                same fp32 value, and a 1-D shard of a flat tensor stepped with element_offset = its
                start draws the bits of the whole tensor stepped at once (ZeRO)
Hyper-parameters are checked by check_hyperparameters (which the optimizers call at construction)
and again by every backend, with the same ranges and messages (csrc/ops/fused_adamw.h).
Schema and per-dtype rules: csrc/ops/fused_adamw.cpp. Element math: csrc/include/llmkern/optim_math.h.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from llmkern import _rng
from llmkern.ops import _backends
from llmkern.ops._backends import FP32_FP16_BF16, FP32_FP16_BF16_FP64, Backend
from llmkern.ops._multi_tensor import (check_hyper, check_int64, check_model_copies, check_scalar_tensors,
                                       check_step, check_tensor_lists)

__all__ = ["fused_adamw_", "fused_adamw_ref", "check_hyperparameters", "StateRounding", "UNAVAILABLE"]

Tensors = Sequence[torch.Tensor]
# fp64 only for the reference, which is also the fp64 test oracle.
DTYPES = {"cpu": FP32_FP16_BF16, "cuda": FP32_FP16_BF16, "emu": FP32_FP16_BF16, "triton": FP32_FP16_BF16,
          "ref": FP32_FP16_BF16_FP64}
StateRounding = Literal["nearest", "stochastic"]
_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "model_copies")


def _fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr, beta1,
          beta2, eps, weight_decay, decoupled_weight_decay, stochastic_rounding=False, rounding_seed=0,
          element_offset=0):
    return None  # in place on its inputs, nothing new is allocated


def check_hyperparameters(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """ValueError naming the first hyper-parameter out of its range, as every backend (csrc/ops/fused_adamw.h):
    lr in [0, inf), beta1 and beta2 in [0, 1), eps in (0, inf), weight_decay in [0, inf)."""
    check_hyper(lr, "lr", 0.0, False, math.inf, True)
    check_hyper(beta1, "beta1", 0.0, False, 1.0, True)
    check_hyper(beta2, "beta2", 0.0, False, 1.0, True)
    check_hyper(eps, "eps", 0.0, True, math.inf, True)
    check_hyper(weight_decay, "weight_decay", 0.0, False, math.inf, True)


def check_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr,
               beta1, beta2, eps, weight_decay, decoupled_weight_decay, stochastic_rounding=False, rounding_seed=0,
               element_offset=0, *, fp64: bool = False) -> None:
    """Every check of csrc/ops/fused_adamw.h, in its order, for the backends written in Python (triton, and
    ref with fp64 for the fp64 oracle): nothing is written after one fails."""
    check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    check_int64(element_offset, "element_offset", 0)
    device = step.device
    check_scalar_tensors((step, found_inf, grad_coef), device)
    check_step(step, found_inf)
    lists = dict(zip(_LISTS, (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies)))
    check_tensor_lists(lists, ("max_exp_avg_sqs", "model_copies"), device, fp64=fp64)
    for j in range(len(params)):
        m, v = exp_avgs[j].dtype, exp_avg_sqs[j].dtype
        if m == v == torch.float64:
            continue  # the fp64 oracle (check_tensor_lists allowed it)
        if m != v or m not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"exp_avgs[{j}] and exp_avg_sqs[{j}] must both be float32 or both bfloat16, got "
                               f"{m} and {v}")
        if max_exp_avg_sqs and max_exp_avg_sqs[j].dtype != v:
            raise RuntimeError(f"max_exp_avg_sqs[{j}] must have exp_avg_sqs[{j}]'s dtype {v}, got "
                               f"{max_exp_avg_sqs[j].dtype}")
    check_model_copies(params, model_copies)


def _triton():
    from llmkern.triton_kernels.fused_adamw import fused_adamw_triton_

    def fused_adamw_triton(*args) -> None:
        check_args(*args)
        fused_adamw_triton_(*args)

    return {"fused_adamw_": fused_adamw_triton}


UNAVAILABLE: dict[str, str] = _backends.register_op("fused_adamw_", fake=_fake, triton=_triton)


def check_devices(op: str, lists, scalars) -> list[torch.Tensor]:
    """Every tensor of one call on one device; the message names the first one that is not. Returns
    the tensors that choose() probes: step and the first tensor of each list."""
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
    return [scalars[0]] + [lst[0] for lst in lists if lst]


def fused_adamw_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                 max_exp_avg_sqs: Tensors, model_copies: Tensors, step: torch.Tensor, found_inf: torch.Tensor,
                 grad_coef: torch.Tensor, *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = True,
                 state_rounding: StateRounding = "nearest", rounding_seed: int = 0, element_offset: int = 0,
                 backend: Backend | None = None) -> None:
    check_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    if state_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', got {state_rounding!r}")
    check_int64(rounding_seed, "rounding_seed")
    check_int64(element_offset, "element_offset", 0)
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(model_copies), step, found_inf, grad_coef, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(decoupled_weight_decay), state_rounding == "stochastic", rounding_seed,
            element_offset)
    probe = check_devices("fused_adamw_", args[:6], (step, found_inf, grad_coef))
    b = _backends.choose("fused_adamw_", probe, DTYPES, backend)
    if b == "ref":
        check_args(*args, fp64=True)
    _backends.run("fused_adamw_", b, fused_adamw_ref, *args)


def _store(dst: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, shift: int) -> None:
    """dst <- x, to nearest, or stochastically with bits shift..shift+15 of the draws h."""
    dst.copy_(x if h is None else _rng.bf16_round_stochastic(x, h >> shift))


@torch.no_grad()
def fused_adamw_ref(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef, lr,
                    beta1, beta2, eps, weight_decay, decoupled_weight_decay=True, stochastic_rounding=False,
                    rounding_seed=0, element_offset=0) -> None:
    """Pure-PyTorch twin of fused_adamw_ on any device. It computes in fp32, or in fp64 when given fp64
    tensors (the test oracle). It reads found_inf and step on the host, so on a GPU it synchronises.
    Stochastic rounding of bf16 moments draws the bits of rng.h, as every backend does. The arguments
    are checked by fused_adamw_ (check_args), not here."""
    if float(found_inf) != 0.0:
        return
    t = float(step)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    coef = grad_coef.item()
    key = _rng.rounding_key(rounding_seed, int(t))
    base = element_offset  # the call-wide index of tensor j's first element, + element_offset
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
