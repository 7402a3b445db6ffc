"""The driver shared by the fused-op benchmarks (bench_rms_norm.py, bench_layer_norm.py, bench_swiglu.py,
bench_rope.py, bench_cross_entropy.py, bench_fused_linear_cross_entropy.py).

A benchmark script describes its op as a :class:`Bench`: the shapes, and per (shape, dtype) a
:class:`Case` with the candidates' zero-argument calls per mode, a validation, and the bytes the
fused kernel and the unfused PyTorch sequence move (a model from shapes). The driver runs every
case through bench/_harness.py (candidates interleaved round-robin, per-round paired ratios, the
CPU share other processes took), writes one CSV/JSON in the harness's schema with Ratio records
(per dtype, shape and mode: the speed-up over eager and over torch.compile of the same eager code,
with the issue's goals on fwd+bwd; the bytes-moved model's fused/unfused ratio; the peak-memory
ratio where the op's goal is memory) and prints a summary table and the ratios.

Candidates: ``eager`` (the transformers module's own code, or the PyTorch sequence it runs: the
baseline of every ratio), ``compiled`` (torch.compile of that eager code; compiling takes minutes on
a busy 2-core machine, so --quick leaves it out unless --compiled is given) and ``llmkern``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from llmkern.testing.memory import peak_bytes  # noqa: F401 (the benches import it from here)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import (Ratio, environment, format_ratios, format_table, measure, wait_for_quiet_cpu,  # noqa: E402
                      write_results)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(kw_only=True)
class Case:
    """One shape and dtype of one op."""

    shape: str
    """The shape in the op's letters, e.g. "T=4096,C=4096"."""
    calls: dict[str, dict[str, Callable[[], object]]]
    """mode ("fwd", "fwd+bwd") -> candidate -> a zero-argument call."""
    validate: Callable[[], float]
    """llmkern against eager before timing: the largest |Δ| relative to max |eager|."""
    tolerance: float
    """The largest validation error accepted (a few ulps of the dtype: eager rounds more often)."""
    bytes_fused: dict[str, int]
    """mode -> the bytes the fused kernel reads and writes (the model of the module docstring)."""
    bytes_unfused: dict[str, int]
    """mode -> the bytes the eager PyTorch sequence reads and writes (each op's inputs and outputs)."""
    extra: dict[str, object] = dataclasses.field(default_factory=dict)
    """Columns added to every row of the case."""
    peak: dict[str, int] | None = None
    """candidate -> the peak bytes one fwd+bwd allocates (peak_bytes), where the op's goal is memory."""


@dataclasses.dataclass(kw_only=True)
class Bench:
    """One op's benchmark."""

    op: str
    """The op's name (the results file is bench/results/<op>.csv)."""
    doc: str
    """The script's docstring (its first line is the argparse description)."""
    shapes: list[dict]
    """Keyword arguments of make_case for the full run."""
    quick_shapes: list[dict]
    """Keyword arguments of make_case for --quick."""
    make_case: Callable[..., Case]
    """make_case(dtype=..., compiled=bool, **shape) -> Case."""
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    """The modes timed."""
    goal_eager: float | None = 1.5
    """The speedup over eager the issue asks for in fwd+bwd (None: no speed goal)."""
    goal_compiled: float | None = 1.0
    """The speedup over torch.compile asked for in fwd+bwd."""
    goal_peak: float | None = None
    """The largest llmkern/eager peak-memory ratio asked for (None: no memory goal)."""
    rounds: int = 7
    """Rounds of the full run (2 with --quick)."""
    warmup: int | None = None
    """Untimed calls per candidate first (None: 2 with torch.compile, else 1)."""


def compile_eager(fn: Callable) -> Callable:
    """torch.compile of the eager code (inductor, the default), as a user would compile the model."""
    return torch.compile(fn)


def main(bench: Bench, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=bench.doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 rounds, no torch.compile: seconds")
    ap.add_argument("--compiled", action="store_true", help="with --quick: time torch.compile too")
    ap.add_argument("--no-compiled", action="store_true", help="leave torch.compile out of the full run")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, 1 with --quick)")
    ap.add_argument("--wait", type=float, default=None, help="seconds to wait for a quiet CPU (default 60, 0 quick)")
    ap.add_argument("--name", default=None, help=f"results file name (default {bench.op}, {bench.op}_quick)")
    args = ap.parse_args(argv)
    compiled = (args.compiled or not args.quick) and not args.no_compiled
    rounds = args.rounds or (2 if args.quick else bench.rounds)
    threads = args.threads or (1 if args.quick else 2)
    wait = args.wait if args.wait is not None else (0.0 if args.quick else 60.0)
    torch.set_num_threads(threads)
    name = args.name or (f"{bench.op}_quick" if args.quick else bench.op)
    print(f"bench {bench.op}: threads {threads}, {rounds} rounds, torch.compile {'on' if compiled else 'off'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    rows, summary, contention, ratios = [], [], [], []
    for shape_kw in (bench.quick_shapes if args.quick else bench.shapes):
        for dname in args.dtypes.split(","):
            case = bench.make_case(dtype=DTYPES[dname], compiled=compiled, **shape_kw)
            err = case.validate()
            if not err <= case.tolerance:
                print(f"FAILED: llmkern and eager disagree ({bench.op} {dname} {case.shape}): {err:.2e} > "
                      f"{case.tolerance:g}")
                return 1
            for mode in bench.modes:
                if wait > 0:
                    wait_for_quiet_cpu(0.15, timeout=wait)
                calls = case.calls[mode]
                res = measure(calls, warmup=(2 if compiled else 1) if bench.warmup is None else bench.warmup,
                              rounds=rounds)
                contention.append(res.contention)
                fused_b, unfused_b = case.bytes_fused[mode], case.bytes_unfused[mode]
                for cand in calls:
                    t = res.median_ms(cand)
                    lo, hi = res.ratio_spread(cand, "eager")
                    rows.append({"op": bench.op, "candidate": cand, "dtype": dname, "shape": case.shape, "mode": mode,
                                 "median_ms": t, "ratio_vs_baseline": res.ratio(cand, "eager"), "baseline": "eager",
                                 "gbytes_per_s": (fused_b if cand == "llmkern" else unfused_b) / t / 1e6,
                                 "ratio_min": lo, "ratio_max": hi, "contention": res.contention,
                                 "bytes_model": fused_b if cand == "llmkern" else unfused_b,
                                 "validation_rel_err": err if cand == "llmkern" else None, **case.extra,
                                 **({"peak_bytes": case.peak[cand]} if case.peak else {})})
                tag = f"{dname} {case.shape} {mode}"
                timed_goal = mode == "fwd+bwd"
                ratios.append(Ratio.from_rounds(f"{tag}: speed-up over eager",
                                                [1 / r for r in res.round_ratios("llmkern", "eager")], peer="eager",
                                                goal=bench.goal_eager if timed_goal else None))
                if "compiled" in calls:
                    ratios.append(Ratio.from_rounds(f"{tag}: speed-up over torch.compile",
                                                    [1 / r for r in res.round_ratios("llmkern", "compiled")],
                                                    peer="torch.compile", goal=bench.goal_compiled if timed_goal else None))
                ratios.append(Ratio(name=f"{tag}: bytes moved / eager's (model)", value=fused_b / unfused_b,
                                    peer="eager", higher_is_better=False))
                if case.peak and mode == "fwd+bwd":
                    ratios.append(Ratio(name=f"{dname} {case.shape}: peak bytes of fwd+bwd / eager's",
                                        value=case.peak["llmkern"] / case.peak["eager"], peer="eager",
                                        goal=bench.goal_peak, higher_is_better=False))
                speed_c = 1 / res.ratio("llmkern", "compiled") if "compiled" in calls else None
                summary.append({"dtype": dname, "shape": case.shape, "mode": mode,
                                "speedup_vs_eager": 1 / res.ratio("llmkern", "eager"), "speedup_vs_compiled": speed_c,
                                "bytes_fused_MB": fused_b / 1e6, "bytes_unfused_MB": unfused_b / 1e6,
                                "fused_GBps": fused_b / res.median_ms("llmkern") / 1e6,
                                "contention": res.contention, **case.extra,
                                **({"peak_MB_llmkern": case.peak["llmkern"] / 1e6, "peak_MB_eager": case.peak["eager"] / 1e6,
                                    "peak_ratio": case.peak["llmkern"] / case.peak["eager"]} if case.peak else {})})
                print(f"  {dname} {case.shape} {mode}: llmkern {res.median_ms('llmkern'):.2f} ms, eager "
                      f"{res.median_ms('eager'):.2f} ms" + (f", compiled {res.median_ms('compiled'):.2f} ms"
                                                          if "compiled" in calls else "") +
                      f"; others used {'n/a' if res.contention is None else f'{res.contention:.0%}'} of the CPU",
                      flush=True)
            del case
    worst = max((c for c in contention if c is not None), default=None)
    env = environment(contention=worst, contention_per_measurement=contention, rounds=rounds, summary=summary,
                      quick=args.quick, threads=threads, loadavg=os.getloadavg())
    csv_path, json_path = write_results(name, rows, env, ratios)
    print()
    print(format_table(summary, ["dtype", "shape", "mode", "speedup_vs_eager", "speedup_vs_compiled", "bytes_fused_MB",
                                 "bytes_unfused_MB", "fused_GBps", "contention", *summary[0].keys() - {
                                     "dtype", "shape", "mode", "speedup_vs_eager", "speedup_vs_compiled",
                                     "bytes_fused_MB", "bytes_unfused_MB", "fused_GBps", "contention"}]))
    print()
    print(format_ratios(ratios))
    print(f"contention (largest CPU share of other processes during a measurement): "
          f"{'n/a' if worst is None else f'{worst:.0%}'}; load average {os.getloadavg()[0]:.1f}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], object]:
    """A zero-argument forward + backward of ``fn(*leaves)`` with fresh leaf copies of ``inputs`` that
    require grad and fixed output gradients ``grads`` (one per output)."""
    def run():
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward(outs, grads)
        return leaves[0].grad
    return run


def fwd(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(*inputs)
    return run


class _ByteCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums, over the ops that run (views excluded), the bytes of their tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
            self.bytes += sum(t.untyped_storage().nbytes() if t.dim() == 0 else t.numel() * t.element_size()
                              for t in leaves if isinstance(t, torch.Tensor))
        return out


def dispatch_bytes(fn: Callable[[], object]) -> int:
    """The memory traffic of fn() as the ops it runs see it: every dispatcher op reads its inputs and
    writes its outputs once (views move nothing). For eager PyTorch that is the unfused sequence's
    traffic; for a fused llmkern op it is the kernel's minimum (its inputs once, its outputs once)."""
    with _ByteCounter() as counter:
        fn()
    return counter.bytes


def rel_err(a, b) -> float:
    a, b = (a if isinstance(a, (tuple, list)) else (a,)), (b if isinstance(b, (tuple, list)) else (b,))
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)) for x, y in zip(a, b))
