"""RMSNorm: llmkern's fused rms_norm vs transformers' LlamaRMSNorm (eager), torch.compile of it and, on a
GPU, Liger-Kernel's liger_rms_norm (Llama casting, offset 0).

The eager candidate is the HF module itself; ``llmkern`` is llmkern.nn.RMSNorm (backend "cpu" on CPU,
"triton" with --device cuda) with the same weight; ``liger`` (--device cuda) is liger_rms_norm with a
copy of the weight, in_place=True as LigerRMSNorm (bench/ops/_liger.py). fwd runs under no_grad;
fwd+bwd has x requiring grad and the weight training, with a fixed grad output. Bytes: each
candidate's dispatcher ops, inputs read and outputs written once (bench/ops/_fused.py:dispatch_bytes):
the unfused sequence's traffic for eager, the fused kernels' minimum for llmkern (x, w in; y, rstd
out; then dy, x in; dx out).

    python bench/ops/bench_rms_norm.py            # T=4096, C=4096, fp32 and bf16 (minutes: torch.compile)
    python bench/ops/bench_rms_norm.py --quick    # T=256, C=512, no torch.compile: seconds
    python bench/ops/bench_rms_norm.py --device cuda   # on a GPU: Triton kernels, Liger-Kernel as a peer
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _liger  # noqa: E402
from _fused import (Bench, Case, against_eager, candidate_calls, compile_eager, dispatch_bytes,  # noqa: E402
                    llmkern_backend, main)

TAKES_QUICK = True  # --quick is defined by _fused.main; llmkern bench reads this line
TAKES_DEVICE = True  # so is --device (cpu|cuda): `llmkern bench --device cuda` passes it


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, T: int, C: int) -> Case:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llmkern.nn import RMSNorm

    g = torch.Generator().manual_seed(0)
    eager = LlamaRMSNorm(C, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        eager.weight.copy_(1 + 0.1 * torch.randn(C, generator=g))
    ours = RMSNorm(C, eps=1e-6, device=device, dtype=dtype, backend=llmkern_backend(device))
    ours.load_state_dict(eager.state_dict())
    mods = {"eager": eager}
    if compiled:
        mods["compiled"] = compile_eager(eager)
    mods["llmkern"] = ours
    if liger:
        w = eager.weight.detach().clone().requires_grad_()
        mods["liger"] = lambda x: _liger.rms_norm(x, w, eager.variance_epsilon, convention="llama")
    x = torch.randn(T, C, generator=g).to(device, dtype)
    gy = torch.randn(T, C, generator=g).to(device, dtype)
    calls = candidate_calls(mods, [x], [gy])
    return Case(shape=f"T={T},C={C}", calls=calls, validate=against_eager(mods, [x]),
                tolerance=1e-6 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls})


BENCH = Bench(op="rms_norm", doc=__doc__, shapes=[dict(T=4096, C=4096)], quick_shapes=[dict(T=256, C=512)],
              make_case=make_case)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
