"""--resume continues exactly: the losses after a checkpoint equal the uninterrupted run's (fp16
with the loss scaler, LoRA dropout, a pretrained base: every piece of state a resume must restore),
and the saved adapter loads with PEFT."""
import json
import shutil

import pytest
import torch

from llmkern.train import runner

pytest.importorskip("transformers")

FLAGS = ["model.hidden=32", "model.intermediate=64", "model.heads=2", "data.batch_size=8", "data.min_len=3",
         "data.max_len=4", "schedule.steps=4", "schedule.pretrain_steps=2", "eval.every=0", "eval.examples=8",
         "precision.dtype=fp16", "precision.init_scale=1048576", "precision.growth_interval=1", "checkpoint.every=2", "logging.log_every=1",
         "logging.progress=false", "logging.plot=false", "method.dropout=0.3",
         "eval.min_accuracy_gain=null"]


def losses(run):
    return [(r["step"], r["loss"], r.get("scale"), r.get("skipped"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    args = ["--config", "examples/configs/lora.yaml"]
    for f in FLAGS + [f"logging.out_dir={tmp_path / 'runs'}"]:
        args += ["--set", f]
    assert runner.main(args) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    full = losses(run)
    assert len(full) == 4
    # growth_interval 1: the scale doubles after every clean step (and halves on an overflow), so the
    # scaler's state changes at every step and a resume must restore it
    assert len({scale for _, _, scale, _ in full}) > 1
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")  # as if the run had stopped after step 3
    assert runner.main(["--resume", str(copy)]) == 0
    assert losses(copy) == full  # the same losses, loss scales and skip counts, bit for bit

    # the adapter is in PEFT's format: PEFT's loader and llmkern's give the same logits, which differ
    # from the base's (the adapter trained)
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    import llmkern.peft as lp
    from llmkern import demo

    def base():
        return LlamaForCausalLM.from_pretrained(str(run / "base")).to(torch.float16).eval()

    theirs = peft.PeftModel.from_pretrained(base(), str(run / "adapter")).eval()
    ours = base()
    lp.load_adapter(ours, str(run / "adapter"), is_trainable=False)
    tokens = torch.tensor([[demo.BOS, 1, 2, 3, demo.SEP, 3, 2]])
    with torch.no_grad():
        a, b, plain = theirs(input_ids=tokens).logits, ours(input_ids=tokens).logits, base()(input_ids=tokens).logits
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, plain)
