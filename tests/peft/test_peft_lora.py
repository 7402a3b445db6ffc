"""apply_lora: selection, reports, errors, training, merge/unmerge/unload, disable, save/load."""
from __future__ import annotations

import pytest
import torch
from conftest import batch, logits

import llmkern.peft as lp
from llmkern.nn import LoRALinear

ARCHS = ["llama", "gpt2", "bert"]


def _train(model, arch, steps=30, lr=1e-2):
    """Plain Adam on trainable_parameters(model) over one fixed batch; returns the losses."""
    x = batch(arch)
    labels = x["input_ids"] if arch != "bert" else torch.tensor([0, 1])  # memorise the batch
    opt = torch.optim.Adam(lp.trainable_parameters(model).values(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_report_names_targets_regex_and_exclude(tiny):
    model, _ = tiny("llama")
    rep = lp.apply_lora(model, lp.LoraConfig(r=2, target_modules=r".*layers\.\d+\.self_attn\.(q|v)_proj",
                                             exclude_modules=["layers.1.self_attn.v_proj"]))
    assert rep.replaced == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.1.self_attn.q_proj"]
    assert rep.skipped == {"model.layers.1.self_attn.v_proj": "excluded by exclude_modules"}
    assert rep.trainable_params == sum(p.numel() for p in lp.trainable_parameters(model).values())
    assert rep.trainable_params == 3 * 2 * (32 + 32) - 2 * (32 - 16)  # v_proj outputs 16 (2 KV heads x 8)
    assert "trainable" in str(rep)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_skips_the_head(arch, tiny):
    model, _ = tiny(arch)
    rep = lp.apply_lora(model, lp.LoraConfig(r=2, target_modules="all-linear"))
    head = {"llama": "lm_head", "gpt2": "lm_head", "bert": "classifier"}[arch]
    assert head in rep.skipped and head not in rep.replaced
    assert len(rep.replaced) == {"llama": 14, "gpt2": 8, "bert": 13}[arch]


def test_bad_input(tiny):
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="'qkv_proj' matches no module.*q_proj"):
        lp.apply_lora(model, lp.LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match="selected no module"):
        lp.apply_lora(model, lp.LoraConfig(target_modules=r"nothing\..*"))
    with pytest.raises(ValueError, match="selected no module"):
        lp.apply_lora(model, lp.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not a nn.Linear"):
        lp.apply_lora(model, lp.LoraConfig(target_modules=["embed_tokens"]))
    for r in (0, -1):
        with pytest.raises(ValueError, match="r must be a positive int"):
            lp.LoraConfig(r=r)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing


@pytest.mark.parametrize("arch", ARCHS)
def test_only_lora_params_change_and_loss_decreases(arch, tiny):
    model, _ = tiny(arch)
    lp.apply_lora(model, lp.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model, arch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_unload_disable(arch, tiny):
    model, base = tiny(arch)
    lp.apply_lora(model, lp.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lp.trainable_parameters(model).items():
            p.normal_(0, 0.2)
    x = batch(arch)
    want = logits(model, x)
    with lp.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x))
    torch.testing.assert_close(logits(model, x), want)
    assert lp.merge(model) == (14 if arch == "llama" else 8)
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        with lp.disable_adapters(model):
            pass
    lp.unmerge(model)
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)
    lp.merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())  # GPT-2's Conv1D came back
    assert all(model.state_dict()[k].shape == v.shape for k, v in base.state_dict().items())
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(tiny, tmp_path):
    model, fresh = tiny("llama")
    lp.apply_lora(model, lp.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"]))
    _train(model, "llama", steps=3)
    model.eval()
    lp.save_adapter(model, tmp_path)
    rep = lp.load_adapter(fresh, tmp_path)
    assert len(rep.replaced) == 4
    x = batch("llama")
    torch.testing.assert_close(logits(fresh.eval(), x), logits(model, x))




def test_apply_keeps_the_model_mode(tiny):
    """A LoRALinear swapped into a model in eval mode used to be in training mode: dropout on in eval."""
    model, _ = tiny("llama")
    lp.apply_lora(model, lp.LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False))
    assert not any(m.training for m in model.modules())
    x = batch("llama")
    torch.testing.assert_close(logits(model, x), logits(model, x), atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(**x).logits, model(**x).logits)
