"""Triton kernel of llmkern::fused_adamw_ (see csrc/ops/fused_adamw.cpp for the argument meanings and
csrc/include/llmkern/optim_math.h for the element math, which this mirrors).

One launch per tensor: Triton has no portable way to walk a table of raw pointers of different
dtypes (and the interpreter, which the CPU tests use, cannot cast integers to pointers), so the
multi-tensor launch is the CUDA kernel's job. Per launch the kernel reads found_inf and skips
every load and store when it is set, so an overflow step moves no memory and never syncs.

Constants derived from the hyper-parameters (1 - beta, 1 - lr*wd) are computed in Python doubles
and rounded once: 1 - 0.999f in fp32 is 1.3e-5 off, 100x PyTorch's own fp32 error. For the same
reason the bias corrections (lr/bc1 and 1/sqrt(bc2)) are computed on the device in fp64 by two
tiny torch ops, without reading the step count on the host.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

# BLOCK=1024 elements, 4 warps: each thread moves 8 fp32 values per array (two 16-byte vectors), the
# usual choice for a bandwidth-bound elementwise kernel on A100/H100.
BLOCK = 1024


@triton.jit
def _to_storage(x, ptr):
    """fp32 -> the element type of ptr, rounding to nearest even. bf16 is rounded by hand: the
    interpreter truncates on .to(tl.bfloat16) (504 of 1024 randn values differed from torch), and
    on GPUs the three integer ops are free in this memory-bound kernel. NaN stays NaN."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _fused_adamw_fwd_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, n, found_inf_ptr, grad_coef_ptr,
                            coefs_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                            decay,
                            DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_COPY: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    skip = tl.load(found_inf_ptr) != 0.0
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
        tl.store(vmax_ptr + offs, _to_storage(vhat, vmax_ptr), mask=mask)
    p = p - step_size * m / (tl.sqrt(vhat) * inv_sqrt_bc2 + eps)
    tl.store(p_ptr + offs, _to_storage(p, p_ptr), mask=mask)
    tl.store(m_ptr + offs, _to_storage(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _to_storage(v, v_ptr), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, _to_storage(p, copy_ptr), mask=mask)


_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot_configs() -> list[SimpleNamespace]:
    """The variants the static check (tests/static, llmkern.kernel_report) compiles for sm_80/sm_90:
    (param, grad, state, model copy) dtypes as the optimizers use them, with and without AMSGrad.
    ptxas -v measured 56 registers (72 with AMSGrad) and no spills for fp32 master + fp16 copy."""
    combos = [(torch.float32, torch.float32, torch.float32, None),
              (torch.float32, torch.float16, torch.float32, torch.float16),
              (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
              (torch.float16, torch.float16, torch.float32, None)]
    out = []
    for pd, gd, sd, cd in combos:
        for ams in (False, True):
            sig = {"p_ptr": f"*{_TL[pd]}", "g_ptr": f"*{_TL[gd]}", "m_ptr": f"*{_TL[sd]}", "v_ptr": f"*{_TL[sd]}",
                   "vmax_ptr": f"*{_TL[sd] if ams else _TL[pd]}", "copy_ptr": f"*{_TL[cd or pd]}", "n": "i64",
                   "found_inf_ptr": "*fp32", "grad_coef_ptr": "*fp32", "coefs_ptr": "*fp32", "beta1": "fp32",
                   "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
                   "weight_decay": "fp32", "decay": "fp32", "DECOUPLED": "constexpr", "AMSGRAD": "constexpr",
                   "HAS_COPY": "constexpr", "BLOCK": "constexpr"}
            consts = {"DECOUPLED": True, "AMSGRAD": ams, "HAS_COPY": cd is not None, "BLOCK": BLOCK}
            name = f"p={_TL[pd]},g={_TL[gd]},s={_TL[sd]},copy={_TL[cd] if cd else '-'},amsgrad={int(ams)},w4,s3"
            out.append(SimpleNamespace(kernel=_fused_adamw_fwd_kernel, signature=sig, constexprs=consts,
                                       num_warps=4, num_stages=3, name=name))
    return out


AOT_CONFIGS = _aot_configs()


def fused_adamw_triton_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef,
                        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay) -> None:
    """Launcher; the checks are the C++ op's (same dtypes and layout rules)."""
    for j, p in enumerate(params):
        for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                          ("max_exp_avg_sqs", max_exp_avg_sqs), ("model_copies", model_copies)):
            if lst and (lst[j].shape != p.shape or (p.numel() > 1 and lst[j].stride() != p.stride())):
                raise RuntimeError(f"fused_adamw_ (triton): {name}[{j}] must have the shape and strides of "
                                   f"params[{j}], got {tuple(lst[j].shape)}/{lst[j].stride()} vs "
                                   f"{tuple(p.shape)}/{p.stride()}")
        if p.numel() > 1 and not is_non_overlapping_and_dense(p):
            raise RuntimeError(f"fused_adamw_ (triton): params[{j}] must be dense (non-overlapping)")
    t = step.double()
    coefs = torch.cat([lr / (1.0 - beta1 ** t), (1.0 - beta2 ** t).rsqrt()]).float()
    for j, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        copy = model_copies[j] if model_copies else p
        _fused_adamw_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[j], exp_avgs[j], exp_avg_sqs[j], max_exp_avg_sqs[j] if max_exp_avg_sqs else p, copy, n, found_inf, grad_coef, coefs, beta1, 1.0 - beta1,
            beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(max_exp_avg_sqs),
            HAS_COPY=bool(model_copies),
            BLOCK=BLOCK)

