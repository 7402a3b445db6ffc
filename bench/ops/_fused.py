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
a busy 2-core machine, so --quick leaves it out unless --compiled is given), ``llmkern`` and, on a
GPU, ``liger`` (Liger-Kernel's functional API through bench/ops/_liger.py).

``--device cpu`` (the default) runs CPU tensors and llmkern's C++ kernels (backend="cpu"), peak
memory from the profiler's allocation records (llmkern.testing.memory.peak_bytes). ``--device cuda``
runs the same cases on GPU tensors with llmkern's Triton kernels (backend="triton"), a
torch.cuda.synchronize() inside every timed call, peak memory from the CUDA caching allocator's
statistics (:func:`peak_of`), and Liger-Kernel as a peer: ratios over it (speed-up in fwd+bwd with the
goal 1.0, peak memory where the op has a memory goal) join the others. Where Liger cannot run (a CPU
run, no GPU, liger_kernel not importable, another version than the pinned one) the printed output and
the JSON's ``env["liger"]`` say it was skipped and why. Results are ``<op>[_cuda][_quick].{csv,json}``
in one schema, the device in ``env["device"]`` and on every row.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from llmkern.testing.memory import peak_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _liger  # noqa: E402
from _harness import (Ratio, environment, format_ratios, format_table, measure, wait_for_quiet_cpu,  # noqa: E402
                      write_results)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")
PEERS = ("llmkern", "liger")
"""The candidates checked against eager before timing: llmkern, and Liger where it runs."""


def llmkern_backend(device: str) -> str:
    """llmkern's backend on ``device``: the C++ kernels on CPU, the Triton kernels on a GPU."""
    return "cpu" if device == "cpu" else "triton"


def peak_of(call: Callable[[], object], device: str) -> int:
    """The peak bytes one ``call()`` allocates beyond what is live before it: on CPU the profiler's
    allocation records (llmkern.testing.memory.peak_bytes), on CUDA the caching allocator's peak
    (torch.cuda.max_memory_allocated after reset_peak_memory_stats) less the bytes allocated before."""
    if device == "cpu":
        return peak_bytes(call)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@dataclasses.dataclass(kw_only=True)
class Case:
    """One shape and dtype of one op."""

    shape: str
    """The shape in the op's letters, e.g. "T=4096,C=4096"."""
    calls: dict[str, dict[str, Callable[[], object]]]
    """mode ("fwd", "fwd+bwd") -> candidate -> a zero-argument call."""
    validate: Callable[[str], float]
    """validate(candidate) before timing: the largest |Δ| of its output from eager's relative to max |eager|
    (run on fresh copies of the inputs: :func:`against_eager`), for llmkern and Liger."""
    tolerance: float
    """The largest validation error accepted (a few ulps of the dtype: eager rounds more often)."""
    liger_tolerance: float | None = None
    """The same for Liger where it differs (its cross-entropy returns the loss in the logits' dtype);
    None: ``tolerance``."""
    bytes_fused: dict[str, int]
    """mode -> the bytes the fused kernel reads and writes (the model of the module docstring)."""
    bytes_unfused: dict[str, int]
    """mode -> the bytes the eager PyTorch sequence reads and writes (each op's inputs and outputs)."""
    extra: dict[str, object] = dataclasses.field(default_factory=dict)
    """Columns added to every row of the case."""
    peak: dict[str, int] | None = None
    """candidate -> the peak bytes one fwd+bwd allocates (peak_of), where the op's goal is memory."""


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
    """make_case(dtype=..., compiled=bool, device="cpu"|"cuda", liger=bool, **shape) -> Case; with
    liger=True the calls include the "liger" candidate."""
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    """The modes timed."""
    goal_eager: float | None = 1.5
    """The speedup over eager the issue asks for in fwd+bwd (None: no speed goal)."""
    goal_compiled: float | None = 1.0
    """The speedup over torch.compile asked for in fwd+bwd."""
    goal_peak: float | None = None
    """The largest llmkern/eager peak-memory ratio asked for (None: no memory goal)."""
    goal_liger: float | None = 1.0
    """The speed-up over Liger-Kernel asked for in fwd+bwd on a GPU."""
    goal_liger_peak: float | None = None
    """The largest llmkern/Liger peak-memory ratio asked for (None: reported only)."""
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
    ap.add_argument("--device", choices=DEVICES, default="cpu",
                    help="cpu: llmkern's C++ kernels; cuda: its Triton kernels, with Liger-Kernel as a peer")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2, 1 with --quick)")
    ap.add_argument("--wait", type=float, default=None, help="seconds to wait for a quiet CPU (default 60, 0 quick)")
    ap.add_argument("--name", default=None,
                    help=f"results file name (default {bench.op}[_cuda][_quick], e.g. {bench.op}_cuda_quick)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(f"bench {bench.op}: --device cuda, but torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda}); run with --device cpu")
        return 2
    compiled = (args.compiled or not args.quick) and not args.no_compiled
    rounds = args.rounds or (2 if args.quick else bench.rounds)
    threads = args.threads or (1 if args.quick else 2)
    wait = args.wait if args.wait is not None else (0.0 if args.quick else 60.0)
    torch.set_num_threads(threads)
    name = args.name or (bench.op + ("_cuda" if device == "cuda" else "") + ("_quick" if args.quick else ""))
    liger_skip = _liger.skip_reason(device)
    liger = {"version": _liger.version(), "pin": _liger.PIN, "measured": liger_skip is None, "skipped": liger_skip}
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"bench {bench.op}: device {device}{f' ({gpu})' if gpu else ''}, threads {threads}, {rounds} rounds, "
          f"torch.compile {'on' if compiled else 'off'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    print("Liger-Kernel peer: " + (f"measured (liger-kernel {liger['version']})" if liger_skip is None
                                    else f"skipped: {liger_skip}"), flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else None
    warmup = (2 if compiled else 1) if bench.warmup is None else bench.warmup
    if device == "cuda":  # the first calls compile and autotune the Triton kernels (llmkern's and Liger's)
        warmup = max(warmup, 2)

    rows, summary, contention, ratios = [], [], [], []
    for shape_kw in (bench.quick_shapes if args.quick else bench.shapes):
        for dname in args.dtypes.split(","):
            case = bench.make_case(dtype=DTYPES[dname], compiled=compiled, device=device, liger=liger_skip is None,
                                   **shape_kw)
            errs = {}
            for cand in (c for c in PEERS if c in case.calls["fwd"]):
                errs[cand] = case.validate(cand)
                tol = case.tolerance if cand == "llmkern" or case.liger_tolerance is None else case.liger_tolerance
                if not errs[cand] <= tol:
                    print(f"FAILED: {cand} and eager disagree ({bench.op} {dname} {case.shape} on {device}): "
                          f"{errs[cand]:.2e} > {tol:g}")
                    return 1
            for mode in bench.modes:
                if wait > 0:
                    wait_for_quiet_cpu(0.15, timeout=wait)
                calls = case.calls[mode]
                res = measure(calls, warmup=warmup, rounds=rounds, sync=sync)
                contention.append(res.contention)
                fused_b, unfused_b = case.bytes_fused[mode], case.bytes_unfused[mode]
                for cand in calls:
                    t = res.median_ms(cand)
                    lo, hi = res.ratio_spread(cand, "eager")
                    # Liger's kernels are fused too: the fused model is its minimum traffic as well.
                    model_b = fused_b if cand in PEERS else unfused_b
                    rows.append({"op": bench.op, "candidate": cand, "dtype": dname, "shape": case.shape, "mode": mode,
                                 "median_ms": t, "ratio_vs_baseline": res.ratio(cand, "eager"), "baseline": "eager",
                                 "gbytes_per_s": model_b / t / 1e6, "device": device,
                                 "ratio_min": lo, "ratio_max": hi, "contention": res.contention,
                                 "bytes_model": model_b, "validation_rel_err": errs.get(cand), **case.extra,
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
                if "liger" in calls:
                    ratios.append(Ratio.from_rounds(f"{tag}: speed-up over Liger-Kernel",
                                                    [1 / r for r in res.round_ratios("llmkern", "liger")],
                                                    peer="liger-kernel", goal=bench.goal_liger if timed_goal else None))
                ratios.append(Ratio(name=f"{tag}: bytes moved / eager's (model)", value=fused_b / unfused_b,
                                    peer="eager", higher_is_better=False))
                if case.peak and mode == "fwd+bwd":
                    ratios.append(Ratio(name=f"{dname} {case.shape}: peak bytes of fwd+bwd / eager's",
                                        value=case.peak["llmkern"] / case.peak["eager"], peer="eager",
                                        goal=bench.goal_peak, higher_is_better=False))
                    if "liger" in case.peak:
                        ratios.append(Ratio(name=f"{dname} {case.shape}: peak bytes of fwd+bwd / Liger-Kernel's",
                                            value=case.peak["llmkern"] / case.peak["liger"], peer="liger-kernel",
                                            goal=bench.goal_liger_peak, higher_is_better=False))
                speed_c = 1 / res.ratio("llmkern", "compiled") if "compiled" in calls else None
                speed_l = 1 / res.ratio("llmkern", "liger") if "liger" in calls else None
                peak_cols = {}
                if case.peak:
                    peak_cols = {"peak_MB_llmkern": case.peak["llmkern"] / 1e6, "peak_MB_eager": case.peak["eager"] / 1e6,
                                 "peak_ratio": case.peak["llmkern"] / case.peak["eager"]}
                    if "liger" in case.peak:
                        peak_cols["peak_MB_liger"] = case.peak["liger"] / 1e6
                summary.append({"dtype": dname, "shape": case.shape, "mode": mode,
                                "speedup_vs_eager": 1 / res.ratio("llmkern", "eager"), "speedup_vs_compiled": speed_c,
                                "speedup_vs_liger": speed_l if liger_skip is None else "skipped",
                                "bytes_fused_MB": fused_b / 1e6, "bytes_unfused_MB": unfused_b / 1e6,
                                "fused_GBps": fused_b / res.median_ms("llmkern") / 1e6,
                                "contention": res.contention, **case.extra, **peak_cols})
                print(f"  {dname} {case.shape} {mode}: " + ", ".join(
                    f"{c} {res.median_ms(c):.3f} ms" for c in calls) +
                      f"; others used {'n/a' if res.contention is None else f'{res.contention:.0%}'} of the CPU",
                      flush=True)
            del case
    worst = max((c for c in contention if c is not None), default=None)
    env = environment(contention=worst, contention_per_measurement=contention, rounds=rounds, summary=summary,
                      quick=args.quick, threads=threads, loadavg=os.getloadavg(), device=device, gpu=gpu,
                      liger=liger)
    csv_path, json_path = write_results(name, rows, env, ratios)
    first = ["dtype", "shape", "mode", "speedup_vs_eager", "speedup_vs_compiled", "speedup_vs_liger", "bytes_fused_MB",
             "bytes_unfused_MB", "fused_GBps", "contention"]
    print()
    print(format_table(summary, first + [k for k in summary[0] if k not in first]))
    print()
    print(format_ratios(ratios))
    if liger_skip is not None:
        print(f"Liger-Kernel peer skipped (no ratios against it): {liger_skip}")
    print(f"contention (largest CPU share of other processes during a measurement): "
          f"{'n/a' if worst is None else f'{worst:.0%}'}; load average {os.getloadavg()[0]:.1f}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


def _own(tensors: list[torch.Tensor], private: bool) -> list[torch.Tensor]:
    return [t.clone() for t in tensors] if private else tensors


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor], *,
            private: bool = False) -> Callable[[], object]:
    """A zero-argument forward + backward of ``fn(*leaves)`` with fresh leaf copies of ``inputs`` that
    require grad and fixed output gradients ``grads`` (one per output). The leaves are detached views of
    the inputs (no copy); ``private=True`` first clones the inputs and grads once, for a candidate whose
    kernels write over them (Liger's: bench/ops/_liger.py), so that the others keep reading the originals."""
    inputs, grads = _own(inputs, private), _own(grads, private)

    def run():
        leaves = [x.detach().requires_grad_() for x in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward(outs, grads)
        return leaves[0].grad
    return run


def fwd(fn: Callable, inputs: list[torch.Tensor], *, private: bool = False) -> Callable[[], object]:
    """A zero-argument ``fn(*inputs)`` under no_grad (``private``: as in :func:`fwd_bwd`)."""
    inputs = _own(inputs, private)

    def run():
        with torch.no_grad():
            return fn(*inputs)
    return run


def candidate_calls(fns: dict[str, Callable], inputs: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> dict[str, dict[str, Callable[[], object]]]:
    """{"fwd": {candidate: call}, "fwd+bwd": {...}} for the candidates ``fns`` (name -> fn(*inputs)); the
    liger candidate gets private copies of the inputs and grads (its kernels write over them)."""
    return {"fwd": {n: fwd(f, inputs, private=n == "liger") for n, f in fns.items()},
            "fwd+bwd": {n: fwd_bwd(f, inputs, grads, private=n == "liger") for n, f in fns.items()}}


def against_eager(fns: dict[str, Callable], inputs: list[torch.Tensor]) -> Callable[[str], float]:
    """Case.validate for candidates ``fns``: candidate -> rel_err of its forward on fresh copies of
    ``inputs`` against eager's forward on the inputs themselves."""
    def validate(cand: str) -> float:
        with torch.no_grad():
            return rel_err(fns[cand](*[t.clone() for t in inputs]), fns["eager"](*inputs))
    return validate


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
