"""Prompt methods: prompt tuning, P-tuning (input layer) and prefix tuning / P-tuning v2 (every layer).

Each attaches one ``VirtualTokens`` module to the model as ``model.llmkern_prompt`` (so its parameters
are the model's, and an optimizer over ``trainable_parameters(model)`` sees them) and one forward
pre-hook on the model that rewrites the call:

- prompt tuning / P-tuning: ``input_ids`` -> ``inputs_embeds`` with the K virtual tokens prepended;
  ``attention_mask`` gets K ones, ``token_type_ids`` K zeros, token-level ``labels`` K ``-100``.
- prefix tuning: ``past_key_values`` becomes a ``PrefixCache`` (``peft/prefix_cache.py``) holding per-layer (B, H_kv, P, D) keys
  and values; ``attention_mask`` gets P leading ones. Logits keep the input's length.

Gradient checkpointing. transformers' ``GradientCheckpointingLayer`` drops ``past_key_values`` in
training unless the layer says ``_can_checkpoint_with_cache``, and a normal cache would grow again
when the layer is recomputed in backward. ``PrefixCache.update`` is therefore pure (returns
``cat(prefix, new)`` without storing), so a recompute sees the same keys, and we set the flag on each
layer instance. GPT-2's model loop itself passes ``None`` to its blocks under checkpointing, so
there a pre-hook on each block hands the block the call's cache again. (peft 0.21.2 refuses prefix
tuning on a checkpointed model: "PREFIX_TUNING does not work with gradient checkpointing".)
Needs non-reentrant checkpointing (transformers' default), which tracks tensors captured by closure.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from llmkern.peft.config import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from llmkern.peft.models import freeze_base, model_dims, refuse_second_method, require_transformers
from llmkern.peft.report import InjectionReport, count_parameters

__all__ = ["apply_prompt_tuning", "apply_p_tuning", "apply_prefix_tuning", "VirtualTokens", "attach_virtual_tokens",
           "check_can_attach", "prompt_width"]

Kind = Literal["prompt_tuning", "p_tuning", "prefix_tuning"]


class VirtualTokens(nn.Module):
    """K trainable rows, optionally reparameterized. ``forward()`` -> (K, C_out).

    ``reparam``: None (the rows are the output), ``"mlp"`` (C -> hidden -> hidden -> C, ReLU; P-tuning),
    ``"lstm"`` (2-layer BiLSTM then a 2-layer MLP; P-tuning) or ``"prefix_mlp"`` (C -> hidden, tanh,
    -> C_out; prefix tuning's reparameterization)."""

    _llmkern_peft = True

    def __init__(self, kind: Kind, k: int, out_dim: int, *, reparam: str | None = None, in_dim: int | None = None,
                 hidden: int = 64, init: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        self.kind, self.reparam, self.disabled = kind, reparam, False
        kw = {"device": device, "dtype": dtype}
        in_dim = out_dim if reparam is None else (in_dim or out_dim)
        self.embedding = nn.Parameter(torch.empty(k, in_dim, **kw))
        if init is not None:
            self.embedding.data.copy_(init)
        else:
            nn.init.normal_(self.embedding, std=0.02)
        if reparam == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                     nn.ReLU(), nn.Linear(hidden, out_dim, **kw))
        elif reparam == "lstm":
            self.lstm = nn.LSTM(in_dim, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
            self.net = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                     nn.Linear(2 * hidden, out_dim, **kw))
        elif reparam == "prefix_mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out_dim, **kw))
        elif reparam is not None:
            raise ValueError(f"VirtualTokens: unknown reparam {reparam!r}")

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.reparam == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.net(x) if self.reparam is not None else x


def _split_call(args, kwargs):
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
        args = args[1:]
    if args:
        raise TypeError("llmkern prompt methods: pass model inputs after input_ids as keywords")
    return kwargs


def _prepend(t: torch.Tensor | None, k: int, value, like_len: int):
    if t is None or t.dim() != 2 or t.shape[1] != like_len:
        return t
    pad = torch.full((t.shape[0], k), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def _input_hook(model, args, kwargs):
    enc = model.llmkern_prompt
    if enc.disabled:
        return None
    kw = _split_call(args, kwargs)
    ids, emb = kw.pop("input_ids", None), kw.get("inputs_embeds")
    if emb is None:
        emb = model.get_input_embeddings()(ids)
    b, t, k = emb.shape[0], emb.shape[1], enc.num_tokens
    prompts = enc().to(emb.dtype).unsqueeze(0).expand(b, -1, -1)
    kw["inputs_embeds"] = torch.cat([prompts, emb], dim=1)
    kw["attention_mask"] = _prepend(kw.get("attention_mask"), k, 1, t)
    kw["token_type_ids"] = _prepend(kw.get("token_type_ids"), k, 0, t)
    # Token-level labels (B, T) get K ignored positions; sequence labels (B,) are left alone.
    if not type(model).__name__.endswith("ForSequenceClassification"):
        kw["labels"] = _prepend(kw.get("labels"), k, -100, t)
    if kw.get("position_ids") is not None:
        raise ValueError("prompt tuning / P-tuning: position_ids cannot be given (the virtual tokens shift them)")
    kw = {key: v for key, v in kw.items() if v is not None or key in kwargs}
    return (), kw


def _prefix_hook(model, args, kwargs):
    from llmkern.peft.prefix_cache import PrefixCache
    enc = model.llmkern_prompt
    if enc.disabled:
        return None
    kw = _split_call(args, kwargs)
    if kw.get("past_key_values") is not None:
        raise ValueError("prefix tuning: past_key_values already given; generation with a cache is not supported")
    ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw["inputs_embeds"]
    b, t = ref.shape[0], ref.shape[1]
    d = enc.dims
    p = enc.num_tokens
    # (P, L·2·H_kv·D) -> (L·2, H_kv, P, D): per layer K then V, PEFT's layout.
    kv = enc().view(p, d["layers"] * 2, d["kv_heads"], d["head_dim"]).permute(1, 2, 0, 3)
    dtype = model.get_input_embeddings().weight.dtype
    cache = PrefixCache()
    for i in range(d["layers"]):
        key = kv[2 * i].to(dtype).unsqueeze(0).expand(b, -1, -1, -1)
        val = kv[2 * i + 1].to(dtype).unsqueeze(0).expand(b, -1, -1, -1)
        cache.preload(key, val, i)
    kw["past_key_values"] = cache
    enc._cache = cache  # for the per-block hooks (GPT-2), cleared by _clear_cache after the call
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.long, device=ref.device)
    kw["attention_mask"] = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    return (), kw


_CACHE_ARG = {"gpt2": 1}
"""Model types whose model loop drops the cache under checkpointing: the block's positional cache slot."""


def _block_hook(enc, slot):
    def hook(block, args, kwargs):
        cache = getattr(enc, "_cache", None)
        if cache is None or enc.disabled or len(args) <= slot or args[slot] is not None:
            return None
        return (*args[:slot], cache, *args[slot + 1:]), kwargs
    return hook


def _clear_cache(model, args, kwargs, output):
    model.llmkern_prompt._cache = None


def _layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def prompt_width(kind: Kind, dims: dict) -> int:
    """C_out of a prompt method's rows: the hidden size, or L·2·H_kv·D for per-layer key/value prefixes."""
    return dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"] if kind == "prefix_tuning" else dims["hidden"]


def check_can_attach(model: nn.Module, kind: Kind, method: str) -> None:
    """Raises (before anything changes) when ``attach_virtual_tokens`` could not finish."""
    refuse_second_method(model, method)
    if kind == "prefix_tuning":
        require_transformers(f"{method} (prefix tuning hands the model a transformers Cache)")


def attach_virtual_tokens(model: nn.Module, enc: VirtualTokens, dims: dict, method: str) -> InjectionReport:
    """Freezes the model, registers ``enc`` as ``model.llmkern_prompt`` and installs the forward hook.
    Callers run :func:`check_can_attach` before building `enc`; after it nothing here can fail."""
    freeze_base(model)
    enc.dims = dims
    enc.train(model.training)
    model.llmkern_prompt = enc
    if enc.kind == "prefix_tuning":
        model._llmkern_prompt_hook = model.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
        model.register_forward_hook(_clear_cache, with_kwargs=True)
        layers = _layers(model)
        slot = _CACHE_ARG.get(dims["model_type"])
        for layer in layers:
            layer._can_checkpoint_with_cache = True  # safe: PrefixCache.update is pure (see module doc)
            if slot is not None:
                layer.register_forward_pre_hook(_block_hook(enc, slot), with_kwargs=True)
        where = [f"{type(layer).__name__} #{i} (key/value prefix)" for i, layer in enumerate(layers)]
    else:
        model._llmkern_prompt_hook = model.register_forward_pre_hook(_input_hook, with_kwargs=True)
        where = ["input embeddings (prepended virtual tokens)"]
    trainable, total = count_parameters(model)
    return InjectionReport(method=method, replaced=where, trainable_params=trainable, total_params=total)


def _model_kw(model: nn.Module) -> dict:
    w = model.get_input_embeddings().weight
    return {"device": w.device, "dtype": torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype}


def _check_config(config, cls, method: str) -> None:
    if not isinstance(config, cls):
        raise TypeError(f"{method}: config must be an llmkern.peft.{cls.__name__}, got {type(config).__name__}")


def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig, tokenizer=None) -> InjectionReport:
    """K trainable virtual-token embeddings prepended to the input (Lester et al.)."""
    _check_config(config, PromptTuningConfig, "apply_prompt_tuning")
    dims = model_dims(model, "apply_prompt_tuning")
    check_can_attach(model, "prompt_tuning", "apply_prompt_tuning")
    words = model.get_input_embeddings().weight.detach()
    k = config.num_virtual_tokens
    if config.init == "text":
        if tokenizer is None:
            raise ValueError("apply_prompt_tuning: init='text' needs the tokenizer argument")
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"apply_prompt_tuning: init_text {config.init_text!r} tokenizes to nothing")
        ids = (ids * math.ceil(k / len(ids)))[:k]  # repeat the text to fill K, then truncate
        init = words[torch.tensor(ids, device=words.device)].float()
    else:
        init = torch.randn(k, dims["hidden"], device=words.device) * words.float().std()
    enc = VirtualTokens("prompt_tuning", k, dims["hidden"], init=init, **_model_kw(model))
    return attach_virtual_tokens(model, enc, dims, "apply_prompt_tuning")


def apply_p_tuning(model: nn.Module, config: PTuningConfig) -> InjectionReport:
    """Virtual tokens produced by a prompt encoder (MLP or LSTM) at the input layer (Liu et al.)."""
    _check_config(config, PTuningConfig, "apply_p_tuning")
    dims = model_dims(model, "apply_p_tuning")
    check_can_attach(model, "p_tuning", "apply_p_tuning")
    enc = VirtualTokens("p_tuning", config.num_virtual_tokens, dims["hidden"], reparam=config.encoder,
                        hidden=config.encoder_hidden_size, **_model_kw(model))
    return attach_virtual_tokens(model, enc, dims, "apply_p_tuning")


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> InjectionReport:
    """Per-layer trainable key/value prefixes (Li & Liang; P-tuning v2), optional MLP reparameterization."""
    _check_config(config, PrefixTuningConfig, "apply_prefix_tuning")
    dims = model_dims(model, "apply_prefix_tuning")
    check_can_attach(model, "prefix_tuning", "apply_prefix_tuning")
    enc = VirtualTokens("prefix_tuning", config.num_virtual_tokens, prompt_width("prefix_tuning", dims),
                        reparam="prefix_mlp" if config.projection else None, in_dim=dims["hidden"],
                        hidden=config.encoder_hidden_size, **_model_kw(model))
    return attach_virtual_tokens(model, enc, dims, "apply_prefix_tuning")
