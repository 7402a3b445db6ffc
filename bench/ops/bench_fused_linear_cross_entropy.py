"""Fused LM head + cross-entropy: llmkern's fused_linear_cross_entropy vs lm_head then transformers' loss
(eager: F.linear, then F.cross_entropy on ``logits.float()``), torch.compile of that and, on a GPU,
Liger-Kernel's liger_fused_linear_cross_entropy (llmkern's backend "cpu" on CPU, "triton" with --device
cuda; there the goals against Liger are equal or better speed and peak memory <= Liger's).

hidden (T, C) and the head (V, C) both train, and at V = 128K also with the head frozen (head=frozen: a
LoRA fine-tune, where the head's gradient and its memory do not exist); mean over labels with 1 in 16
ignored. Peak: the bytes one fwd+bwd allocates beyond its inputs (the profiler's allocation records),
the head's gradient included on both sides. With the head trained that gradient (V·C) bounds the
ratio from below: at T = C it is a third of eager's peak in fp32 (eager holds ~3·T·V fp32 values),
so the 0.25 goal can be met in bf16 and with a frozen head, not in fp32 with a trained head.
Bytes moved: dispatcher ops' inputs and outputs. The issue's goal: peak memory <= 0.25x eager's at
equal or better speed.

    python bench/ops/bench_fused_linear_cross_entropy.py            # T=2048, C=2048, V=32000 and 128256 (+ frozen)
    python bench/ops/bench_fused_linear_cross_entropy.py --quick    # T=128, C=64, V=1000, no torch.compile
    python bench/ops/bench_fused_linear_cross_entropy.py --device cuda   # on a GPU, Liger-Kernel as a peer
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


def make_case(*, dtype: torch.dtype, compiled: bool, device: str = "cpu", liger: bool = False, T: int, C: int, V: int,
              head: str = "trained") -> Case:
    from llmkern.ops import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, C, generator=g).to(device, dtype)
    weight = (torch.randn(V, C, generator=g) * 2 / C ** 0.5).to(device, dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::16] = -100
    labels = labels.to(device)

    def eager(h, w):
        return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)

    def ours(h, w):
        return fused_linear_cross_entropy(h, w, labels, backend=llmkern_backend(device))

    fns = {"eager": eager}
    if compiled:
        fns["compiled"] = compile_eager(eager)
    fns["llmkern"] = ours
    if liger:
        fns["liger"] = lambda h, w: _liger.fused_linear_cross_entropy(h, w, labels)
    if head == "frozen":  # the leaves are hidden alone; the head is a constant of each candidate
        fns = {n: (lambda h, f=f: f(h, weight)) for n, f in fns.items()}
    inputs = [hidden] if head == "frozen" else [hidden, weight]
    one = torch.tensor(1.0, device=device)
    calls = candidate_calls(fns, inputs, [one])
    return Case(shape=f"T={T},C={C},V={V}" + (",head=frozen" if head == "frozen" else ""), calls=calls,
                validate=against_eager(fns, inputs),
                tolerance=1e-5 if dtype == torch.float32 else 1e-3,
                bytes_fused={m: dispatch_bytes(calls[m]["llmkern"]) for m in calls},
                bytes_unfused={m: dispatch_bytes(calls[m]["eager"]) for m in calls},
                peak={n: peak_of(c, device) for n, c in calls["fwd+bwd"].items()})


BENCH = Bench(op="fused_linear_cross_entropy", doc=__doc__,
              shapes=[dict(T=2048, C=2048, V=32000), dict(T=2048, C=2048, V=128256),
                      dict(T=2048, C=2048, V=128256, head="frozen")],
              quick_shapes=[dict(T=128, C=64, V=1000)], make_case=make_case, modes=("fwd+bwd",),
              goal_eager=1.0, goal_compiled=None, goal_peak=0.25, goal_liger_peak=1.0, rounds=2, warmup=0)

if __name__ == "__main__":
    raise SystemExit(main(BENCH))
