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

from llmkern.ops._rng import seed_key
from llmkern.triton_kernels._aot import TL_DTYPE

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
def _fmix32(h):
    """MurmurHash3's finalizer on uint32 (rng.h fmix32; products wrap mod 2^32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _to_bf16_stochastic(x, r16):
    """rng.h bf16_bits_stochastic: add 16 random bits below bf16's mantissa, truncate; NaN -> 0x7FC0."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (r16 & 0xFFFF)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["base", "rng_key"])  # both change from call to call
def _fused_adamw_fwd_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, n, found_inf_ptr, grad_coef_ptr,
                            coefs_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                            decay, step_ptr, base, rng_key,
                            DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_COPY: tl.constexpr,
                            STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
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
    if STOCHASTIC:
        # rng.h: key = rounding_key(rng_key, step); element k = base + offs of the call draws
        # h = counter_hash(key, k); m takes its low 16 bits, v and AMSGrad's max the high 16.
        step = tl.load(step_ptr).to(tl.int32).to(tl.uint32)
        key = _fmix32(tl.cast(rng_key, tl.uint32, bitcast=True) ^ _fmix32(step ^ 0x9E3779B9))
        c = base + offs
        h = _fmix32(_fmix32(c.to(tl.uint32) ^ key) ^ (c >> 32).to(tl.uint32) ^ 0x85EBCA6B)
        tl.store(m_ptr + offs, _to_bf16_stochastic(m, h), mask=mask)
        tl.store(v_ptr + offs, _to_bf16_stochastic(v, h >> 16), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, _to_bf16_stochastic(vhat, h >> 16), mask=mask)
    else:
        tl.store(m_ptr + offs, _to_storage(m, m_ptr), mask=mask)
        tl.store(v_ptr + offs, _to_storage(v, v_ptr), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, _to_storage(vhat, vmax_ptr), mask=mask)
    p = p - step_size * m / (tl.sqrt(vhat) * inv_sqrt_bc2 + eps)
    tl.store(p_ptr + offs, _to_storage(p, p_ptr), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, _to_storage(p, copy_ptr), mask=mask)


_TL = TL_DTYPE


_OPTIONAL_LISTS = ("max_exp_avg_sqs", "model_copies", "momentum_buffers")


def check_lists(lists: dict, scalars) -> None:
    """The checks of csrc/include/llmkern/multi_tensor.h and the ops' model-copy rule, with their
    wording: the first list is the reference; the others are as long (those in _OPTIONAL_LISTS may
    be empty), and tensor j of each has params[j]'s shape and strides, dense, in fp32/fp16/bf16."""
    for name, t in zip(("step", "found_inf", "grad_coef"), scalars):
        if t.dtype != torch.float32 or t.numel() != 1:
            raise RuntimeError(f"{name} must be a float32 tensor with one element, got {t.dtype} with shape "
                               f"{tuple(t.shape)}")
    (ref_name, ref), *others = lists.items()
    for name, lst in others:
        optional = name in _OPTIONAL_LISTS
        if len(lst) != len(ref) and not (optional and not lst):
            raise RuntimeError(f"{name} has {len(lst)} tensors but {ref_name} has {len(ref)}"
                               + (" (it may also be empty)" if optional else ""))
    for j, p in enumerate(ref):
        for name, lst in lists.items():
            if not lst:
                continue
            t = lst[j]
            if t.dtype not in _TL:
                raise RuntimeError(f"{name}[{j}] must be float32, float16 or bfloat16, got {t.dtype}")
            if t.shape != p.shape:
                raise RuntimeError(f"{name}[{j}] has shape {tuple(t.shape)} but {ref_name}[{j}] has shape "
                                   f"{tuple(p.shape)}")
            if p.numel() > 1 and (t.stride() != p.stride() or not is_non_overlapping_and_dense(t)):
                raise RuntimeError(f"{name}[{j}] must be dense with the same strides as {ref_name}[{j}] (strides "
                                   f"{t.stride()} vs {p.stride()}); pass .contiguous() tensors or tensors "
                                   f"created with torch.zeros_like(param)")
        copies = lists.get("model_copies")
        if copies and (p.dtype != torch.float32 or copies[j].dtype == torch.float32):
            raise RuntimeError(f"with model_copies, params[{j}] must be the float32 master and model_copies[{j}] "
                               f"float16 or bfloat16, got {p.dtype} and {copies[j].dtype}")


def _aot_configs() -> list[SimpleNamespace]:
    """The variants the static check (tests/static, llmkern.kernel_report) compiles for sm_80/sm_90:
    (param, grad, state, model copy) dtypes as the optimizers use them, with and without AMSGrad.
    ptxas -v measured 56 registers (72 with AMSGrad) and no spills for fp32 master + fp16 copy;
    with stochastic rounding of bf16 states 64-96 (96: fp32 master, 16-bit copy and AMSGrad), no
    spills (255 is the limit at 4 warps)."""
    combos = [(torch.float32, torch.float32, torch.float32, None),
              (torch.float32, torch.float16, torch.float32, torch.float16),
              (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
              (torch.float16, torch.float16, torch.float32, None),
              (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float32, torch.float16, torch.bfloat16, torch.float16)]
    out = []
    for pd, gd, sd, cd in combos:
        for ams, sr in [(False, False), (True, False)] + ([(False, True), (True, True)] if sd == torch.bfloat16 else []):
            sig = {"p_ptr": f"*{_TL[pd]}", "g_ptr": f"*{_TL[gd]}", "m_ptr": f"*{_TL[sd]}", "v_ptr": f"*{_TL[sd]}",
                   "vmax_ptr": f"*{_TL[sd] if ams else _TL[pd]}", "copy_ptr": f"*{_TL[cd or pd]}", "n": "i64",
                   "found_inf_ptr": "*fp32", "grad_coef_ptr": "*fp32", "coefs_ptr": "*fp32", "beta1": "fp32",
                   "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
                   "weight_decay": "fp32", "decay": "fp32", "step_ptr": "*fp32", "base": "i64", "rng_key": "i32",
                   "DECOUPLED": "constexpr", "AMSGRAD": "constexpr", "HAS_COPY": "constexpr",
                   "STOCHASTIC": "constexpr", "BLOCK": "constexpr"}
            consts = {"DECOUPLED": True, "AMSGRAD": ams, "HAS_COPY": cd is not None, "STOCHASTIC": sr, "BLOCK": BLOCK}
            name = (f"p={_TL[pd]},g={_TL[gd]},s={_TL[sd]},copy={_TL[cd] if cd else '-'},amsgrad={int(ams)},"
                    f"sr={int(sr)},w4,s3")
            out.append(SimpleNamespace(kernel=_fused_adamw_fwd_kernel, signature=sig, constexprs=consts,
                                       num_warps=4, num_stages=3, name=name))
    return out


AOT_CONFIGS = _aot_configs()


def fused_adamw_triton_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, model_copies, step, found_inf, grad_coef,
                        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, stochastic_rounding=False,
                        rounding_seed=0) -> None:
    """Launcher: the C++ op's checks first (nothing is written when one fails), then one launch per
    tensor."""
    check_lists({"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                 "max_exp_avg_sqs": max_exp_avg_sqs, "model_copies": model_copies}, (step, found_inf, grad_coef))
    for j in range(len(params)):
        if exp_avgs[j].dtype != exp_avg_sqs[j].dtype or exp_avgs[j].dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"exp_avgs[{j}] and exp_avg_sqs[{j}] must both be float32 or both bfloat16, got "
                               f"{exp_avgs[j].dtype} and {exp_avg_sqs[j].dtype}")
        if max_exp_avg_sqs and max_exp_avg_sqs[j].dtype != exp_avg_sqs[j].dtype:
            raise RuntimeError(f"max_exp_avg_sqs[{j}] must have exp_avg_sqs[{j}]'s dtype {exp_avg_sqs[j].dtype}, "
                               f"got {max_exp_avg_sqs[j].dtype}")
    t = step.double()
    coefs = torch.cat([lr / (1.0 - beta1 ** t), (1.0 - beta2 ** t).rsqrt()]).float()
    key = seed_key(rounding_seed)
    key_i32 = key - (1 << 32) if key >= (1 << 31) else key  # passed as i32, bitcast to uint32 inside
    base = 0  # the call-wide index of tensor j's first element (the rounding counter)
    for j, p in enumerate(params):
        n = p.numel()
        base += n
        if n == 0:
            continue
        copy = model_copies[j] if model_copies else p
        _fused_adamw_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[j], exp_avgs[j], exp_avg_sqs[j], max_exp_avg_sqs[j] if max_exp_avg_sqs else p, copy, n, found_inf, grad_coef, coefs, beta1, 1.0 - beta1,
            beta2, 1.0 - beta2, eps, weight_decay, 1.0 - lr * weight_decay, step, base - n, key_i32,
            DECOUPLED=bool(decoupled_weight_decay), AMSGRAD=bool(max_exp_avg_sqs), HAS_COPY=bool(model_copies),
            STOCHASTIC=bool(stochastic_rounding) and exp_avgs[j].dtype == torch.bfloat16, BLOCK=BLOCK)

