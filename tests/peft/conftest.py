"""Tiny transformers models built from configs (no downloads), shared by the PEFT-family tests."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

VOCAB = 64


def make_model(arch: str):
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if arch == "llama":  # GQA: 4 query heads, 2 KV heads, so prefixes use the KV width
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                         eos_token_id=1, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=2, initializer_range=0.2)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def tiny():
    """tiny(arch) -> (model, an identical frozen copy for the other side of a comparison)."""
    def build(arch: str):
        m = make_model(arch)
        return m, copy.deepcopy(m)
    return build


def batch(arch: str, b: int = 2, t: int = 7):
    ids = torch.randint(2, VOCAB, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :2] = 0 if arch == "llama" else 1  # left padding on one Llama row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model) -> dict:
    """Everything a failed apply_*/load_* must leave as it was: the state dict (values), the module
    tree, requires_grad flags, forward hooks and llmkern's attributes on the model."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "tree": [(n, type(m).__name__) for n, m in model.named_modules()],
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            "attrs": sorted(k for k in vars(model) if "llmkern" in k)}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    for key in ("tree", "requires_grad", "hooks", "attrs"):
        assert after[key] == before[key], f"{key} changed by a failed call"
    assert after["state"].keys() == before["state"].keys(), "state-dict keys changed by a failed call"
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, f"values changed by a failed call: {changed}"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they give on shared cores (63 tests: 90 s -> 16 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
