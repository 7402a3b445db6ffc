"""The benchmark harness shared by every ``bench/**/bench_*.py`` script.

Method: absolute times on these shared 2-core VMs drift by 15-50 % between runs, while ratios
between candidates that run interleaved in one process are stable to about ±0.05-0.1. So:

- :func:`wait_for_quiet_cpu` waits until other processes use less than ``max_share`` of the CPU;
- :func:`measure` warms every candidate up, then runs them round-robin, rotating the order every
  round, and returns per-candidate medians plus **per-round paired ratios** (a ratio is the median of
  the per-round ratios, so drift that hits a whole round cancels);
- a :class:`Ratio` states one comparison of llmkern with a peer measured in the same run: its value
  (the median over rounds), its spread (the min and max over rounds: the noise band that
  ``llmkern bench --compare`` uses), the goal and whether higher is better;
- the CPU share other processes took *during* the measurement is recorded as ``contention``;
- :func:`write_results` writes ``<results>/<name>.json``, ``<name>.csv`` and ``<name>.ratios.csv``
  in one schema (SCHEMA_VERSION), each with the environment (CPU model and ISA, versions, load).

A distributed benchmark declares the rank counts it runs at with a module-level line
``TORCHRUN_NPROC = (2, 4)``; ``llmkern bench`` reads it (without importing the script) and starts the
script under ``python -m torch.distributed.run --standalone --nproc-per-node N`` once per count. Every
script takes ``--quick`` (seconds, for the smoke test in ``make test``); rank 0 writes the results.
"""
from __future__ import annotations

import csv
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# Version of the results files' layout: 2 added ratios, the spread and the environment columns.
SCHEMA_VERSION = 2
# The columns every results row has, in this order; a script's extra fields follow, sorted.
SCHEMA = ("op", "candidate", "dtype", "shape", "mode", "median_ms", "ratio_vs_baseline", "baseline",
          "gbytes_per_s", "gflops")
# The fields of a ratio record (Ratio.to_dict), in this order.
RATIO_FIELDS = ("name", "value", "lo", "hi", "peer", "goal", "higher_is_better", "met")
# Appended to every CSV line (rows and ratios), so that one CSV file on its own tells an Intel run
# from an AMD run, and the lines of several runs can be concatenated.
ENV_COLUMNS = ("cpu", "cpu_isa", "timestamp", "git_commit")


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


@dataclass(frozen=True, slots=True)
class Spread:
    """The min, median and max of one quantity over the interleaved rounds of a measurement."""
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values) -> "Spread":
        v = [float(x) for x in values]
        if not v:
            raise ValueError("a spread needs at least one value")
        return cls(min(v), statistics.median(v), max(v))


@dataclass(kw_only=True, slots=True)
class Ratio:
    """One comparison of llmkern with a peer measured in the same run, and its goal.

    The orientation is the bench's choice and is stated by ``higher_is_better``: a speed-up
    (peer time / llmkern time) is higher-is-better, a time or memory fraction (llmkern / peer) is
    lower-is-better."""

    name: str
    """What is compared, unique within its results file, e.g. "fwd+bwd bf16 p=0.05: overhead / PEFT's"."""
    value: float
    """The ratio: the median of the per-round values when it comes from timed rounds."""
    peer: str
    """The peer or bound it is taken against, e.g. "peft", "torch AdamW(fused=True)", "roofline"."""
    goal: float | None = None
    """The value to reach (>= goal when higher_is_better, else <= goal); None: reported only."""
    higher_is_better: bool = True
    """Whether a larger value is the better one."""
    lo: float | None = None
    """The smallest per-round value (None for a deterministic count, e.g. bytes)."""
    hi: float | None = None
    """The largest per-round value (None for a deterministic count)."""

    @classmethod
    def from_rounds(cls, name: str, values, **kw) -> "Ratio":
        """A ratio whose value is the median of per-round `values` and whose spread is their range."""
        sp = Spread.of(values)
        return cls(name=name, value=sp.median, lo=sp.min, hi=sp.max, **kw)

    @property
    def met(self) -> bool | None:
        """Whether the goal is reached (None when there is no goal)."""
        if self.goal is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "lo": self.lo, "hi": self.hi, "peer": self.peer,
                "goal": self.goal, "higher_is_better": self.higher_is_better, "met": self.met}

    @classmethod
    def from_dict(cls, d: dict) -> "Ratio":
        return cls(**{k: d.get(k) for k in ("name", "value", "peer", "goal", "lo", "hi")},
                   higher_is_better=bool(d.get("higher_is_better", True)))

    def describe_goal(self) -> str:
        return "-" if self.goal is None else f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"


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

# Started when the script imports the harness: `contention_script` in the environment block is the
# CPU share other processes took over the script's whole life, warm-up and setup included.
_SCRIPT_METER = ContentionMeter().start()


def environment(contention: float | None = None, **extra) -> dict:
    """The environment block of a results file:

    - ``cpu``: model, vendor, ISA flags, cores, torch's CPU capability and threads;
    - ``versions``: llmkern, torch, triton, numpy and the peers (transformers, peft, accelerate,
      deepspeed), None where not installed;
    - ``contention``: the largest CPU share other processes took during any measurement (the
      script passes it; None where /proc/stat is unavailable); ``contention_script``: the same over
      the script's whole life; ``load_after``: load averages and a 0.5 s busy/steal/idle sample;
    - ``timestamp``, ``git_commit``, ``python``, ``argv``, and the script's `extra` fields.
    """
    from llmkern import bench_env

    env = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git_commit": bench_env.git_commit(ROOT), "python": platform.python_version(),
           "cpu": bench_env.cpu(), "versions": bench_env.versions(), "contention": contention,
           "contention_script": _SCRIPT_METER.stop(), "load_after": bench_env.load(0.5), "argv": sys.argv}
    env.update(extra)
    return env


def results_dir() -> Path:
    """``bench/results``, or ``$LLMKERN_BENCH_RESULTS`` (``llmkern bench`` and the tests set it)."""
    return Path(os.environ.get("LLMKERN_BENCH_RESULTS", BENCH_DIR / "results"))


def write_results(name: str, rows: list[dict], env: dict, ratios=()) -> tuple[Path, Path]:
    """Writes, under results_dir():

    - ``<name>.json``: ``{"schema": SCHEMA_VERSION, "name", "env", "rows", "ratios"}``, every row with
      the SCHEMA fields first (null where missing) and every ratio as Ratio.to_dict();
    - ``<name>.csv``: the rows, SCHEMA columns first, then the script's extra fields sorted, then
      ENV_COLUMNS;
    - ``<name>.ratios.csv`` (when there are ratios): RATIO_FIELDS, then ENV_COLUMNS.

    Returns the paths of the rows CSV and the JSON."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in rows for k in r} - set(SCHEMA))
    cols = list(SCHEMA) + extra
    full = [{c: r.get(c) for c in cols} for r in rows]
    ratio_dicts = [r.to_dict() if isinstance(r, Ratio) else Ratio.from_dict(r).to_dict() for r in ratios]
    names = [r["name"] for r in ratio_dicts]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: ratio names must be unique within a results file, got {names}")
    env_cols = csv_env_columns(env)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    _write_csv(csv_path, cols, full, env_cols)
    if ratio_dicts:
        _write_csv(out / f"{name}.ratios.csv", list(RATIO_FIELDS), ratio_dicts, env_cols)
    doc = {"schema": SCHEMA_VERSION, "name": name, "env": env, "rows": full, "ratios": ratio_dicts}
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return csv_path, json_path


def csv_env_columns(env: dict) -> dict:
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
    return {"cpu": cpu.get("model"), "cpu_isa": " ".join(cpu.get("isa", [])),
            "timestamp": env.get("timestamp"), "git_commit": env.get("git_commit")}


def _write_csv(path: Path, cols: list[str], rows: list[dict], env_cols: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + [c for c in ENV_COLUMNS if c not in cols])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: csv_value(r.get(k)) for k in cols}, **env_cols})


def format_ratios(ratios) -> str:
    """A plain-text table of Ratio records: value [min-max over rounds], goal, met / MISSED / -."""
    rows = []
    for r in ratios:
        r = r if isinstance(r, Ratio) else Ratio.from_dict(r)
        spread = "-" if r.lo is None else f"{r.lo:.3g} .. {r.hi:.3g}"
        status = {None: "-", True: "met", False: "MISSED"}[r.met]
        rows.append({"ratio": r.name, "peer": r.peer, "value": f"{r.value:.3g}", "rounds min-max": spread,
                     "goal": r.describe_goal(), "status": status})
    return format_table(rows, ["ratio", "peer", "value", "rounds min-max", "goal", "status"]) if rows else "(no ratios)"


def csv_value(v):
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
