"""Every config under examples/configs runs a few steps (shrunk with --set) and leaves its results:
metrics, held-out losses, loss curve, saved method; ZeRO composed with tp and pp runs too, and
resumed runs repeat the uninterrupted losses."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmkern.train import config as C
from llmkern.train import runner

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
# The other layouts share one torchrun job per world size (one start and one transformers import per
# rank, the bulk of a run this small); demo.yaml goes through `llmkern train`'s own relaunch.
SHARED_JOB = ("dp", "pp", "zero1", "zero2", "zero3", "offload", "tp")
FOUR_RANKS = ("3d",)
# ZeRO composed with tp and pp (llmkern.parallel.parallelize), run from the tp and pp configs:
# (label, config, overrides, nproc).
COMPOSED = [("tp-zero3", "tp", ["parallel.zero_stage=3", "kernels.patch=true"], 2),
            ("pp-zero2", "pp", ["parallel.zero_stage=2", "parallel.microbatches=2", "precision.dtype=fp16"], 2),
            ("tp2-dp2-zero2", "tp", ["parallel.nproc=4", "parallel.dp=2", "parallel.zero_stage=2"], 4)]
# Runs resumed from their step-2 checkpoint, which must repeat the step-3 loss: ZeRO over dp alone,
# ZeRO under a pipeline, and the two 4-rank compositions.
RESUMED = ("zero2", "pp-zero2", "3d", "tp2-dp2-zero2")


def overrides_of(path: Path, out: Path) -> tuple[C.TrainConfig, list[str]]:
    config = C._build(C.TrainConfig, C.read_mapping(path), "")
    return config, SMALL + (SYNTHETIC if config.data.source == "synthetic" else []) + [f"logging.out_dir={out}"]


def argv_of(path: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(path), *sum((["--set", o] for o in overrides), [])]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem not in SHARED_JOB + FOUR_RANKS], ids=lambda p: p.stem)
def test_config_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name their data files from the repo root
    config, overrides = overrides_of(path, tmp_path)
    assert runner.main(argv_of(path, overrides)) == 0
    check_run(config, path, run_dir_of(tmp_path))


def shared_job(tmp_path: Path, nproc: int) -> list[tuple[str, Path, list[str]]]:
    """Runs every example config of `nproc` ranks and the COMPOSED variants of that size in one torchrun
    job, each in tmp_path/<label>/run; resumes the RESUMED ones from step 2 in tmp_path/<label>/resumed.
    The tp run's model (its slices) computes logits on a fixed input afterwards: tmp_path/tp/logits.pt.
    Returns (label, config path, overrides) of the runs."""
    jobs = []
    stems = [(stem, stem, []) for stem in (SHARED_JOB if nproc == 2 else FOUR_RANKS)]
    for label, stem, extra in stems + [(lab, stem, extra) for lab, stem, extra, n in COMPOSED if n == nproc]:
        path = ROOT / "examples" / "configs" / f"{stem}.yaml"
        config, overrides = overrides_of(path, tmp_path / label)
        overrides = overrides + extra + (["checkpoint.every=2"] if label in RESUMED else [])
        assert C.load_config(path, overrides).parallel.nproc == nproc
        jobs.append((label, str(path), overrides))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import datetime, shutil, sys
        from pathlib import Path
        import torch
        import torch.distributed as dist
        from llmkern import demo
        from llmkern.train import config as C, runner
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        for label, path, overrides in {jobs!r}:
            config = C.load_config(path, overrides)
            run_dir = Path(config.logging.out_dir) / "run"
            if dist.get_rank() == 0:
                run_dir.mkdir(parents=True)
            dist.barrier()
            run = runner.Run(config, run_dir, False)
            if run.run() != 0:
                sys.exit(1)
            if label == "tp":
                with torch.no_grad():
                    logits = run.model.eval()(input_ids=torch.tensor([[demo.BOS, 1, 2, 3, demo.SEP, 3, 2]])).logits
                if dist.get_rank() == 0:
                    torch.save(logits, run_dir.parent / "logits.pt")
            if label in {RESUMED!r}:
                resumed = run_dir.parent / "resumed"
                if dist.get_rank() == 0:
                    shutil.copytree(run_dir, resumed)
                dist.barrier()
                if runner.Run(config, resumed, True).run() != 0:
                    sys.exit(1)
        dist.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label, path, overrides in jobs:
        check_run(C.load_config(path, overrides), Path(path), tmp_path / label / "run")
        if label in RESUMED:
            run = tmp_path / label
            assert sorted(p.name for p in (run / "run" / "checkpoints").iterdir()) == ["step-2"]
            assert losses(run / "resumed") == losses(run / "run"), label
    return jobs


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_two_rank_layouts_in_one_job(tmp_path):
    """Every 2-rank layout (DDP, pipeline, ZeRO 1-3, offload, TP; ZeRO-3 under TP, ZeRO-2 under a
    pipeline), each run on the same 2 ranks of one torchrun job; the ZeRO runs resumed from their
    step-2 checkpoint repeat the step-3 loss. The TP run's adapter, gathered from the slices and saved
    in PEFT's format, gives in PEFT the logits of the trained TP model."""
    shared_job(tmp_path, 2)
    peft = pytest.importorskip("peft")
    import torch
    from transformers import LlamaForCausalLM

    from llmkern import demo

    run = tmp_path / "tp" / "run"
    trained = torch.load(tmp_path / "tp" / "logits.pt")
    tokens = torch.tensor([[demo.BOS, 1, 2, 3, demo.SEP, 3, 2]])
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(str(run / "base")).eval()
        plain = base(input_ids=tokens).logits
        theirs = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=tokens).logits
    torch.testing.assert_close(theirs, trained)
    assert not torch.allclose(theirs, plain)  # the adapter trained: it moves the logits


def test_four_rank_compositions_in_one_job(tmp_path):
    """The 3D layout (tp 2 x pp 2, ZeRO-1) of examples/configs/3d.yaml and tp 2 x dp 2 under ZeRO-2 train,
    evaluate on a copy gathered from the slices and stages, save the adapter, checkpoint and resume
    exactly."""
    shared_job(tmp_path, 4)


def check_run(config: C.TrainConfig, path: Path, run: Path) -> None:
    if path.stem not in SHARED_JOB + FOUR_RANKS:  # a folder of its own, named after the config
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
