"""Every config under examples/configs runs a few steps (shrunk with --set) and leaves its results:
metrics, loss curve, saved method. Configs that need an engine this tree lacks are refused before
any process starts, naming it."""
import json
import math
from pathlib import Path

import pytest

from llmkern.train import config as C
from llmkern.train import layout, runner

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("examples", "configs").glob("*.yaml"))
SMALL = ["model.hidden=32", "model.intermediate=64", "model.heads=2", "data.batch_size=8", "schedule.steps=3",
         "eval.every=2", "eval.examples=8", "eval.min_accuracy_gain=null", "logging.progress=false",
         "logging.log_every=1", "checkpoint.every=0", "schedule.pretrain_steps=0"]
SYNTHETIC = ["data.min_len=3", "data.max_len=4"]


def test_there_is_a_config_per_method_and_layout():
    names = {p.stem for p in CONFIGS}
    assert {"full", "lora", "adapter", "prefix", "prompt", "ptuning"} <= names
    assert {"dp", "pp", "zero1", "zero2", "zero3", "offload", "tp", "3d", "demo", "sft"} <= names


def run_dir_of(out: Path) -> Path:
    (d,) = list(out.iterdir())
    return d


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # configs name their data files from the repo root
    raw = C.read_mapping(path)
    config = C._build(C.TrainConfig, raw, "")
    overrides = SMALL + (SYNTHETIC if config.data.source == "synthetic" else []) + [f"logging.out_dir={tmp_path}"]
    missing = layout.missing_engines(config.parallel)
    if missing:
        with pytest.raises(C.ConfigError, match=missing[0].split(":")[0].replace(".", r"\.")):
            C.load_config(path, overrides)
        assert runner.main(["--config", str(path), *sum((["--set", o] for o in overrides), [])]) == 2
        assert not list(tmp_path.iterdir())  # refused before a run folder or a process was made
        return
    rc = runner.main(["--config", str(path), *sum((["--set", o] for o in overrides), [])])
    assert rc == 0
    run = run_dir_of(tmp_path)
    assert run.name.startswith(path.stem + "-")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    end = rows[-1]
    assert end["event"] == "end" and len(end["bytes_per_rank"]) == config.parallel.nproc
    assert (run / "loss.png").stat().st_size > 0
    method = config.method.name
    saved = {"full": "model/config.json", "adapter": "adapter/llmkern_adapter.safetensors"}.get(
        method, "adapter/adapter_model.safetensors")
    assert (run / saved).is_file()
    if config.parallel.dp > 1:  # gradients were all-reduced: every rank sent bytes
        assert all(b["sent"] > 0 for b in end["bytes_per_rank"])
