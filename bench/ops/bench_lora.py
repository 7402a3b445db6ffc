"""LoRA linear on CPU: llmkern's fused ``LoRALinear`` vs PEFT's ``lora.Linear`` vs the frozen base layer.

Setup: a C×C ``nn.Linear`` without bias, T tokens, rank R, alpha 2R, dropout p ∈ {0, 0.05}, fp32 and
bf16, torch threads 2.

- ``fwd``: forward under ``no_grad`` in train mode (so dropout runs when p > 0).
- ``fwd+bwd``: x requires grad, the base weight is frozen, a fixed grad output; backward computes
  dX (and dA, dB for the LoRA layers). Grads are set to None every call.
- ``saved_bytes``: bytes of the tensors autograd saves for backward during one forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``; parameters are excluded and each storage counts once.

The three candidates run interleaved in one process (bench/_harness.py). Ratios (bench/_harness.Ratio,
median and min-max over the rounds): llmkern's overhead over the frozen base as a fraction of PEFT's
(goal ≤ 0.5; per round (t_llmkern/t_base - 1) / (t_peft/t_base - 1), rounds where PEFT's overhead is
within 0.5 % of the base left out), llmkern/PEFT time, and llmkern/PEFT saved bytes with p > 0 for one
layer (goal ≤ 0.5) and for three layers reading the same x (q, k, v).

    python bench/ops/bench_lora.py            # C=4096, T=2048, R=16 (about 2-4 minutes)
    python bench/ops/bench_lora.py --quick    # small sizes, seconds (the smoke test)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import (Ratio, environment, format_ratios, format_table, fwd_bwd_call, fwd_call,  # noqa: E402
                      measure, saved_storages, wait_for_quiet_cpu, write_results)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DROPOUTS = (0.0, 0.05)


def build(C: int, R: int, dtype: torch.dtype, p_values, seed: int = 0) -> dict[str, nn.Module]:
    """The frozen base and, for every p, a PEFT and an llmkern LoRA layer around the *same* base
    weight with the same (non-zero) A and B, all in train mode."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    from llmkern.nn import LoRALinear

    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(C, C, bias=False, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(C, C, generator=g) / C ** 0.5)
    base.weight.requires_grad_(False)
    a = torch.randn(R, C, generator=g) / C ** 0.5
    b = torch.randn(C, R, generator=g) / R ** 0.5
    mods: dict[str, nn.Module] = {"frozen_linear": base}
    for p in p_values:
        cfg = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=p)
        peft_layer = PeftLoraLinear(base, "default", config=cfg, r=R, lora_alpha=2 * R).to(dtype)
        ours = LoRALinear.from_linear(base, r=R, alpha=2 * R, dropout=p, backend="cpu")
        with torch.no_grad():
            for A, B in ((peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight),
                         (ours.lora_A.weight, ours.lora_B.weight)):
                A.copy_(a)
                B.copy_(b)
        mods[f"peft p={p:g}"] = peft_layer
        mods[f"llmkern p={p:g}"] = ours
    base.weight.requires_grad_(False)  # PEFT's layer does not freeze its base; get_peft_model would
    for m in mods.values():
        m.train()
    return mods


def saved_bytes(m: nn.Module, x0: torch.Tensor, calls: int = 1) -> int:
    """Bytes autograd saves for backward in `calls` forwards of `m` on the same input (parameters
    excluded, each storage once). calls=3 stands for q, k and v projections reading one x."""
    x = x0.detach().requires_grad_()
    return sum(saved_storages(lambda: [m(x) for _ in range(calls)], m.parameters()).values())


def flops(T: int, C: int, R: int, mode: str, lora: bool) -> float:
    """Multiply-adds ×2 of the work done: base GEMM(s) plus the rank-R products for LoRA layers."""
    base = 2 * T * C * C * (1 if mode == "fwd" else 2)  # fwd: x·Wᵀ; backward with W frozen adds gy·W
    if not lora:
        return base
    low = 2 * T * R * C * 2  # x·Aᵀ, then ·Bᵀ
    if mode != "fwd":
        low += 2 * T * R * C * 4  # gy·B, gBᵀ, gA, gu·A
    return base + low


def validate(mods: dict[str, nn.Module], x: torch.Tensor) -> float:
    """llmkern against PEFT with p=0: the largest |Δy| relative to max |y|. Checked before timing."""
    with torch.no_grad():
        yp, yo = mods["peft p=0"](x).float(), mods["llmkern p=0"](x).float()
    return ((yp - yo).abs().max() / yp.abs().max()).item()


def profile(mods: dict[str, nn.Module], x: torch.Tensor, gy: torch.Tensor, dname: str, calls: int = 3) -> list[dict]:
    """Where the LoRA layers' time goes, per call, from torch.profiler: for llmkern, the base GEMMs
    (ATen calls inside the op) vs the op's self time, which is the fused passes F1+F2 (forward) and
    B1+B2 (backward); for PEFT, every op outside the base GEMMs is LoRA overhead."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    out = []
    for n, m in mods.items():
        for mode in ("fwd", "fwd+bwd"):
            run = fwd_call(m, x) if mode == "fwd" else fwd_bwd_call(m, x, gy)
            run()
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    run()
            ev = {e.key: e for e in prof.key_averages()}

            def self_ms(*keys, ev=ev):
                return sum(ev[k].self_cpu_time_total for k in keys if k in ev) / 1e3 / calls

            gemm = self_ms("aten::mm", "aten::addmm")
            total = sum(e.self_cpu_time_total for e in ev.values()) / 1e3 / calls
            row = {"candidate": n, "dtype": dname, "mode": mode, "total_ms": total, "gemm_ms": gemm,
                   "other_ms": total - gemm}
            if n.startswith("llmkern"):
                row["fused_fwd_passes_ms"] = self_ms("llmkern::lora_linear")
                row["fused_bwd_passes_ms"] = self_ms("llmkern::_lora_linear_backward") if mode != "fwd" else None
            top = sorted(((k, e.self_cpu_time_total / 1e3 / calls) for k, e in ev.items()
                          if k not in ("aten::mm", "aten::addmm")), key=lambda kv: -kv[1])[:4]
            row["top_other"] = ", ".join(f"{k} {v:.1f}" for k, v in top if v >= 0.05)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="C=256, T=128, R=8, 2 rounds, no waiting: seconds")
    ap.add_argument("--C", type=int, default=None, help="in = out features (default 4096)")
    ap.add_argument("--T", type=int, default=None, help="tokens (default 2048)")
    ap.add_argument("--R", type=int, default=None, help="LoRA rank (default 16)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=None, help="default 7 (2 with --quick)")
    # --quick: 1 thread. At C=256 each pass takes microseconds, and on a busy 2-core machine the OpenMP
    # barriers of a second thread made single calls up to 100x slower.
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, 1 with --quick)")
    ap.add_argument("--wait", type=float, default=None,
                    help="seconds to wait for a quiet CPU before the first measurement (default 60, 0 with "
                         "--quick); later measurements wait at most a quarter of it")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: torch.profiler breakdown of base GEMM vs LoRA passes per candidate")
    ap.add_argument("--name", default=None, help="results file name (default lora, lora_quick with --quick)")
    args = ap.parse_args(argv)
    C = args.C or (256 if args.quick else 4096)
    T = args.T or (128 if args.quick else 2048)
    R = args.R or (8 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 7)
    wait = args.wait if args.wait is not None else (0.0 if args.quick else 60.0)
    threads = args.threads or (1 if args.quick else 2)
    name = args.name or ("lora_quick" if args.quick else "lora")
    torch.set_num_threads(threads)
    shape = f"T={T},C={C},R={R}"
    print(f"bench_lora: {shape}, threads {threads}, {rounds} rounds, dropout {DROPOUTS}")

    rows, ratios, contention = [], [], []
    first_wait = True
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        mods = build(C, R, dtype, DROPOUTS)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, C, generator=g).to(dtype)
        gy = torch.randn(T, C, generator=g).to(dtype)
        err = validate(mods, x)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if not err <= tol:
            print(f"FAILED: llmkern and PEFT disagree ({dname}, p=0): max |Δy|/max|y| = {err:.2e} > {tol:g}")
            return 1
        if args.profile:
            prof_rows = profile(mods, x, gy, dname)
            print(format_table(prof_rows, ["candidate", "dtype", "mode", "total_ms", "gemm_ms", "other_ms",
                                           "fused_fwd_passes_ms", "fused_bwd_passes_ms", "top_other"]))
            continue
        sb = {n: saved_bytes(m, x) for n, m in mods.items()}
        for mode in ("fwd", "fwd+bwd"):
            if wait > 0:
                wait_for_quiet_cpu(0.15, timeout=wait if first_wait else wait / 4)
                first_wait = False
            calls = {n: (fwd_call(m, x) if mode == "fwd" else fwd_bwd_call(m, x, gy)) for n, m in mods.items()}
            res = measure(calls, warmup=1, repeats=1, rounds=rounds)
            contention.append(res.contention)
            print(f"  {dname} {mode}: measured, others used "
                  f"{'n/a' if res.contention is None else f'{res.contention:.0%}'} of the CPU")
            for n in mods:
                cand, _, p = n.partition(" p=")
                lo, hi = res.ratio_spread(n, "frozen_linear")
                t = res.median_ms(n)
                row = {"op": "lora_linear", "candidate": cand, "dtype": dname, "shape": shape, "mode": mode,
                       "median_ms": t, "ratio_vs_baseline": res.ratio(n, "frozen_linear"),
                       "baseline": "frozen_linear", "gflops": flops(T, C, R, mode, cand != "frozen_linear") / t / 1e6,
                       "dropout_p": float(p) if p else None, "ratio_min": lo, "ratio_max": hi,
                       "contention": res.contention, "validation_rel_err": err if cand == "llmkern" else None}
                if mode == "fwd+bwd":
                    row["saved_bytes"] = sb[n]
                rows.append(row)
            for p in DROPOUTS:
                ratios += overhead_ratios(res, dname, mode, p)
        for p in DROPOUTS:
            ours, theirs = f"llmkern p={p:g}", f"peft p={p:g}"
            ratios.append(Ratio(name=f"{dname} p={p:g}: saved bytes / PEFT's", value=sb[ours] / sb[theirs],
                                peer="peft", goal=0.5 if p > 0 else None, higher_is_better=False))
        # q, k and v projections read the same x: llmkern saves it once, PEFT saves dropout(x) per layer.
        p = max(DROPOUTS)
        qkv = {c: saved_bytes(mods[f"{c} p={p:g}"], x, 3) for c in ("llmkern", "peft")}
        ratios.append(Ratio(name=f"{dname} p={p:g}: saved bytes / PEFT's, 3 layers (q k v) on one x",
                            value=qkv["llmkern"] / qkv["peft"], peer="peft", higher_is_better=False))
        del mods, x, gy

    if args.profile:
        return 0
    worst = max((c for c in contention if c is not None), default=None)
    env = environment(contention=worst, contention_per_measurement=contention, rounds=rounds, quick=args.quick)
    csv_path, json_path = write_results(name, rows, env, ratios)
    print()
    print(format_table(rows, ["candidate", "dtype", "mode", "dropout_p", "median_ms", "ratio_vs_baseline",
                              "ratio_min", "ratio_max", "gflops", "saved_bytes"]))
    # llmkern saves x and the (T, R) fp32 xa; PEFT saves its dropout noise and dropout(x) (x itself is not
    # needed by a frozen base), so one layer on its own gives 0.5 + (T·R·4)/(2·T·C·elt), just above 0.5.
    print("\nllmkern against PEFT, measured in this run (overhead = time / frozen base layer - 1)")
    print(format_ratios(ratios))
    print(f"\ncontention (largest share of the CPU other processes took during a measurement): "
          f"{'n/a' if worst is None else f'{worst:.0%}'}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def overhead_ratios(res, dname: str, mode: str, p: float) -> list[Ratio]:
    """llmkern's overhead over the frozen base as a fraction of PEFT's (goal ≤ 0.5), and llmkern/PEFT time.

    Per round: (t_llmkern/t_base - 1) / (t_peft/t_base - 1). A round where PEFT's overhead is within
    0.5 % of the base says nothing about the fraction and is left out; no such round left, no ratio."""
    ours, theirs = f"llmkern p={p:g}", f"peft p={p:g}"
    tag = f"{dname} {mode} p={p:g}"
    out = [Ratio.from_rounds(f"{tag}: time / PEFT's", res.round_ratios(ours, theirs), peer="peft",
                             higher_is_better=False)]
    per_round = [(a - 1) / (b - 1) for a, b in zip(res.round_ratios(ours, "frozen_linear"),
                                                   res.round_ratios(theirs, "frozen_linear")) if b - 1 > 0.005]
    if per_round:
        out.append(Ratio.from_rounds(f"{tag}: overhead / PEFT's", per_round, peer="peft", goal=0.5,
                                     higher_is_better=False))
    else:
        print(f"  {tag}: PEFT's overhead is within 0.5 % of the base in every round; no overhead fraction")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
