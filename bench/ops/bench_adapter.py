"""Bottleneck adapter on CPU: llmkern's fused ``Adapter`` vs the same module in eager PyTorch.

Setup: a series (Houlsby) adapter ``h + s·up(gelu(down(LN(h))))`` with LayerNorm, T tokens, C
channels, bottleneck R, fp32 and bf16, torch threads 2. The candidates share one set of weights:

- ``eager``: ``llmkern.nn.Adapter(backend="ref")``, i.e. F.layer_norm, F.linear, F.gelu, F.linear
  in plain PyTorch autograd (the baseline of every ratio).
- ``compiled``: the eager module under ``torch.compile`` (inductor); only with ``--compiled``,
  since compiling takes minutes on a busy 2-core machine.
- ``llmkern``: ``llmkern.nn.Adapter(backend="cpu")``, the fused C++ op.

Modes: ``fwd`` (under no_grad) and ``fwd+bwd`` (h requires grad, every adapter parameter trains,
a fixed grad output; grads set to None every call). ``saved_bytes``: bytes of the tensors autograd
saves for backward in one forward (parameters excluded, each storage once), with and without the
input h (which the series form needs either way).
Before timing, llmkern's output is checked against the eager module's. Ratios (bench/_harness.Ratio):
speed-up over eager (and compiled) per dtype and mode, median and min-max of the per-round ratios,
and saved bytes / eager's; reported without a goal.

    python bench/ops/bench_adapter.py            # T=2048, C=4096, R=64 (about 1-2 minutes)
    python bench/ops/bench_adapter.py --quick    # small sizes, seconds (the smoke test)
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


def build(C: int, R: int, dtype: torch.dtype, activation: str, compiled: bool, seed: int = 0) -> dict[str, nn.Module]:
    """The eager, (compiled) and llmkern adapters with the same non-zero weights."""
    from llmkern.nn import Adapter

    torch.manual_seed(seed)
    eager = Adapter(C, R, activation, scale=0.5, layer_norm=True, dtype=dtype, backend="ref")
    with torch.no_grad():
        nn.init.normal_(eager.up.weight, std=R ** -0.5)  # the identity init (up = 0) would hide errors
        nn.init.normal_(eager.up.bias)
        nn.init.normal_(eager.ln.weight, 1.0, 0.1)
        nn.init.normal_(eager.ln.bias, 0.0, 0.1)
    ours = Adapter(C, R, activation, scale=0.5, layer_norm=True, dtype=dtype, backend="cpu")
    ours.load_state_dict(eager.state_dict())
    mods: dict[str, nn.Module] = {"eager": eager}
    if compiled:
        twin = Adapter(C, R, activation, scale=0.5, layer_norm=True, dtype=dtype, backend="ref")
        twin.load_state_dict(eager.state_dict())
        mods["compiled"] = torch.compile(twin)
    mods["llmkern"] = ours
    return mods


def saved_bytes(m: nn.Module, h0: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd saves for backward in one forward (parameters excluded, each storage once):
    in total, and beyond the input h itself (what the adapter adds to the activation memory)."""
    h = h0.detach().requires_grad_()
    seen = saved_storages(lambda: m(h), m.parameters())
    total = sum(seen.values())
    return total, total - seen.get(h.untyped_storage().data_ptr(), 0)


def traffic_bytes(T: int, C: int, R: int, elt: int, mode: str) -> int:
    """The minimum memory traffic of the fused op: read h, write y (and z, 4 B/elt); the backward
    reads g and h and writes gh. Parameters (R×C) are cache-resident and not counted."""
    fwd = 2 * T * C * elt + T * R * 4
    return fwd if mode == "fwd" else fwd + 3 * T * C * elt + T * R * 4


def flops(T: int, C: int, R: int, mode: str) -> float:
    """2 × multiply-adds of the two rank-R products (fwd), plus the four of the backward."""
    return 2 * T * C * R * (2 if mode == "fwd" else 6)


def validate(mods: dict[str, nn.Module], h: torch.Tensor) -> float:
    """llmkern against eager: the largest |Δy| relative to max |y|. Checked before timing."""
    with torch.no_grad():
        ye, yo = mods["eager"](h).float(), mods["llmkern"](h).float()
    return ((ye - yo).abs().max() / ye.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    from llmkern.ops.adapter_bottleneck import ACTIVATIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=128, C=256, R=16, 2 rounds, no waiting: seconds")
    ap.add_argument("--T", type=int, default=None, help="tokens (default 2048)")
    ap.add_argument("--C", type=int, default=None, help="channels (default 4096)")
    ap.add_argument("--R", type=int, default=None, help="bottleneck (default 64)")
    ap.add_argument("--activation", default="gelu", choices=ACTIVATIONS)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compiled", action="store_true", help="also time the eager module under torch.compile")
    ap.add_argument("--rounds", type=int, default=None, help="default 7 (2 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, 1 with --quick)")
    ap.add_argument("--wait", type=float, default=None,
                    help="seconds to wait for a quiet CPU before the first measurement (default 60, 0 with --quick)")
    ap.add_argument("--name", default=None, help="results file name (default adapter, adapter_quick with --quick)")
    args = ap.parse_args(argv)
    T = args.T or (128 if args.quick else 2048)
    C = args.C or (256 if args.quick else 4096)
    R = args.R or (16 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 7)
    wait = args.wait if args.wait is not None else (0.0 if args.quick else 60.0)
    threads = args.threads or (1 if args.quick else 2)
    name = args.name or ("adapter_quick" if args.quick else "adapter")
    torch.set_num_threads(threads)
    shape = f"T={T},C={C},R={R}"
    print(f"bench_adapter: {shape}, series + LayerNorm, {args.activation}, threads {threads}, {rounds} rounds")

    rows, ratios, contention = [], [], []
    first_wait = True
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        mods = build(C, R, dtype, args.activation, args.compiled)
        g = torch.Generator().manual_seed(1)
        h = torch.randn(T, C, generator=g).to(dtype)
        gy = torch.randn(T, C, generator=g).to(dtype)
        err = validate(mods, h)
        # eager rounds LN(h), z and act(z) to the dtype; llmkern keeps them in fp32: bf16 differs by
        # a few bf16 ulps of the adapter branch.
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if not err <= tol:
            print(f"FAILED: llmkern and eager disagree ({dname}): max |Δy|/max|y| = {err:.2e} > {tol:g}")
            return 1
        sb = {n: saved_bytes(m, h) for n, m in mods.items()}
        for mode in ("fwd", "fwd+bwd"):
            if wait > 0:
                wait_for_quiet_cpu(0.15, timeout=wait if first_wait else wait / 4)
                first_wait = False
            calls = {n: (fwd_call(m, h) if mode == "fwd" else fwd_bwd_call(m, h, gy)) for n, m in mods.items()}
            res = measure(calls, warmup=2 if args.compiled else 1, repeats=1, rounds=rounds)
            contention.append(res.contention)
            print(f"  {dname} {mode}: measured, others used "
                  f"{'n/a' if res.contention is None else f'{res.contention:.0%}'} of the CPU")
            for n in mods:
                t = res.median_ms(n)
                lo, hi = res.ratio_spread(n, "eager")
                row = {"op": "adapter_bottleneck", "candidate": n, "dtype": dname, "shape": shape, "mode": mode,
                       "median_ms": t, "ratio_vs_baseline": res.ratio(n, "eager"), "baseline": "eager",
                       "gbytes_per_s": traffic_bytes(T, C, R, h.element_size(), mode) / t / 1e6,
                       "gflops": flops(T, C, R, mode) / t / 1e6, "ratio_min": lo, "ratio_max": hi,
                       "contention": res.contention, "validation_rel_err": err if n == "llmkern" else None}
                if mode == "fwd+bwd":
                    row["saved_bytes"] = sb[n][0]
                    row["saved_ratio_vs_eager"] = sb[n][0] / sb["eager"][0]
                    row["saved_bytes_beyond_input"] = sb[n][1]
                rows.append(row)
            for peer in [n for n in mods if n != "llmkern"]:
                ratios.append(Ratio.from_rounds(f"{dname} {mode}: speed-up over {peer}",
                                                [1 / r for r in res.round_ratios("llmkern", peer)], peer=peer))
        # llmkern keeps z (T, R) fp32 and mean/rstd (T); eager keeps LN(h), z, act(z) and its LN statistics.
        ratios.append(Ratio(name=f"{dname}: saved bytes / eager's", value=sb["llmkern"][0] / sb["eager"][0],
                            peer="eager", higher_is_better=False))
        ratios.append(Ratio(name=f"{dname}: saved bytes beyond the input / eager's",
                            value=sb["llmkern"][1] / sb["eager"][1], peer="eager", higher_is_better=False))
        del mods, h, gy

    worst = max((c for c in contention if c is not None), default=None)
    env = environment(contention=worst, contention_per_measurement=contention, rounds=rounds,
                      activation=args.activation, quick=args.quick)
    csv_path, json_path = write_results(name, rows, env, ratios)
    print()
    print(format_table(rows, ["candidate", "dtype", "mode", "median_ms", "ratio_vs_baseline", "ratio_min",
                              "ratio_max", "gbytes_per_s", "gflops", "saved_bytes", "saved_ratio_vs_eager"]))
    print("\nllmkern against eager PyTorch, measured in this run (speed-up = eager time / llmkern time)")
    print(format_ratios(ratios))
    print(f"\ncontention (largest share of the CPU other processes took during a measurement): "
          f"{'n/a' if worst is None else f'{worst:.0%}'}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
