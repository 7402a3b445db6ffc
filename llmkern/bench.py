"""`llmkern bench [ops|optim|peft|parallel|all] [--quick] [--device cpu|cuda] [--out DIR] [--compare FILE]`.

Runs every ``bench/<suite>/bench_*.py`` of the source checkout, each in its own process; a script
with a module-level ``TORCHRUN_NPROC = (2, 4)`` runs under ``python -m torch.distributed.run
--standalone --nproc-per-node N`` once per count (read with ``ast``: the script is not imported).
Each run writes its results (bench/_harness.write_results) into its own folder under
``DIR/raw/``, and its output into ``DIR/logs/``. Then:

- one line per run, under a progress bar, and one summary table: every Ratio recorded in the run
  (llmkern against each peer measured in the same process), its spread over rounds, the goal, and
  met / MISSED;
- ``DIR/bench.json`` (the environment, the runs, every results document) and ``DIR/ratios.csv``;
- PNG plots under ``DIR/plots/`` (llmkern/bench_plots.py);
- with ``--compare FILE`` (an earlier ``bench.json`` or one results ``.json``), the ratios that moved
  outside the noise band that run measured (its min-max over rounds) are flagged.

``--device cuda`` is passed to the scripts that declare ``TAKES_DEVICE = True`` (the fused-op benches,
whose shared driver bench/ops/_fused.py defines --device: on a GPU they run llmkern's Triton kernels
with Liger-Kernel as a peer); the others run as they are, on CPU, and their line says so.

Missed goals and flagged moves are reported, not errors: the exit code is 1 only when a benchmark
failed (non-zero exit or timeout) or none ran.
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Suite = Literal["ops", "optim", "peft", "parallel"]
SUITES: tuple[Suite, ...] = ("ops", "optim", "peft", "parallel")
SCHEMA_VERSION = 2  # of bench.json; the per-benchmark documents carry bench/_harness.SCHEMA_VERSION
# Per-run time limits. The full runs take 0.5-4 min each on 2 cores (bench_lora is the longest);
# --quick runs take seconds, but the distributed ones start 2-4 processes that import torch.
TIMEOUT_S = {False: 1800, True: 600}


@dataclass(kw_only=True, slots=True, frozen=True)
class Job:
    """One process (or one torchrun group) to start."""

    script: Path
    """The bench script."""
    suite: str
    """Its folder under bench/: ops, optim, peft or parallel."""
    nproc: int | None
    """Ranks under torchrun, or None for a plain process."""
    takes_quick: bool
    """Whether the script declares a --quick option (it is passed only then)."""
    takes_device: bool = False
    """Whether the script declares TAKES_DEVICE = True (--device is passed only then)."""

    @property
    def name(self) -> str:
        return f"{self.suite}/{self.script.stem}" + (f" x{self.nproc}" if self.nproc else "")

    @property
    def slug(self) -> str:
        return f"{self.suite}-{self.script.stem}" + (f"-n{self.nproc}" if self.nproc else "")


@dataclass(kw_only=True, slots=True)
class JobResult:
    job: Job
    quick: bool
    """Whether --quick was asked for."""
    device: str = "cpu"
    """The --device asked for."""
    rc: int
    """Exit code; -1 when the run was stopped at its time limit."""
    seconds: float
    log: Path
    docs: list[dict] = field(default_factory=list)
    """The results documents (bench/_harness.write_results) the run wrote."""

    @property
    def ok(self) -> bool:
        return self.rc == 0


# ---------------------------------------------------------------------------------------------
# Finding the benchmarks

def default_bench_dir() -> Path:
    """``bench/`` of the source checkout this llmkern is imported from."""
    return Path(__file__).resolve().parent.parent / "bench"


def _declares_true(tree: ast.Module, name: str) -> bool:
    """Whether the module assigns ``name = True`` at its top level."""
    return any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
               and isinstance(node.value, ast.Constant) and node.value.value is True for node in tree.body)


def declarations(script: Path) -> tuple[tuple[int, ...] | None, bool, bool]:
    """(TORCHRUN_NPROC or None, whether the script takes --quick, whether it takes --device), read from
    the source."""
    tree = ast.parse(script.read_text(), filename=str(script))
    nproc = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else [])
        if any(isinstance(t, ast.Name) and t.id == "TORCHRUN_NPROC" for t in targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                value = None
            if not (isinstance(value, tuple) and value and all(type(v) is int and v >= 1 for v in value)):
                raise ValueError(f"{script}: TORCHRUN_NPROC must be a literal tuple of rank counts >= 1, "
                                 f"e.g. (2, 4); got {ast.unparse(node.value)}")
            nproc = value
    # A script takes --quick when it defines the option itself, or declares TAKES_QUICK = True because
    # a shared module defines it (bench/ops/_fused.py): the fused-op benches ran at their full shapes
    # under `--quick` (the linear cross-entropy at V = 128256 for minutes) before they declared it.
    takes_quick = (any(isinstance(n, ast.Constant) and n.value == "--quick" for n in ast.walk(tree))
                   or _declares_true(tree, "TAKES_QUICK"))
    # --device is only ever defined by the shared module, so only the declaration counts.
    return nproc, takes_quick, _declares_true(tree, "TAKES_DEVICE")


def discover(bench_dir: Path, suites) -> list[Job]:
    jobs = []
    for suite in suites:
        for script in sorted((bench_dir / suite).glob("bench_*.py")):
            nproc, takes_quick, takes_device = declarations(script)
            for n in nproc or (None,):
                jobs.append(Job(script=script, suite=suite, nproc=n, takes_quick=takes_quick,
                                takes_device=takes_device))
    return jobs


# ---------------------------------------------------------------------------------------------
# Running them

def command(job: Job, quick: bool, device: str = "cpu") -> list[str]:
    args = [str(job.script)] + (["--quick"] if quick and job.takes_quick else [])
    args += ["--device", device] if device != "cpu" and job.takes_device else []
    if job.nproc is None:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(job.nproc), *args]


def run_job(job: Job, out: Path, quick: bool, timeout: float, device: str = "cpu") -> JobResult:
    """Runs `job` with its results folder DIR/raw/<slug> and its log DIR/logs/<slug>.log. On timeout
    the whole process group (torchrun and its ranks) gets SIGTERM, then SIGKILL after 10 s."""
    results = out / "raw" / job.slug
    results.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{job.slug}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    root = job.script.resolve().parents[2]
    env = dict(os.environ, LLMKERN_BENCH_RESULTS=str(results),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if job.nproc:
        # torchrun sets 1 thread per rank anyway, with a warning; the ranks share this machine's cores.
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(command(job, quick, device))}\n")
        f.flush()
        proc = subprocess.Popen(command(job, quick, device), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            rc = -1
            f.write(f"\nllmkern bench: stopped after the time limit of {timeout:.0f} s\n")
        except KeyboardInterrupt:
            _stop_group(proc)
            raise
    docs = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            doc.setdefault("suite", job.suite)
            docs.append(doc)
        except json.JSONDecodeError as e:
            with open(log, "a") as f:
                f.write(f"\nllmkern bench: {path} is not valid JSON ({e})\n")
            rc = rc or 1
    return JobResult(job=job, quick=quick, device=device, rc=rc, seconds=time.perf_counter() - t0, log=log, docs=docs)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# Ratios: the summary table and --compare

def load_harness(bench_dir: Path):
    """bench/_harness.py as a module: the one definition of Ratio and of the results schema."""
    spec = importlib.util.spec_from_file_location("llmkern_bench_harness", bench_dir / "_harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def ratio_records(docs: list[dict], harness) -> list[tuple[str, object]]:
    """(results name, Ratio) for every ratio of every document."""
    return [(d["name"], harness.Ratio.from_dict(r)) for d in docs for r in d.get("ratios", [])]


def load_previous(path: Path) -> list[dict]:
    """The results documents of an earlier run: a bench.json or one results .json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"llmkern bench --compare: cannot read {path}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        return data["results"]
    if isinstance(data, dict) and "name" in data and "rows" in data:
        return [data]
    raise SystemExit(f"llmkern bench --compare: {path} is neither a bench.json (with 'results') nor a "
                     f"results document (with 'name' and 'rows')")


def compare(current, previous) -> dict[tuple[str, str], tuple[object, str]]:
    """{(results name, ratio name): (previous Ratio, verdict)} for the ratios found in both runs.

    Verdict: "within noise" when the new value lies inside the earlier run's min-max over rounds;
    "better" / "worse" when it lies outside (by the ratio's direction); for a ratio without a spread
    (a deterministic count such as saved bytes) any relative change over 1e-6 is flagged."""
    before = {(b, r.name): r for b, r in previous}
    out = {}
    for bench, r in current:
        p = before.get((bench, r.name))
        if p is None:
            continue
        if p.lo is None or p.hi is None:
            moved = abs(r.value - p.value) > 1e-6 * max(abs(p.value), 1e-12)
            up = r.value > p.value
        else:
            moved = not (p.lo <= r.value <= p.hi)
            up = r.value > p.hi
        verdict = "within noise" if not moved else ("better" if up == r.higher_is_better else "worse")
        out[(bench, r.name)] = (p, verdict)
    return out


def summary_table(records, harness, compared=None) -> str:
    rows = []
    for bench, r in records:
        row = {"benchmark": bench, "ratio": r.name, "peer": r.peer, "value": f"{r.value:.3g}",
               "rounds min..max": "-" if r.lo is None else f"{r.lo:.3g}..{r.hi:.3g}", "goal": r.describe_goal(),
               "status": {None: "-", True: "met", False: "MISSED"}[r.met]}
        if compared is not None:
            p, verdict = compared.get((bench, r.name), (None, "new"))
            row["before"] = "-" if p is None else f"{p.value:.3g}"
            row["moved"] = verdict if verdict in ("within noise", "new") else verdict.upper()
        rows.append(row)
    cols = ["benchmark", "ratio", "peer", "value", "rounds min..max", "goal", "status"]
    cols += ["before", "moved"] if compared is not None else []
    return harness.format_table(rows, cols) if rows else "(no benchmark recorded a ratio)"


# ---------------------------------------------------------------------------------------------
# Outputs

def write_outputs(out: Path, env: dict, results: list[JobResult], harness) -> tuple[Path, Path]:
    runs = [{"name": r.job.name, "script": str(r.job.script), "suite": r.job.suite, "nproc": r.job.nproc,
             "rc": r.rc, "seconds": round(r.seconds, 2), "log": str(r.log), "results": [d["name"] for d in r.docs]}
            for r in results]
    docs = [d for r in results for d in r.docs]
    doc = {"schema": SCHEMA_VERSION, "results_schema": harness.SCHEMA_VERSION, "env": env, "runs": runs,
           "results": docs}
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    csv_path = out / "ratios.csv"
    cols = ["benchmark", *harness.RATIO_FIELDS, *harness.ENV_COLUMNS]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for d in docs:
            env_cols = harness.csv_env_columns(d.get("env", {}))
            for r in d.get("ratios", []):
                w.writerow({"benchmark": d["name"], **{k: harness.csv_value(r.get(k)) for k in harness.RATIO_FIELDS},
                            **env_cols})
    return json_path, csv_path


def run_environment(bench_dir: Path, suites, quick: bool, load_before: dict, device: str = "cpu") -> dict:
    from llmkern import bench_env

    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": bench_env.git_commit(bench_dir.parent), "cpu": bench_env.cpu(),
            "versions": bench_env.versions(), "suites": list(suites), "quick": quick, "device": device,
            "argv": sys.argv,
            "load_before": load_before, "load_after": bench_env.load(1.0)}


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="llmkern bench", description=__doc__.splitlines()[0].strip("`."),
                                 epilog="example: llmkern bench ops --quick --out /tmp/b --compare "
                                        "bench/results/<earlier run>/bench.json")
    ap.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"],
                    help="which folder of bench/ to run (default all)")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script: a few minutes in all")
    ap.add_argument("--out", type=Path, default=None,
                    help="where results, logs and plots go (default bench/results/<timestamp>[-quick])")
    ap.add_argument("--compare", type=Path, default=None, metavar="FILE",
                    help="an earlier bench.json (or one results .json): flag ratios that moved outside its noise band")
    ap.add_argument("--bench-dir", type=Path, default=None, help="the bench/ folder (default: this checkout's)")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"seconds per run before it is stopped (default {TIMEOUT_S[False]}, "
                         f"{TIMEOUT_S[True]} with --quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the scripts that declare TAKES_DEVICE (the fused-op benches) run on the GPU with "
                         "Liger-Kernel as a peer; the others run on CPU as always (default cpu)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_dir = (args.bench_dir or default_bench_dir()).resolve()
    if not (bench_dir / "_harness.py").is_file():
        print(f"llmkern bench: no benchmark folder at {bench_dir}. The benchmarks are scripts of the source "
              f"checkout (bench/), not part of an installed package: run this from a clone of llmkern, "
              f"or pass --bench-dir", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("llmkern bench --device cuda: torch.cuda.is_available() is False on this machine; "
                  "run without --device (the CPU benchmarks)", file=sys.stderr)
            return 2
    from tqdm import tqdm

    from llmkern import bench_env, bench_plots

    harness = load_harness(bench_dir)
    previous = ratio_records(load_previous(args.compare), harness) if args.compare else None
    suites = SUITES if args.suite == "all" else (args.suite,)
    jobs = discover(bench_dir, suites)
    if not jobs:
        print(f"llmkern bench: no bench_*.py under {', '.join(str(bench_dir / s) for s in suites)}", file=sys.stderr)
        return 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or bench_dir / "results" / (stamp + ("-quick" if args.quick else ""))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout or TIMEOUT_S[args.quick]
    load_before = bench_env.load(1.0)
    print(f"llmkern bench: {len(jobs)} runs of {args.suite}{' --quick' if args.quick else ''} -> {out}", flush=True)
    print(f"  load before: {_load_text(load_before)}", flush=True)

    results: list[JobResult] = []
    t0 = time.perf_counter()
    # The bar goes to stderr, and only on a terminal (disable=None); the line per run goes to stdout.
    bar = tqdm(jobs, unit="run", dynamic_ncols=True, file=sys.stderr, mininterval=1.0, disable=None)
    for job in bar:
        bar.set_description(job.name)
        res = run_job(job, out, args.quick, timeout, args.device)
        results.append(res)
        bar.write(_job_line(res, harness, out), file=sys.stdout)
        if not res.ok:
            bar.write(_log_tail(res.log), file=sys.stdout)
    bar.close()

    env = run_environment(bench_dir, suites, args.quick, load_before, args.device)
    json_path, csv_path = write_outputs(out, env, results, harness)
    records = ratio_records([d for r in results for d in r.docs], harness)
    compared = compare(records, previous) if previous is not None else None
    print(f"\nsummary: llmkern against the peers measured in the same run "
          f"({env['cpu']['model']}; {' '.join(env['cpu']['isa'])})")
    print(summary_table(records, harness, compared))
    met = sum(r.met is True for _, r in records)
    missed = sum(r.met is False for _, r in records)
    print(f"\n{len(records)} ratios: {met} met, {missed} missed, {len(records) - met - missed} without a goal")
    if compared is not None:
        flagged = [k for k, (_, v) in compared.items() if v in ("better", "worse")]
        print(f"compared with {args.compare}: {len(compared)} ratios matched, {len(flagged)} moved outside "
              f"that run's noise band" + "".join(f"\n  {compared[k][1].upper():6s} {k[0]}: {k[1]}" for k in flagged))
    if not args.no_plots:
        for path in bench_plots.make_plots([d for r in results for d in r.docs], out / "plots"):
            print(f"plot: {path}")
    failed = [r for r in results if not r.ok]
    print(f"load after: {_load_text(env['load_after'])}")
    print(f"{len(results) - len(failed)} of {len(results)} runs ok in {time.perf_counter() - t0:.0f} s; "
          f"wrote {json_path} and {csv_path}")
    for r in failed:
        print(f"FAILED: {r.job.name} ({'timed out' if r.rc == -1 else f'exit {r.rc}'}); log: {r.log}")
    return 1 if failed else 0


def _load_text(load: dict) -> str:
    parts = []
    if load.get("loadavg"):
        parts.append("load average " + " ".join(f"{v:g}" for v in load["loadavg"]))
    if "busy_share" in load:
        parts.append(f"busy {load['busy_share']:.0%}, steal {load['steal_share']:.0%} over "
                     f"{load['sample_seconds']:g} s")
    return "; ".join(parts) or "n/a"


def _job_line(res: JobResult, harness, out: Path) -> str:
    status = "ok" if res.ok else ("TIMEOUT" if res.rc == -1 else f"FAILED ({res.rc})")
    ratios = [harness.Ratio.from_dict(r) for d in res.docs for r in d.get("ratios", [])]
    met = sum(r.met is True for r in ratios)
    missed = sum(r.met is False for r in ratios)
    what = f"{len(ratios)} ratios ({met} met, {missed} missed)" if ratios else "no ratios recorded"
    if res.quick and not res.job.takes_quick:
        what += "; ran at its defaults (the script has no --quick)"
    if res.device != "cpu" and not res.job.takes_device:
        what += f"; ran on CPU (the script has no --device {res.device})"
    return f"{status:10s} {res.job.name:36s} {res.seconds:7.1f} s  {what}  log {res.log.relative_to(out)}"


def _log_tail(log: Path, lines: int = 20) -> str:
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    | " + line for line in text)


if __name__ == "__main__":
    raise SystemExit(main())
