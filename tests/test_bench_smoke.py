"""bench_lora.py --quick runs and writes its CSV and JSON in the harness's schema."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lora_quick_writes_results(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, LLMKERN_BENCH_RESULTS=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench/ops/bench_lora.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "overhead" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "lora_quick.csv")))
    sys.path.insert(0, str(ROOT / "bench"))
    from _harness import SCHEMA
    assert list(rows[0])[:len(SCHEMA)] == list(SCHEMA)
    assert {r["candidate"] for r in rows} == {"frozen_linear", "peft", "llmkern"}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    data = json.loads((tmp_path / "lora_quick.json").read_text())
    for key in ("torch", "cpu", "torch_threads", "contention", "timestamp", "git_commit"):
        assert key in data["env"]
    assert len(data["rows"]) == len(rows)
