"""Cross-entropy: llmkern's cross_entropy vs transformers' loss (eager: F.cross_entropy on
``logits.float()``), torch.compile of it and, on a GPU, Liger-Kernel's liger_cross_entropy, at LM
vocabulary sizes (llmkern's backend "cpu" on CPU, "triton" with --device cuda).

logits (T, V) require grad; mean over labels with 1 in 16 ignored. fwd under no_grad; fwd+bwd with a
unit grad. Peak: the bytes one fwd+bwd allocates beyond its inputs (the profiler's allocation records):
eager holds the fp32 copy, fp32 log-probabilities and their gradients; llmkern the lse (T) and the
gradient. Bytes moved: dispatcher ops' inputs and outputs.

    python bench/ops/bench_cross_entropy.py            # T=2048, V=32000 and 128256, fp32 and bf16
    python bench/ops/bench_cross_entropy.py --quick    # T=128, V=1000, no torch.compile
    python bench/ops/bench_cross_entropy.py --device cuda   # on a GPU: Triton kernels, Liger-Kernel as a peer

Liger writes the gradient over the logits in its forward (bench/ops/_liger.py): its candidate works
on its own copy of them, made once; its loss comes out in the logits' dtype, so its bf16 validation
allows a bf16 rounding of the loss.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _liger  # noqa: E402
from _fused import (Bench, Case, against_eager, candidate_calls, compile_eager, dispatch_bytes,  # noqa: E402
                    llmkern_backend, main, peak_of)

TAKES_QUICK = True  # --quick is defined by _fused.main; llmkern bench reads this line
TAKES_DEVICE = True  # so is --device (cpu|cuda): `llmkern bench --device cuda` passes it


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, T: int, V: int) -> Case:
    from llmkern.ops import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(T, V, generator=g) * 3).to(device, dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::16] = -100
    labels = labels.to(device)

    def eager(x):  # transformers' ForCausalLMLoss after the shift
        return F.cross_entropy(x.float(), labels, ignore_index=-100)

    fns = {"eager": eager}
    if compiled:
        fns["compiled"] = compile_eager(eager)
    fns["llmkern"] = lambda x: cross_entropy(x, labels, backend=llmkern_backend(device))
    if liger:
        fns["liger"] = lambda x: _liger.cross_entropy(x, labels)
    one = torch.tensor(1.0, device=device)
    calls = candidate_calls(fns, [logits], [one])
    return Case(shape=f"T={T},V={V}", calls=calls, validate=against_eager(fns, [logits]), tolerance=1e-5,
                liger_tolerance=1e-5 if dtype == torch.float32 else 1e-2,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls},
                peak={n: peak_of(c, device) for n, c in calls["fwd+bwd"].items()})


BENCH = Bench(op="cross_entropy", doc=__doc__, shapes=[dict(T=2048, V=32000), dict(T=2048, V=128256)],
              quick_shapes=[dict(T=128, V=1000)], make_case=make_case, goal_eager=None, goal_compiled=None,
              rounds=3)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
