"""Triton kernel of llmkern::fused_sgd_ (argument meanings: csrc/ops/fused_sgd.cpp; element math:
csrc/include/llmkern/optim_math.h sgd_element, which this mirrors line for line).

One launch per tensor (triton_kernels/_optim.py says why). Per launch the
kernel reads found_inf and the step and masks every load and store off when found_inf is set or the
step is < 1 (llmkern/ops/_multi_tensor.py check_step reports that), so such a step moves no memory; it reads the step count on the device too (step 1 sets the momentum buffer to the
gradient, torch.optim.SGD's rule), so nothing waits for the host.

Numerics: fp32 in registers whatever the storage dtypes (the interpreter computes bf16 arithmetic
wrongly, and fp32 is what the CPU/CUDA kernels do); 1 - dampening is formed in a Python double and
rounded once, as the CUDA launcher does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels._aot import AotConfig
from llmkern.triton_kernels._optim import BLOCK, aot_variant, to_storage

# BLOCK (_optim.py: 1024 elements, 4 warps), as fused_adamw: SGD moves 16-20 B/param (fp32 p, g, buf,
# and a 16-bit copy), so it is bandwidth-bound by a wider margin than AdamW (28 B/param, a sqrt and a
# divide), and the same 8 fp32 values per thread per array give 16-byte vector accesses.


@triton.jit
def _fused_sgd_fwd_kernel(p_ptr, g_ptr, buf_ptr, copy_ptr, n, step_ptr, found_inf_ptr, grad_coef_ptr, lr,
                          momentum, one_minus_dampening, weight_decay,
                          HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_COPY: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: a tensor may pass 2^31 elements
    t = tl.load(step_ptr)
    skip = (tl.load(found_inf_ptr) != 0.0) | (t < 1.0) | (t != t)  # an overflow, a step < 1 or NaN
    mask = (offs < n) & (skip == 0)
    coef = tl.load(grad_coef_ptr)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
    g = g + weight_decay * p
    d = g
    if HAS_MOMENTUM:
        first = t == 1.0
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.where(first, g, momentum * buf + one_minus_dampening * g)
        tl.store(buf_ptr + offs, to_storage(buf, buf_ptr), mask=mask)
        if NESTEROV:
            d = g + momentum * buf
        else:
            d = buf
    p = p - lr * d
    tl.store(p_ptr + offs, to_storage(p, p_ptr), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, to_storage(p, copy_ptr), mask=mask)


_SCALARS = {**dict.fromkeys(("step_ptr", "found_inf_ptr", "grad_coef_ptr"), "*fp32"), "n": "i64",
            **dict.fromkeys(("lr", "momentum", "one_minus_dampening", "weight_decay"), "fp32")}


def _aot_config(pd, gd, bd, cd, mode: str) -> AotConfig:
    """The variant for (param, grad, momentum buffer, model copy) dtypes (cd None: no copy) and mode
    "none" (no buffer), "momentum" or "nesterov". ptxas -v measured 23-48 registers (48: bf16 grads
    and buffer with Nesterov, sm_80) and no spills."""
    bd = bd if mode != "none" else None
    pointers = {"p_ptr": pd, "g_ptr": gd, "buf_ptr": bd or pd, "copy_ptr": cd or pd}
    return aot_variant(_fused_sgd_fwd_kernel, pointers, dict(p=pd, g=gd, buf=bd, copy=cd), _SCALARS,
                       HAS_MOMENTUM=mode != "none", NESTEROV=mode == "nesterov", HAS_COPY=cd is not None)


# (param, grad, momentum buffer, model copy) dtypes as FusedSGD uses them.
_COMBOS = [(torch.float32, torch.float32, torch.float32, None),
           (torch.float32, torch.float16, torch.float32, torch.float16),
           (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
           (torch.bfloat16, torch.bfloat16, torch.float32, None),
           (torch.float16, torch.float16, torch.float32, None)]
AOT_CONFIGS: list[AotConfig] = [_aot_config(*combo, mode) for combo in _COMBOS
                                for mode in ("none", "momentum", "nesterov")]


def fused_sgd_triton_(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                      dampening, weight_decay, nesterov) -> None:
    """Launcher, one launch per tensor; the arguments were checked by the op (llmkern/ops/fused_sgd.py)."""
    for j, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        buf = momentum_buffers[j] if momentum_buffers else p
        copy = model_copies[j] if model_copies else p
        _fused_sgd_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[j], buf, copy, n, step, found_inf, grad_coef, lr, momentum, 1.0 - dampening, weight_decay,
            HAS_MOMENTUM=bool(momentum_buffers), NESTEROV=bool(nesterov), HAS_COPY=bool(model_copies),
            BLOCK=BLOCK)
