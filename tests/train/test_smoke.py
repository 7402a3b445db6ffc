"""Every config under examples/configs runs a few steps (shrunk with --set) and leaves its results:
metrics, loss curve, saved method. Configs that need an engine this tree lacks are refused before
any process starts, naming it."""
import json
import math
import os
import subprocess
import sys
import textwrap
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


ROOT = Path(__file__).resolve().parents[2]
# The other 2-rank layouts share one torchrun job (one start and one transformers import per rank, the
# bulk of a run this small); demo.yaml goes through `llmkern train`'s own relaunch.
SHARED_JOB = ("dp", "pp", "zero1", "zero2", "zero3", "offload", "tp")


def overrides_of(path: Path, out: Path) -> tuple[C.TrainConfig, list[str]]:
    config = C._build(C.TrainConfig, C.read_mapping(path), "")
    return config, SMALL + (SYNTHETIC if config.data.source == "synthetic" else []) + [f"logging.out_dir={out}"]


def argv_of(path: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(path), *sum((["--set", o] for o in overrides), [])]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem not in SHARED_JOB], ids=lambda p: p.stem)
def test_config_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their data files from the repo root
    config, overrides = overrides_of(path, tmp_path)
    missing = layout.missing_engines(config.parallel)
    if missing:
        with pytest.raises(C.ConfigError, match=missing[0].split(":")[0].replace(".", r"\.")):
            C.load_config(path, overrides)
        assert runner.main(argv_of(path, overrides)) == 2
        assert not list(tmp_path.iterdir())  # refused before a run folder or a process was made
        return
    assert runner.main(argv_of(path, overrides)) == 0
    check_run(config, path, run_dir_of(tmp_path))


def test_two_rank_layouts_in_one_job(tmp_path):
    """Every 2-rank layout (DDP, pipeline, ZeRO 1-3, offload, TP), each run on the same 2 ranks of one
    torchrun job; then the ZeRO-2 run resumed from its step-2 checkpoint (the engine's sharded state)
    repeats its step-3 loss."""
    jobs = []
    for stem in SHARED_JOB:
        path = ROOT / "examples" / "configs" / f"{stem}.yaml"
        config, overrides = overrides_of(path, tmp_path / stem)
        if stem == "zero2":
            overrides = overrides + ["checkpoint.every=2"]
        assert config.parallel.nproc == 2
        jobs.append((str(path), overrides))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import datetime, json, shutil, sys
        from pathlib import Path
        import torch.distributed as dist
        from llmkern.train import config as C, runner
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        for path, overrides in {jobs!r}:
            config = C.load_config(path, overrides)
            run_dir = Path(config.logging.out_dir) / "run"
            if dist.get_rank() == 0:
                run_dir.mkdir(parents=True)
            dist.barrier()
            if runner.Run(config, run_dir, False).run() != 0:
                sys.exit(1)
        path, overrides = {jobs[SHARED_JOB.index("zero2")]!r}
        config = C.load_config(path, overrides)
        resumed = Path(config.logging.out_dir) / "resumed"
        if dist.get_rank() == 0:
            shutil.copytree(resumed.parent / "run", resumed)
        dist.barrier()
        if runner.Run(config, resumed, True).run() != 0:
            sys.exit(1)
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stem, (path, overrides) in zip(SHARED_JOB, jobs):
        check_run(C.load_config(path, overrides), Path(path), tmp_path / stem / "run")

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    zero2 = tmp_path / "zero2"
    assert sorted(p.name for p in (zero2 / "run" / "checkpoints").iterdir()) == ["step-2"]
    assert losses(zero2 / "resumed") == losses(zero2 / "run")


def check_run(config: C.TrainConfig, path: Path, run: Path) -> None:
    if path.stem not in SHARED_JOB:  # a folder of its own, named after the config
        assert run.name.startswith(path.stem + "-")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 3]
    end = rows[-1]
    assert end["event"] == "end" and len(end["bytes_per_rank"]) == config.parallel.nproc
    assert (run / "loss.png").stat().st_size > 0
    method = config.method.name
    saved = {"full": "model/config.json", "adapter": "adapter/llmkern_adapter.safetensors"}.get(
        method, "adapter/adapter_model.safetensors")
    assert (run / saved).is_file() or not config.checkpoint.save_adapter
    if config.parallel.nproc > 1:  # gradients were all-reduced or activations sent: every rank sent bytes
        assert all(b["sent"] > 0 for b in end["bytes_per_rank"])
