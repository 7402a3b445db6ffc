"""bench_lora.py and bench_adapter.py --quick run and write their CSV and JSON in the harness's schema."""
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


def test_bench_peft_methods_quick_writes_results(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, LLMKERN_BENCH_RESULTS=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench/peft/bench_methods.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["candidate"]: r for r in csv.DictReader(open(tmp_path / "peft_methods_quick.csv"))}
    assert set(rows) == {"full", "lora_llmkern", "lora_peft", "adapter", "prefix", "prompt", "ptuning"}
    assert all(float(r["median_ms"]) > 0 for r in rows.values())
    # The same LoRA config trains the same parameters through llmkern and PEFT; every method trains fewer
    # parameters than full fine-tuning, and prompt tuning the fewest (16 tokens x hidden 64).
    assert rows["lora_llmkern"]["trainable_params"] == rows["lora_peft"]["trainable_params"]
    assert int(rows["prompt"]["trainable_params"]) == 16 * 64
    full = int(rows["full"]["trainable_params"])
    assert all(int(r["trainable_params"]) < full for k, r in rows.items() if k != "full")
    assert "LoRA step time llmkern / PEFT" in proc.stdout


def test_bench_adapter_quick_writes_results(tmp_path):
    env = dict(os.environ, LLMKERN_BENCH_RESULTS=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench/ops/bench_adapter.py"), "--quick"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "llmkern vs eager" in proc.stdout
    rows = list(csv.DictReader(open(tmp_path / "adapter_quick.csv")))
    sys.path.insert(0, str(ROOT / "bench"))
    from _harness import SCHEMA
    assert list(rows[0])[:len(SCHEMA)] == list(SCHEMA)
    assert {r["candidate"] for r in rows} == {"eager", "llmkern"}
    assert {(r["dtype"], r["mode"]) for r in rows} == {(d, m) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")}
    assert all(float(r["median_ms"]) > 0 for r in rows)
    saved = {r["candidate"]: int(r["saved_bytes"]) for r in rows if r["mode"] == "fwd+bwd" and r["dtype"] == "fp32"}
    assert saved["llmkern"] < saved["eager"]
    data = json.loads((tmp_path / "adapter_quick.json").read_text())
    assert len(data["rows"]) == len(rows) and len(data["env"]["summary"]) == 4
