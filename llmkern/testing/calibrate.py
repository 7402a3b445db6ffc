"""Measures the numbers behind TOLERANCES' cond_factor (see the tolerances module docstring).

    python -m llmkern.testing.calibrate [--draws 3000]

Prints, for fp32 dot products of K randn terms computed by torch.matmul as (1, K) @ (K, N) under
MKL's AVX-512, AVX2 and COMPATIBLE code paths (MKL_CBWR, set per child process: MKL reads it
once), the percentiles of one draw's error in units of eps * sum_k |a_k b_k|; PyTorch's max in
that unit over the 4096 elements of a (64, K) @ (K, 64) output; how often the max of n draws
exceeds 2x or 3x another such max (n = 1 to 512), and how often one draw exceeds 2x / 3x the
cond_factor model, with the tail of that rate from 150,000 more draws. Takes ~30 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

KS = (16, 48, 64, 123, 1025)
NS = (1, 48)
MAX_OF = (1, 8, 32, 64, 128, 512)
CODE_PATHS = ("AVX512", "AVX2", "COMPATIBLE")
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def one_draw_errors(k: int, n: int, draws: int, seed: int) -> torch.Tensor:
    """|fl(a.b) - a.b| / (eps * sum |a_k b_k|) for `draws` dot products, computed as (1, K) @ (K, N)
    (N = 1: MKL's gemv; N = 48: its gemm, as the (1, 64) @ (64, 48) LoRA case runs)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    out = []
    for _ in range(-(-draws // n)):
        a, b = torch.randn(1, k, generator=g), torch.randn(k, n, generator=g) / k**0.5
        ref, cond = a.double() @ b.double(), a.double().abs() @ b.double().abs()
        out.append((((a @ b).double() - ref).abs() / (eps * cond)).reshape(-1))
    return torch.cat(out)[:draws]


def tail_rates(k: int, draws: int, seed: int, cond_factor: float) -> dict:
    """Tail of one draw from `draws` dot products at once (torch.bmm, MKL's sequential order for one
    (1, K) @ (K, 1) product), with LoRA's dropout scaling x * keep / (1 - 0.1) as in the tests."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(torch.float32).eps
    x, a = torch.randn(draws, k, generator=g), torch.randn(draws, k, generator=g) / k**0.5
    xd = x * (torch.rand(draws, k, generator=g) >= 0.1).float() / 0.9
    terms = xd.double() * a.double()
    y = torch.bmm(xd[:, None], a[:, :, None]).reshape(-1).double()
    e = (y - terms.sum(1)).abs() / (eps * terms.abs().sum(1))
    return {"p99.99": float(e.quantile(0.9999)), "max": float(e.max()),
            "P(> 2 cond_factor)": float((e > 2 * cond_factor).double().mean()),
            "P(> 3 cond_factor)": float((e > 3 * cond_factor).double().mean())}


def large_output_max(k: int, seed: int) -> float:
    """PyTorch's max error over a (64, K) @ (K, 64) output, in the same unit (per element)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(64, k, generator=g), torch.randn(k, 64, generator=g) / k**0.5
    ref, cond = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    return float((((a @ b).double() - ref).abs() / (torch.finfo(torch.float32).eps * cond)).max())


def _child(draws: int) -> dict:
    rows = {}
    for k in KS:
        for n in NS:
            e = one_draw_errors(k, n, draws, seed=k)
            rows[f"{k} {n}"] = dict(q=[float(e.quantile(q)) for q in QUANTILES], max=float(e.max()),
                                    draws=e.tolist())
        rows[f"{k} large"] = large_output_max(k, seed=k)
    rows["4096 large"] = large_output_max(4096, seed=1)
    return rows


def _rates(draws: list[list[float]], cond_factor: float) -> dict:
    """How often "X <= k Y" fails for X, Y the max of n independent draws (k = 2 for outputs, 3 for
    gradients), and for one draw with PyTorch's error bounded below by the model."""
    e = torch.tensor([v for d in draws for v in d], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in MAX_OF:
        m = max(400, 200_000 // n)
        x = e[torch.randint(len(e), (m, n), generator=g)].amax(1)
        y = e[torch.randint(len(e), (m, n), generator=g)].amax(1)
        out[f"max of {n:3d} draws, 2x / 3x"] = (float((x > 2 * y).double().mean()),
                                                float((x > 3 * y).double().mean()))
    x, y = (e[torch.randint(len(e), (200_000,), generator=g)] for _ in range(2))
    floor = torch.clamp(y, min=cond_factor)
    out["one draw with the model, 2x / 3x"] = (float((x > 2 * floor).double().mean()),
                                               float((x > 3 * floor).double().mean()))
    return out


def main(argv=None) -> None:
    from llmkern.testing.tolerances import TOLERANCES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=3000, help="draws per row (50x that for the tail)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        json.dump(_child(args.draws), sys.stdout)
        return
    cond_factor = TOLERANCES[torch.float32].cond_factor
    all_draws = []
    print(f"one fp32 dot of K randn terms: error / (eps * sum|a_k b_k|), {args.draws} draws per row")
    print(f"{'path':>10} {'K':>5} {'N':>3}  " + "  ".join(f"p{100 * q:g}".rjust(6) for q in QUANTILES)
          + "     max  64x64 max")
    for path in CODE_PATHS:
        env = dict(os.environ, MKL_CBWR=path)
        out = subprocess.run([sys.executable, "-m", "llmkern.testing.calibrate", "--child", "--draws",
                              str(args.draws)], env=env, capture_output=True, text=True, check=True).stdout
        rows = json.loads(out)
        for k in (*KS, 4096):
            for n in NS if k in KS else ():
                r = rows[f"{k} {n}"]
                all_draws.append(r["draws"])
                last = f"  {rows[f'{k} large']:9.3f}" if n == NS[-1] else ""
                print(f"{path:>10} {k:5d} {n:3d}  " + "  ".join(f"{v:6.3f}" for v in r["q"])
                      + f"  {r['max']:6.3f}{last}")
            if k not in KS:
                print(f"{path:>10} {k:5d} {'':>3}  {'':>54}  {rows[f'{k} large']:9.3f}")
    print(f"failure rates of a kernel as accurate as PyTorch (cond_factor = {cond_factor}):")
    for name, (two, three) in _rates(all_draws, cond_factor).items():
        print(f"  {name:34s} {two:7.2%} {three:7.2%}")
    tail_draws = 50 * args.draws
    print(f"the tail, {tail_draws} draws per K (output checks allow 2 cond_factor, gradient checks 3):")
    for k in (64, 123):
        print(f"  K = {k:4d}  " + "  ".join(f"{n} {v:.3g}" for n, v in
                                           tail_rates(k, tail_draws, k, cond_factor).items()))


if __name__ == "__main__":
    main()
