"""Tiny transformers models of every architecture apply_llmkern_kernels supports (configs only, no downloads)."""
from __future__ import annotations

import logging

import pytest
import torch

VOCAB = 97  # odd: no power-of-two shortcut in the loss kernels


def make_model(arch: str, seed: int = 0, dtype=torch.float32):
    """A 2-layer model with GQA where the architecture has it, random weights around the usual scale."""
    import transformers as tf

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16))
    elif arch == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=16))
        with torch.no_grad():  # Gemma's norm weights start at 0 (scale 1 + w): move them off it
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.1)
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0,
                                                 attn_pdrop=0.0))
    else:
        raise ValueError(arch)
    if arch != "gemma":
        with torch.no_grad():  # RMSNorm/LayerNorm weights start at 1: give them a spread too
            for name, p in model.named_parameters():
                if ("norm" in name or ".ln_" in name) and p.dim() == 1 and "bias" not in name:
                    p.normal_(1.0, 0.1)
    return model.to(dtype)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]


def batch(b: int = 2, t: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt whose tokens carry no loss
    return ids, labels


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads cost more than they give on the shared 2-core machines."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
