"""Checkpoints in both directions against the real peft package, and fuse_peft_model."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, logits

import llmkern.peft as lp
from llmkern.nn import LoRALinear

peft = pytest.importorskip("peft")

ARCHS = ["llama", "gpt2", "bert"]
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _randomize(model):
    """Non-zero LoRA B / prompt rows so that parity is not parity of two no-ops."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or "llmkern_prompt" in n or "prompt_encoder" in n):
                p.normal_(0, 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_llmkern_to_peft(arch, tiny, tmp_path):
    ours, base = tiny(arch)
    lp.apply_lora(ours, lp.LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS[arch]))
    _randomize(ours)
    lp.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = batch(arch)
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_peft_to_llmkern(arch, tiny, tmp_path):
    ours, base = tiny(arch)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], task_type=TASK[arch],
                          fan_in_fan_out=arch == "gpt2", use_rslora=arch == "llama")
    theirs = peft.get_peft_model(base, cfg)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    report = lp.load_adapter(ours, tmp_path)
    assert len([n for n in report.replaced if "modules_to_save" not in n]) == 2 * len(LORA_TARGETS[arch])
    x = batch(arch)
    torch.testing.assert_close(logits(ours, x), logits(theirs.eval(), x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_peft_to_llmkern(arch, method, tiny, tmp_path):
    ours, base = tiny(arch)
    k = 3
    cfg = {"prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=k, task_type=TASK[arch]),
           "p_tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=k, task_type=TASK[arch],
                                                        encoder_hidden_size=16),
           "prefix_tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=k, task_type=TASK[arch],
                                                            prefix_projection=True, encoder_hidden_size=16)}[method]()
    theirs = peft.get_peft_model(base, cfg)
    _randomize(theirs)
    theirs.save_pretrained(tmp_path)
    lp.load_adapter(ours, tmp_path)
    x = batch(arch)
    torch.testing.assert_close(logits(ours, x), logits(theirs.eval(), x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_llmkern_to_peft(arch, method, tiny, tmp_path):
    ours, base = tiny(arch)
    apply, cfg = {"prompt_tuning": (lp.apply_prompt_tuning, lp.PromptTuningConfig(num_virtual_tokens=3)),
                  "p_tuning": (lp.apply_p_tuning, lp.PTuningConfig(num_virtual_tokens=3, encoder="mlp")),
                  "prefix_tuning": (lp.apply_prefix_tuning, lp.PrefixTuningConfig(num_virtual_tokens=3))}[method]
    apply(ours, cfg)
    _randomize(ours)
    lp.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = batch(arch)
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_peft_model(arch, tiny):
    _, base = tiny(arch)
    targets = LORA_TARGETS[arch]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=TASK[arch],
                          fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(base, cfg)
    _randomize(model)
    x = batch(arch)
    want = logits(model.eval(), x)
    report = lp.fuse_peft_model(model)
    assert len(report.replaced) == 2 * len(targets) and not report.skipped
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in report.replaced)
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)
    # the swapped layers train: A and B get gradients, the base does not
    model.train()
    model(**x).logits.sum().backward()
    lora = model.get_submodule(report.replaced[0])
    assert lora.lora_B.weight.grad is not None and lora.weight.grad is None


def test_fuse_peft_model_reports_fallbacks(tiny):
    _, base = tiny("llama")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    report = lp.fuse_peft_model(model)
    assert not report.replaced and len(report.skipped) == 4
    assert all("DoRA" in why for why in report.skipped.values())


def test_load_adapter_refuses_unsupported(tiny, tmp_path):
    ours, base = tiny("llama")
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json: LoraConfig: use_dora=True is not supported"):
        lp.load_adapter(ours, tmp_path)


def test_peft_refuses_prefix_with_checkpointing_we_do_not(tiny):
    """The gap we fill (tests/peft/test_peft_prompt.py checks our gradients under checkpointing)."""
    ours, base = tiny("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ours.gradient_checkpointing_enable()
    lp.apply_prefix_tuning(ours, lp.PrefixTuningConfig(num_virtual_tokens=3))
