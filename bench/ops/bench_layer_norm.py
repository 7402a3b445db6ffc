"""LayerNorm: llmkern's fused layer_norm vs nn.LayerNorm (eager: ATen's own fused kernel), torch.compile of
it and, on a GPU, Liger-Kernel's liger_layer_norm.

``llmkern`` is llmkern.nn.LayerNorm (backend "cpu" on CPU, "triton" with --device cuda) with the same
weight and bias; ``liger`` (--device cuda) liger_layer_norm with copies of them. fwd under no_grad;
fwd+bwd with x, weight and bias training. Bytes as in bench_rms_norm.py (dispatcher ops' inputs and
outputs). Note: eager LayerNorm is already one ATen kernel per direction on CPU, not an unfused chain.

    python bench/ops/bench_layer_norm.py            # T=4096, C=4096, fp32 and bf16
    python bench/ops/bench_layer_norm.py --quick    # T=256, C=512, no torch.compile
    python bench/ops/bench_layer_norm.py --device cuda   # on a GPU: Triton kernels, Liger-Kernel as a peer
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _liger  # noqa: E402
from _fused import (Bench, Case, against_eager, candidate_calls, compile_eager, dispatch_bytes,  # noqa: E402
                    llmkern_backend, main)

TAKES_QUICK = True  # --quick is defined by _fused.main; llmkern bench reads this line
TAKES_DEVICE = True  # so is --device (cpu|cuda): `llmkern bench --device cuda` passes it


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, T: int, C: int) -> Case:
    from llmkern.nn import LayerNorm

    g = torch.Generator().manual_seed(0)
    eager = nn.LayerNorm(C).to(device, dtype)
    with torch.no_grad():
        eager.weight.copy_(1 + 0.1 * torch.randn(C, generator=g))
        eager.bias.copy_(0.1 * torch.randn(C, generator=g))
    ours = LayerNorm(C, device=device, dtype=dtype, backend=llmkern_backend(device))
    ours.load_state_dict(eager.state_dict())
    mods = {"eager": eager}
    if compiled:
        mods["compiled"] = compile_eager(eager)
    mods["llmkern"] = ours
    if liger:
        w, b = (t.detach().clone().requires_grad_() for t in (eager.weight, eager.bias))
        mods["liger"] = lambda x: _liger.layer_norm(x, w, b, eager.eps)
    x = (torch.randn(T, C, generator=g) * 2 + 0.5).to(device, dtype)
    gy = torch.randn(T, C, generator=g).to(device, dtype)
    calls = candidate_calls(mods, [x], [gy])
    return Case(shape=f"T={T},C={C}", calls=calls, validate=against_eager(mods, [x]),
                tolerance=1e-5 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls})


BENCH = Bench(op="layer_norm", doc=__doc__, shapes=[dict(T=4096, C=4096)], quick_shapes=[dict(T=256, C=512)],
              make_case=make_case)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
