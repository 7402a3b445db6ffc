"""Cross-entropy on CPU: llmkern's cross_entropy vs transformers' loss (eager: F.cross_entropy on
``logits.float()``) and torch.compile of it, at LM vocabulary sizes.

logits (T, V) require grad; mean over labels with 1 in 16 ignored. fwd under no_grad; fwd+bwd with a
unit grad. Peak: the bytes one fwd+bwd allocates beyond its inputs (the profiler's allocation records):
eager holds the fp32 copy, fp32 log-probabilities and their gradients; llmkern the lse (T) and the
gradient. Bytes moved: dispatcher ops' inputs and outputs.

    python bench/ops/bench_cross_entropy.py            # T=2048, V=32000 and 128256, fp32 and bf16
    python bench/ops/bench_cross_entropy.py --quick    # T=128, V=1000, no torch.compile
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fused import Bench, Case, compile_eager, dispatch_bytes, fwd, fwd_bwd, main, peak_bytes, rel_err  # noqa: E402

TAKES_QUICK = True  # --quick is defined by _fused.main; llmkern bench reads this line


def make_case(*, dtype: torch.dtype, compiled: bool, T: int, V: int) -> Case:
    from llmkern.ops import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::16] = -100

    def eager(x):  # transformers' ForCausalLMLoss after the shift
        return F.cross_entropy(x.float(), labels, ignore_index=-100)

    fns = {"eager": eager}
    if compiled:
        fns["compiled"] = compile_eager(eager)
    fns["llmkern"] = lambda x: cross_entropy(x, labels, backend="cpu")
    one = torch.tensor(1.0)
    calls = {"fwd": {n: fwd(f, [logits]) for n, f in fns.items()},
             "fwd+bwd": {n: fwd_bwd(f, [logits], [one]) for n, f in fns.items()}}
    return Case(shape=f"T={T},V={V}", calls=calls,
                validate=lambda: rel_err(calls["fwd"]["llmkern"](), calls["fwd"]["eager"]()), tolerance=1e-5,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls},
                peak={n: peak_bytes(c) for n, c in calls["fwd+bwd"].items()})


BENCH = Bench(op="cross_entropy", doc=__doc__, shapes=[dict(T=2048, V=32000), dict(T=2048, V=128256)],
              quick_shapes=[dict(T=128, V=1000)], make_case=make_case, goal_eager=None, goal_compiled=None,
              rounds=3)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
