"""Triton kernel of llmkern::fused_sgd_ (argument meanings: csrc/ops/fused_sgd.cpp; element math:
csrc/include/llmkern/optim_math.h sgd_element, which this mirrors line for line).

One launch per tensor, as for fused_adamw (triton_kernels/fused_adamw.py says why). Per launch the
kernel reads found_inf and masks every load and store off when it is set, so an overflow step moves
no memory; it reads the step count on the device too (step 1 sets the momentum buffer to the
gradient, torch.optim.SGD's rule), so nothing waits for the host.

Numerics: fp32 in registers whatever the storage dtypes (the interpreter computes bf16 arithmetic
wrongly, and fp32 is what the CPU/CUDA kernels do); 1 - dampening is formed in a Python double and
rounded once, as the CUDA launcher does.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from llmkern.triton_kernels.fused_adamw import _TL, _to_storage, check_lists

# BLOCK=1024 elements, 4 warps, as fused_adamw: SGD moves 16-20 B/param (fp32 p, g, buf, and a
# 16-bit copy), so it is bandwidth-bound by a wider margin than AdamW (28 B/param, a sqrt and a
# divide), and the same 8 fp32 values per thread per array give 16-byte vector accesses.
BLOCK = 1024


@triton.jit
def _fused_sgd_fwd_kernel(p_ptr, g_ptr, buf_ptr, copy_ptr, n, step_ptr, found_inf_ptr, grad_coef_ptr, lr,
                          momentum, one_minus_dampening, weight_decay,
                          HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, HAS_COPY: tl.constexpr,
                          BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: a tensor may pass 2^31 elements
    skip = tl.load(found_inf_ptr) != 0.0
    mask = (offs < n) & (skip == 0)
    coef = tl.load(grad_coef_ptr)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
    g = g + weight_decay * p
    d = g
    if HAS_MOMENTUM:
        first = tl.load(step_ptr) == 1.0
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        buf = tl.where(first, g, momentum * buf + one_minus_dampening * g)
        tl.store(buf_ptr + offs, _to_storage(buf, buf_ptr), mask=mask)
        if NESTEROV:
            d = g + momentum * buf
        else:
            d = buf
    p = p - lr * d
    tl.store(p_ptr + offs, _to_storage(p, p_ptr), mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, _to_storage(p, copy_ptr), mask=mask)


def _aot_configs() -> list[SimpleNamespace]:
    """The variants the static check (tests/static/test_triton_aot.py) compiles for sm_80/sm_90:
    (param, grad, momentum buffer, model copy) dtypes as FusedSGD uses them, with heavy-ball and
    Nesterov momentum and without momentum (no buffer). ptxas -v measured 23-48 registers (48:
    bf16 grads and buffer with Nesterov, sm_80) and no spills."""
    combos = [(torch.float32, torch.float32, torch.float32, None),
              (torch.float32, torch.float16, torch.float32, torch.float16),
              (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.bfloat16, torch.float32, None),
              (torch.float16, torch.float16, torch.float32, None)]
    out = []
    for pd, gd, bd, cd in combos:
        for mode in ("none", "momentum", "nesterov"):
            sig = {"p_ptr": f"*{_TL[pd]}", "g_ptr": f"*{_TL[gd]}",
                   "buf_ptr": f"*{_TL[bd] if mode != 'none' else _TL[pd]}", "copy_ptr": f"*{_TL[cd or pd]}",
                   "n": "i64", "step_ptr": "*fp32", "found_inf_ptr": "*fp32", "grad_coef_ptr": "*fp32",
                   "lr": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32",
                   "HAS_MOMENTUM": "constexpr", "NESTEROV": "constexpr", "HAS_COPY": "constexpr",
                   "BLOCK": "constexpr"}
            consts = {"HAS_MOMENTUM": mode != "none", "NESTEROV": mode == "nesterov", "HAS_COPY": cd is not None,
                      "BLOCK": BLOCK}
            name = f"p={_TL[pd]},g={_TL[gd]},buf={_TL[bd] if mode != 'none' else '-'},copy={_TL[cd] if cd else '-'},{mode},w4,s3"
            out.append(SimpleNamespace(kernel=_fused_sgd_fwd_kernel, signature=sig, constexprs=consts,
                                       num_warps=4, num_stages=3, name=name))
    return out


AOT_CONFIGS = _aot_configs()


def _check(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, momentum) -> None:
    """The C++ op's checks (csrc/ops/fused_sgd.h) that the kernel relies on, with the same wording."""
    if (momentum == 0.0) != (len(momentum_buffers) == 0):
        raise RuntimeError(f"momentum_buffers must be given exactly when momentum > 0 (momentum {momentum}, "
                           f"{len(momentum_buffers)} buffers)")
    check_lists({"params": params, "grads": grads, "momentum_buffers": momentum_buffers,
                 "model_copies": model_copies}, (step, found_inf, grad_coef))


def fused_sgd_triton_(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, lr, momentum,
                      dampening, weight_decay, nesterov) -> None:
    """Launcher: every check first (nothing is written when one fails), then one launch per tensor."""
    _check(params, grads, momentum_buffers, model_copies, step, found_inf, grad_coef, momentum)
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
