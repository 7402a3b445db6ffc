"""Prompt tuning, P-tuning and prefix tuning on tiny Llama / GPT-2 / BERT."""
from __future__ import annotations

import pytest
import torch
from conftest import batch, logits, make_model

import llmkern.peft as lp

ARCHS = ["llama", "gpt2", "bert"]
METHODS = {
    "prompt": (lp.apply_prompt_tuning, lambda: lp.PromptTuningConfig(num_virtual_tokens=4)),
    "ptuning_mlp": (lp.apply_p_tuning, lambda: lp.PTuningConfig(num_virtual_tokens=4, encoder="mlp")),
    "ptuning_lstm": (lp.apply_p_tuning, lambda: lp.PTuningConfig(num_virtual_tokens=4, encoder="lstm")),
    "prefix": (lp.apply_prefix_tuning, lambda: lp.PrefixTuningConfig(num_virtual_tokens=4)),
    "prefix_mlp": (lp.apply_prefix_tuning, lambda: lp.PrefixTuningConfig(num_virtual_tokens=4, projection=True)),
}


def _labels(arch, x):
    """The small task: every position predicts token 5 (LMs), every sequence is class 1 (BERT)."""
    return torch.full_like(x["input_ids"], 5) if arch != "bert" else torch.tensor([1, 1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_trains_only_new_params(arch, method):
    model = make_model(arch)
    apply, cfg = METHODS[method]
    rep = apply(model, cfg())
    assert rep.replaced and rep.trainable_params == sum(p.numel() for p in lp.trainable_parameters(model).values())
    assert all(n.startswith("llmkern_prompt.") for n in lp.trainable_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch(arch)
    opt = torch.optim.Adam(lp.trainable_parameters(model).values(), lr=3e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**x, labels=_labels(arch, x)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(lp.trainable_parameters(model))  # every new parameter moved, nothing else
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_restores_base(arch, tiny):
    model, base = tiny(arch)
    lp.apply_prefix_tuning(model, lp.PrefixTuningConfig(num_virtual_tokens=2))
    x = batch(arch)
    assert not torch.allclose(logits(model, x), logits(base, x))
    with lp.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_with_gradient_checkpointing(arch, projection):
    """Same loss and same prefix gradients with and without checkpointing (peft 0.21.2 refuses this)."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = make_model(arch)
        lp.apply_prefix_tuning(model, lp.PrefixTuningConfig(num_virtual_tokens=3, projection=projection))
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(1)
        x = batch(arch)
        loss = model(**x).logits.float().pow(2).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in lp.trainable_parameters(model).items()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0)
    assert all(g is not None and g.abs().sum() > 0 for g in g1.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_prompt_tuning_text_init():
    model = make_model("gpt2")

    class Tok:  # a stand-in tokenizer: one id per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 60 + 2 for c in text]}

    lp.apply_prompt_tuning(model, lp.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="abc"),
                           tokenizer=Tok())
    ids = torch.tensor([ord(c) % 60 + 2 for c in "abcab"])
    torch.testing.assert_close(model.llmkern_prompt.embedding.detach(), model.get_input_embeddings().weight[ids])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        lp.apply_prompt_tuning(make_model("gpt2"), lp.PromptTuningConfig(init="text", init_text="abc"))


def test_bad_input():
    for cfg in (lp.PromptTuningConfig, lp.PTuningConfig, lp.PrefixTuningConfig):
        for k in (0, -3):
            with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
                cfg(num_virtual_tokens=k)
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8))
    for apply, cfg in METHODS.values():
        with pytest.raises(ValueError, match="'t5'.*supported model types: bert, gpt2, llama"):
            apply(t5, cfg())
    model = make_model("llama")
    lp.apply_prompt_tuning(model, lp.PromptTuningConfig())
    with pytest.raises(ValueError, match="already carries an llmkern.peft method: prompt_tuning"):
        lp.apply_prefix_tuning(model, lp.PrefixTuningConfig())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_inputs_embeds_and_labels(arch):
    """Calling with inputs_embeds gives the same loss as input_ids: labels are padded either way."""
    model = make_model(arch)
    lp.apply_prompt_tuning(model, lp.PromptTuningConfig(num_virtual_tokens=3))
    x = batch(arch)
    with torch.no_grad():
        a = model(**x, labels=x["input_ids"])
        emb = model.get_input_embeddings()(x["input_ids"])
        b = model(inputs_embeds=emb, attention_mask=x["attention_mask"], labels=x["input_ids"])
    assert a.logits.shape[1] == x["input_ids"].shape[1] + 3
    torch.testing.assert_close(b.loss, a.loss)
