"""Triton kernel of llmkern::fused_adamw_ (see csrc/ops/fused_adamw.cpp for the argument meanings and
csrc/include/llmkern/optim_math.h for the element math, which this mirrors).

One launch per tensor (triton_kernels/_optim.py says why). Per launch the kernel reads found_inf and
the step and skips every load and store when found_inf is set or the step is < 1 (no update is numbered
0: 1 - beta^0 = 0 would divide; llmkern/ops/_multi_tensor.py check_step reports it), so such a step
moves no memory and never syncs.

Constants derived from the hyper-parameters (1 - beta, 1 - lr*wd) are computed in Python doubles
and rounded once: 1 - 0.999f in fp32 is 1.3e-5 off, 100x PyTorch's own fp32 error. For the same
reason the bias corrections (lr/bc1 and 1/sqrt(bc2)) are computed on the device in fp64 by two
tiny torch ops, without reading the step count on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern._rng import as_int32, seed_key
from llmkern.triton_kernels._aot import AotConfig
from llmkern.triton_kernels._optim import BLOCK, aot_variant, to_storage
from llmkern.triton_kernels._rng import bf16_stochastic, counter_hash, rounding_key


@triton.jit(do_not_specialize=["base", "rng_key"])  # both change from call to call
def _fused_adamw_fwd_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, n, found_inf_ptr, grad_coef_ptr,
                            coefs_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                            decay, step_ptr, base, rng_key,
                            DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_COPY: tl.constexpr,
                            STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(step_ptr)
    skip = (tl.load(found_inf_ptr) != 0.0) | (t < 1.0) | (t != t)  # an overflow, a step < 1 or NaN
    mask = (offs < n) & (skip == 0)
    coef = tl.load(grad_coef_ptr)
    step_size = tl.load(coefs_ptr)
    inv_sqrt_bc2 = tl.load(coefs_ptr + 1)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DECOUPLED:
        p = p * decay
    else:
        g = g + weight_decay * p
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    vhat = v
    if AMSGRAD:
        vhat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
    if STOCHASTIC:
        # rng.h: key = rounding_key(seed key, step); element k = base + offs of the call draws
        # (base includes element_offset)
        # h = counter_hash(key, k); m takes its low 16 bits, v and AMSGrad's max the high 16.
        key = rounding_key(rng_key, t.to(tl.int32).to(tl.uint32))
        c = base + offs
        h = counter_hash(c.to(tl.uint32), (c >> 32).to(tl.uint32), key)
        tl.store(m_ptr + offs, bf16_stochastic(m, h), mask=mask)
        tl.store(v_ptr + offs, bf16_stochastic(v, h >> 16), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, bf16_stochastic(vhat, h >> 16), mask=mask)
    else:
        tl.store(m_ptr + offs, to_storage(m, m_ptr), mask=mask)
        tl.store(v_ptr + offs, to_storage(v, v_ptr), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, to_storage(vhat, vmax_ptr), mask=mask)
    p = p - step_size * m / (tl.sqrt(vhat) * inv_sqrt_bc2 + eps)
    tl.store(p_ptr + offs, to_storage(p, p_ptr), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, to_storage(p, copy_ptr), mask=mask)


# Runtime argument types besides the pointers to the lists' tensors (set per variant): fp32.
_SCALARS = {**dict.fromkeys(("found_inf_ptr", "grad_coef_ptr", "coefs_ptr", "step_ptr"), "*fp32"),
            **dict.fromkeys(("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay"),
                            "fp32"), "n": "i64", "base": "i64"}


def _aot_config(pd, gd, sd, cd, amsgrad: bool, stochastic: bool) -> AotConfig:
    """The variant for (param, grad, state, model copy) dtypes (cd None: no copy). ptxas -v measured
    56 registers (72 with AMSGrad) and no spills for fp32 master + fp16 copy; with stochastic
    rounding of bf16 states 64-96 (96: fp32 master, 16-bit copy and AMSGrad), no spills (255 is the
    limit at 4 warps)."""
    pointers = {"p_ptr": pd, "g_ptr": gd, "m_ptr": sd, "v_ptr": sd, "vmax_ptr": sd if amsgrad else pd,
                "copy_ptr": cd or pd}
    return aot_variant(_fused_adamw_fwd_kernel, pointers, dict(p=pd, g=gd, s=sd, copy=cd), _SCALARS, DECOUPLED=True,
                       AMSGRAD=amsgrad, HAS_COPY=cd is not None, STOCHASTIC=stochastic)


# (param, grad, state, model copy) dtypes as the optimizers use them, with and without AMSGrad, and
# with stochastic rounding where the states are bf16.
_COMBOS = [(torch.float32, torch.float32, torch.float32, None),
           (torch.float32, torch.float16, torch.float32, torch.float16),
           (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
           (torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
           (torch.float16, torch.float16, torch.float32, None),
           (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
           (torch.float32, torch.float16, torch.bfloat16, torch.float16)]
AOT_CONFIGS: list[AotConfig] = [_aot_config(*combo, amsgrad, sr) for combo in _COMBOS
                                for amsgrad, sr in [(False, False), (True, False)]
                                + ([(False, True), (True, True)] if combo[2] == torch.bfloat16 else [])]


def fused_adamw_triton_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef,
                        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, stochastic_rounding=False,
                        rounding_seed=0, element_offset=0) -> None:
    """Launcher, one launch per tensor; the arguments were checked by the op (llmkern/ops/fused_adamw.py)."""
    t = step.double()
    coefs = torch.cat([lr / (1.0 - beta1 ** t), (1.0 - beta2 ** t).rsqrt()]).float()
    key = as_int32(seed_key(rounding_seed))
    base = element_offset  # the call-wide index of tensor j's first element + element_offset (the rounding counter)
    for j, p in enumerate(params):
        n = p.numel()
        base += n
        if n == 0:
            continue
        copy = model_copies[j] if model_copies else p
        vmax = max_exp_avg_sqs[j] if max_exp_avg_sqs else p
        _fused_adamw_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[j], exp_avgs[j], exp_avg_sqs[j], vmax, copy, n, found_inf, grad_coef, coefs, beta1, 1.0 - beta1,
            beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, step, base - n, key,
            DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(max_exp_avg_sqs), HAS_COPY=bool(model_copies),
            STOCHASTIC=bool(stochastic_rounding) and exp_avgs[j].dtype == torch.bfloat16, BLOCK=BLOCK)
