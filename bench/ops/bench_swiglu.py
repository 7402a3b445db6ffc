"""SwiGLU: llmkern's fused swiglu (backend "cpu" on CPU, "triton" with --device cuda) vs LlamaMLP's
``act_fn(gate) * up`` (eager), torch.compile of it and, on a GPU, Liger-Kernel's liger_swiglu.

The activation and product between the projections of a Llama MLP (the projections themselves are
GEMMs that no candidate changes): gate and up are (T, F). fwd under no_grad; fwd+bwd with gate and
up requiring grad and a fixed grad output. Bytes: dispatcher ops' inputs and outputs.

    python bench/ops/bench_swiglu.py            # T=2048, F=11008 (Llama-2-7B), fp32 and bf16
    python bench/ops/bench_swiglu.py --quick    # T=128, F=512, no torch.compile
    python bench/ops/bench_swiglu.py --device cuda   # on a GPU: Triton kernels, Liger-Kernel as a peer
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


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, T: int, F: int) -> Case:
    from transformers.activations import ACT2FN

    from llmkern.ops import swiglu

    act = ACT2FN["silu"]

    def eager(gate, up):  # LlamaMLP.forward between the projections
        return act(gate) * up

    fns = {"eager": eager}
    if compiled:
        fns["compiled"] = compile_eager(eager)
    fns["llmkern"] = lambda gate, up: swiglu(gate, up, backend=llmkern_backend(device))
    if liger:
        fns["liger"] = _liger.swiglu
    g = torch.Generator().manual_seed(0)
    gate, up, gy = (torch.randn(T, F, generator=g).to(device, dtype) for _ in range(3))
    calls = candidate_calls(fns, [gate, up], [gy])
    return Case(shape=f"T={T},F={F}", calls=calls, validate=against_eager(fns, [gate, up]),
                tolerance=1e-6 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls})


BENCH = Bench(op="swiglu", doc=__doc__, shapes=[dict(T=2048, F=11008)], quick_shapes=[dict(T=128, F=512)],
              make_case=make_case)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
