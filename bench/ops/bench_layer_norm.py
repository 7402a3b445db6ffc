"""LayerNorm on CPU: llmkern's fused layer_norm vs nn.LayerNorm (eager: ATen's own fused CPU kernel) and
torch.compile of it.

``llmkern`` is llmkern.nn.LayerNorm(backend="cpu") with the same weight and bias. fwd under no_grad;
fwd+bwd with x, weight and bias training. Bytes as in bench_rms_norm.py (dispatcher ops' inputs and
outputs). Note: eager LayerNorm is already one ATen kernel per direction on CPU, not an unfused chain.

    python bench/ops/bench_layer_norm.py            # T=4096, C=4096, fp32 and bf16
    python bench/ops/bench_layer_norm.py --quick    # T=256, C=512, no torch.compile
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fused import Bench, Case, compile_eager, dispatch_bytes, fwd, fwd_bwd, main, rel_err  # noqa: E402

TAKES_QUICK = True  # --quick is defined by _fused.main; llmkern bench reads this line


def make_case(*, dtype: torch.dtype, compiled: bool, T: int, C: int) -> Case:
    from llmkern.nn import LayerNorm

    g = torch.Generator().manual_seed(0)
    eager = nn.LayerNorm(C).to(dtype)
    with torch.no_grad():
        eager.weight.copy_(1 + 0.1 * torch.randn(C, generator=g))
        eager.bias.copy_(0.1 * torch.randn(C, generator=g))
    ours = LayerNorm(C, dtype=dtype, backend="cpu")
    ours.load_state_dict(eager.state_dict())
    mods = {"eager": eager}
    if compiled:
        mods["compiled"] = compile_eager(eager)
    mods["llmkern"] = ours
    x = (torch.randn(T, C, generator=g) * 2 + 0.5).to(dtype)
    gy = torch.randn(T, C, generator=g).to(dtype)
    calls = {"fwd": {n: fwd(m, [x]) for n, m in mods.items()},
             "fwd+bwd": {n: fwd_bwd(m, [x], [gy]) for n, m in mods.items()}}
    return Case(shape=f"T={T},C={C}", calls=calls,
                validate=lambda: rel_err(calls["fwd"]["llmkern"](), calls["fwd"]["eager"]()),
                tolerance=1e-5 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls})


BENCH = Bench(op="layer_norm", doc=__doc__, shapes=[dict(T=4096, C=4096)], quick_shapes=[dict(T=256, C=512)],
              make_case=make_case)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
