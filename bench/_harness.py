"""The benchmark harness shared by every ``bench/**/bench_*.py`` script.

Method (shared/research/baselines.md): this VM's absolute times drift by 15-50 % between runs, while
ratios between candidates that run interleaved in one process are stable to about ±0.05-0.1. So:

- :func:`wait_for_quiet_cpu` waits until other processes use less than ``max_share`` of the CPU;
- :func:`measure` warms every candidate up, then runs them round-robin, rotating the order every
  round, and returns per-candidate medians plus **per-round paired ratios** (a ratio is the median of
  the per-round ratios, so drift that hits a whole round cancels);
- the CPU share other processes took *during* the measurement is recorded as ``contention``;
- :func:`write_results` writes ``bench/results/<name>.csv`` and ``.json`` in one schema.
"""
from __future__ import annotations

import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The columns every results file has, in this order; a script's extra fields follow, sorted.
SCHEMA = ("op", "candidate", "dtype", "shape", "mode", "median_ms", "ratio_vs_baseline", "baseline",
          "gbytes_per_s", "gflops")


# ---------------------------------------------------------------------------------------------
# CPU contention from /proc/stat

def _proc_stat() -> tuple[float, float]:
    """(busy, total) seconds summed over all CPUs since boot; (0, 0) where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / hz, total / hz


def _own_cpu() -> float:
    """CPU seconds used by this process (all threads) and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ContentionMeter:
    """The share of all CPUs that *other* processes used between start() and stop():
    (busy CPU time of the machine - our own CPU time) / (wall time x CPUs)."""

    def start(self) -> "ContentionMeter":
        self._busy, self._total = _proc_stat()
        self._own = _own_cpu()
        return self

    def stop(self) -> float | None:
        busy, total = _proc_stat()
        if total <= self._total:
            return None
        others = (busy - self._busy) - (_own_cpu() - self._own)
        return max(0.0, min(1.0, others / (total - self._total)))


def wait_for_quiet_cpu(max_share: float = 0.15, timeout: float = 300.0, window: float = 1.0,
                       quiet_windows: int = 2, verbose: bool = True) -> float | None:
    """Blocks until other processes used less than `max_share` of the CPU over `quiet_windows`
    consecutive windows of `window` seconds, or until `timeout`. Returns the last measured share.
    On timeout it says so and returns: the contention of the run itself is recorded anyway."""
    deadline = time.monotonic() + timeout
    quiet, share, announced = 0, None, False
    while True:
        m = ContentionMeter().start()
        time.sleep(window)
        share = m.stop()
        if share is None:  # no /proc/stat: nothing to wait for
            return None
        quiet = quiet + 1 if share < max_share else 0
        if quiet >= quiet_windows:
            return share
        if time.monotonic() >= deadline:
            if verbose:
                print(f"wait_for_quiet_cpu: other processes still use {share:.0%} of the CPU after {timeout:.0f} s "
                      f"(wanted < {max_share:.0%}); measuring anyway, contention is recorded", flush=True)
            return share
        if verbose and not announced:
            print(f"waiting for a quiet CPU: others use {share:.0%} (want < {max_share:.0%}, "
                  f"timeout {timeout:.0f} s)...", flush=True)
            announced = True


# ---------------------------------------------------------------------------------------------
# Timing

@dataclass
class Measurement:
    """Times in ms: ``samples[name]`` every timed call, ``rounds[name]`` the median per round."""
    samples: dict[str, list[float]] = field(default_factory=dict)
    rounds: dict[str, list[float]] = field(default_factory=dict)
    contention: float | None = None

    def median_ms(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def round_ratios(self, name: str, baseline: str) -> list[float]:
        """Per-round paired ratios name/baseline: both ran in the same round, back to back."""
        return [a / b for a, b in zip(self.rounds[name], self.rounds[baseline])]

    def ratio(self, name: str, baseline: str) -> float:
        """The median of the per-round ratios (not the ratio of medians)."""
        return statistics.median(self.round_ratios(name, baseline))

    def ratio_spread(self, name: str, baseline: str) -> tuple[float, float]:
        r = self.round_ratios(name, baseline)
        return min(r), max(r)


def measure(candidates: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 1, rounds: int = 5,
            sync: Callable[[], None] | None = None) -> Measurement:
    """Times each zero-argument callable: `warmup` untimed calls each, then `rounds` rounds in which
    every candidate runs `repeats` timed calls, candidates in an order rotated by one every round
    (so none always runs first, right after another one's cache and memory traffic).
    `sync` (e.g. ``torch.cuda.synchronize``) runs after every call, inside the timed region."""
    names = list(candidates)
    res = Measurement(samples={n: [] for n in names}, rounds={n: [] for n in names})
    sync = sync or (lambda: None)
    for n in names:
        for _ in range(warmup):
            candidates[n]()
            sync()
    meter = ContentionMeter().start()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside a timed call would be charged to whichever candidate ran
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    candidates[n]()
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                res.samples[n] += times
                res.rounds[n].append(statistics.median(times))
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    res.contention = meter.stop()
    return res


# ---------------------------------------------------------------------------------------------
# Module calls and saved activations (the op benchmarks)

def fwd_call(m, x) -> Callable[[], object]:
    """A zero-argument call of ``m(x)`` under no_grad (train mode stays as set, so dropout runs)."""
    import torch

    def run():
        with torch.no_grad():
            return m(x)
    return run


def fwd_bwd_call(m, x0, gy) -> Callable[[], object]:
    """A zero-argument forward + backward of ``m`` on a fresh leaf copy of ``x0`` that requires grad,
    with the fixed grad output ``gy``; parameter grads are set to None after every call."""
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        x = x0.detach().requires_grad_()
        m(x).backward(gy)
        for p in params:
            p.grad = None
        return x.grad
    return run


def saved_storages(fn: Callable[[], object], exclude=()) -> dict[int, int]:
    """The storages autograd saves for backward while ``fn()`` runs, as {data_ptr: bytes}: each
    storage once, those of the ``exclude`` tensors (the parameters) left out. ``fn``'s result is
    dropped after the count."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


# ---------------------------------------------------------------------------------------------
# Environment and results

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(contention: float | None = None, **extra) -> dict:
    """The environment block of a results file. `contention`: the largest CPU share other processes
    took during any measurement of the run (None where /proc/stat is unavailable)."""
    import torch

    env = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": _git_commit(),
           "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_model(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "contention": contention,
           "argv": sys.argv}
    try:
        import llmkern
        env["llmkern"] = llmkern.__version__
    except ImportError:
        env["llmkern"] = None
    env.update(extra)
    return env


def results_dir() -> Path:
    """``bench/results``, or ``$LLMKERN_BENCH_RESULTS`` (tests write to a temporary folder)."""
    return Path(os.environ.get("LLMKERN_BENCH_RESULTS", BENCH_DIR / "results"))


def write_results(name: str, rows: list[dict], env: dict) -> tuple[Path, Path]:
    """Writes ``<results>/<name>.csv`` (the rows, SCHEMA columns first) and ``<name>.json``
    (``{"name", "env", "rows"}``). Missing schema fields are written empty / null."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in r} - set(SCHEMA))
    cols = list(SCHEMA) + extra
    full = [{c: r.get(c) for c in cols} for r in rows]
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in full:
            w.writerow({k: _fmt_csv(v) for k, v in r.items()})
    json_path.write_text(json.dumps({"name": name, "env": env, "rows": full}, indent=1, default=str) + "\n")
    return csv_path, json_path


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def format_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A plain-text table of `rows` (floats with 3-4 significant digits)."""
    if cols is None:  # the schema's columns that have values, else every key in first-seen order
        cols = [c for c in SCHEMA if any(r.get(c) is not None for r in rows)]
        cols = cols or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
