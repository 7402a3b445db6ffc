"""RoPE: llmkern's fused rope vs transformers' apply_rotary_pos_emb (eager), torch.compile of it and, on a
GPU, Liger-Kernel's liger_rope (backend "cpu" on CPU, "triton" with --device cuda).

q (B, Hq, T, D) and k (B, Hk, T, D) as LlamaAttention makes them: transposed views of the (B, T, H·D)
projections; cos/sin (B, T, D) from LlamaRotaryEmbedding. fwd under no_grad; fwd+bwd with q and k
requiring grad and fixed grad outputs. Bytes: dispatcher ops' inputs and outputs.

    python bench/ops/bench_rope.py            # B=1, Hq=32, Hk=8, T=2048, D=128 (Llama-3-8B), fp32 and bf16
    python bench/ops/bench_rope.py --quick    # B=1, Hq=4, Hk=2, T=128, D=64, no torch.compile
    python bench/ops/bench_rope.py --device cuda   # on a GPU: Triton kernels, Liger-Kernel as a peer
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


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, B: int, Hq: int, Hk: int,
              T: int, D: int) -> Case:
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from llmkern.ops import rope

    cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk)
    g = torch.Generator().manual_seed(0)
    cos, sin = (t.to(device) for t in LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=dtype),
                                                                  torch.arange(T)[None].expand(B, T)))
    q = torch.randn(B, T, Hq * D, generator=g).to(device, dtype).view(B, T, Hq, D).transpose(1, 2)
    k = torch.randn(B, T, Hk * D, generator=g).to(device, dtype).view(B, T, Hk, D).transpose(1, 2)
    gq, gk = (torch.randn(t.shape, generator=g).to(device, dtype) for t in (q, k))

    def eager(q, k):
        return apply_rotary_pos_emb(q, k, cos, sin)

    fns = {"eager": eager}
    if compiled:
        fns["compiled"] = compile_eager(eager)
    fns["llmkern"] = lambda q, k: rope(q, k, cos, sin, backend=llmkern_backend(device))
    if liger:
        fns["liger"] = lambda q, k: _liger.rope(q, k, cos, sin)
    calls = candidate_calls(fns, [q, k], [gq, gk])
    return Case(shape=f"B={B},Hq={Hq},Hk={Hk},T={T},D={D}", calls=calls, validate=against_eager(fns, [q, k]),
                tolerance=1e-6 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls})


BENCH = Bench(op="rope", doc=__doc__, shapes=[dict(B=1, Hq=32, Hk=8, T=2048, D=128)],
              quick_shapes=[dict(B=1, Hq=4, Hk=2, T=128, D=64)], make_case=make_case)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
