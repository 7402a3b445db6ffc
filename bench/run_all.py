"""Runs every ``bench/**/bench_*.py`` with its defaults, one subprocess each, continuing past failures,
and prints a summary. Exit code 1 if any failed. Extra arguments are passed to every script
(e.g. ``--quick``)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in BENCH.rglob("bench_*.py") if p.is_file())
    if not scripts:
        print("run_all: no bench/**/bench_*.py scripts found")
        return 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")])))
    results = []
    for script in scripts:
        rel = script.relative_to(BENCH.parent)
        print(f"\n=== {rel} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, str(script), *argv], env=env).returncode
        except KeyboardInterrupt:
            rc = "interrupted"
        results.append((str(rel), rc, time.perf_counter() - t0))
        if rc == "interrupted":
            break
    print("\nsummary")
    width = max(len(r[0]) for r in results)
    for rel, rc, secs in results:
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"  {rel:<{width}}  {secs:7.1f} s  {status}")
    failed = [r for r in results if r[1] != 0]
    print(f"{len(results) - len(failed)} of {len(scripts)} benchmarks ok; results in bench/results/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
