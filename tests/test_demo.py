"""The `make demo` job in its --quick form: every method learns the new instruction, saves its
adapter and reloads it with identical logits; LoRA's adapter also loads into PEFT; the default job
runs on 2 ranks under torchrun with llmkern DDP. The LoRA run pretrains the base; the other runs
fine-tune that base (--base) instead of pretraining their own (each pretraining is 3-4 s of CPU)."""
import json
import subprocess
import sys

import pytest
import torch

from llmkern import demo

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """LoRA in fp16 with the loss scaler, one process."""
    out = tmp_path_factory.mktemp("demo")
    rc = demo.main(["--quick", "--nproc", "1", "--seed", "0", "--out", str(out)])
    return rc, out


def test_quick_lora_demo_learns_and_saves(lora_run):
    rc, out = lora_run
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_dropout"] == 0.05
    # llmkern.peft.save_adapter names every replaced module by its path, which PEFT matches exactly.
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == set(demo.TARGET_MODULES)
    assert len(config["target_modules"]) == len(demo.TARGET_MODULES) * demo.QUICK.layers


def test_adapter_holds_only_lora_weights(lora_run):
    from safetensors.torch import load_file

    _, out = lora_run
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd)
    assert all(v.dtype == torch.float16 for v in sd.values())  # trained in fp16 weights
    assert any(k.endswith("q_proj.lora_B.weight") for k in sd)


def test_reloaded_adapter_matches_peft(lora_run):
    """The saved adapter is in PEFT's format: PEFT's own loader gives the same logits as ours."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    _, out = lora_run
    ours = demo.load_method(out, "lora", torch.float32)
    base = LlamaForCausalLM.from_pretrained(str(out / "base"))
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tokens, _ = demo.Task(demo.QUICK, seed=1).batch(("reverse",), 16)
    with torch.no_grad():
        a, b = ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits
    torch.testing.assert_close(a, b)  # fp32 defaults: only summation order differs


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt", "ptuning"])
def test_quick_demo_of_each_method(method, lora_run, tmp_path, capsys):
    # bf16: fp16 matmuls on this CPU are 7x slower than bf16 ones (437 vs 63 ms per step, measured).
    rc = demo.main(["--quick", "--nproc", "1", "--method", method, "--dtype", "bfloat16", "--out", str(tmp_path),
                    "--base", str(lora_run[1] / "base")])
    text = capsys.readouterr().out
    assert rc == 0, text[-2000:]
    assert "reloaded into a fresh base: max |logits difference| = 0 (identical)" in text
    saved = "llmkern_adapter.safetensors" if method == "adapter" else "adapter_model.safetensors"
    assert (tmp_path / saved).is_file()


def test_two_rank_demo_under_torchrun(lora_run, tmp_path):
    """The default job shape: the demo relaunches itself on 2 ranks with llmkern DDP (fine-tuning the
    1-rank run's base: the 2-rank pretraining's DDP is what fine-tuning runs too)."""
    proc = subprocess.run([sys.executable, "-m", "llmkern", "train", "--quick", "--nproc", "2", "--dtype", "bfloat16",
                           "--out", str(tmp_path), "--base", str(lora_run[1] / "base")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 ranks (llmkern DDP" in proc.stdout
    assert "% of it overlapped with backward" in proc.stdout
    assert proc.stdout.count("summary") == 1  # only rank 0 reports


@pytest.mark.parametrize("argv", [["--method", "bitfit"], ["--nproc", "0"], ["--r", "0"], ["--dtype", "float8"],
                                  ["--base", "no/such/folder"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit):
        demo.main(argv)


def test_a_base_of_another_size_is_refused(lora_run, tmp_path):
    with pytest.raises(ValueError, match=r"--base .*: \(hidden, layers, heads, intermediate, vocab\) is \(64, 2, 4, 128"):
        demo.main(["--nproc", "1", "--base", str(lora_run[1] / "base"), "--out", str(tmp_path)])  # not --quick
