"""Cutting a model into pipeline stages: which layers go where, and the module each stage runs.

Two kinds of model are understood:
- an `nn.Sequential`: its children are the layers, a stage runs its slice in order;
- a `transformers` causal LM built like Llama (`model.embed_tokens`, `model.layers`, `model.norm`,
  `model.rotary_emb`, `lm_head`) or GPT-2 (`transformer.wte`/`wpe`/`drop`/`h`/`ln_f`, `lm_head`):
  the embedding runs on the first stage, the final norm and LM head on the last, and each stage
  builds the causal mask and the rotary embedding itself from the hidden states it receives (they
  depend only on the sequence length), so only the hidden states travel between stages.

Balancing (`PipelineConfig.partition`): "uniform" gives every stage the same number of layers (the
first L % S one more); "parameters" and "time" cut the layers into contiguous runs minimizing the
largest stage's parameter count or measured forward+backward time, the embedding counting on the
first stage and the norm + head on the last; a list gives the layer count of every stage.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclasses.dataclass(slots=True)
class ModelParts:
    """A model seen as: `pre` modules on the first stage, `layers` cut between stages, `post`
    modules on the last stage, and `shared` buffer-only modules every stage keeps."""

    kind: str
    """"sequential", "llama" or "gpt2"."""
    pre: list[tuple[str, nn.Module]]
    """(name in the model, module) run before the first layer, on the first stage: the embeddings."""
    layers: list[tuple[str, nn.Module]]
    """(name, module) of the layers that are cut between stages, in order."""
    post: list[tuple[str, nn.Module]]
    """(name, module) run after the last layer, on the last stage: the final norm and the LM head."""
    shared: list[tuple[str, nn.Module]]
    """(name, module) every stage keeps, without parameters: the rotary embedding."""
    config: object = None
    """The transformers config (None for a Sequential)."""


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of `model`, or a TypeError saying what is supported."""
    if isinstance(model, nn.Sequential):
        return ModelParts("sequential", [], [(n, m) for n, m in model.named_children()], [], [])
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if base is not None and head is not None and all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")):
        shared = [("model.rotary_emb", base.rotary_emb)] if getattr(base, "rotary_emb", None) is not None else []
        return ModelParts("llama", [("model.embed_tokens", base.embed_tokens)],
                          [(f"model.layers.{i}", m) for i, m in enumerate(base.layers)],
                          [("model.norm", base.norm), ("lm_head", head)], shared, model.config)
    tr = getattr(model, "transformer", None)
    if tr is not None and head is not None and all(hasattr(tr, a) for a in ("wte", "wpe", "h", "ln_f")):
        return ModelParts("gpt2", [("transformer.wte", tr.wte), ("transformer.wpe", tr.wpe),
                                   ("transformer.drop", tr.drop)],
                          [(f"transformer.h.{i}", m) for i, m in enumerate(tr.h)],
                          [("transformer.ln_f", tr.ln_f), ("lm_head", head)], [], model.config)
    raise TypeError(f"apply_pipeline: cannot split a {type(model).__name__}: expected an nn.Sequential (its children "
                    f"are the layers) or a transformers causal LM laid out like Llama (model.embed_tokens, "
                    f"model.layers, model.norm, lm_head) or GPT-2 (transformer.wte/wpe/h/ln_f, lm_head)")


class SequentialStage(nn.Module):
    """Layers [first, last) of an nn.Sequential, run in order."""

    def __init__(self, layers: Sequence[nn.Module], rematerialize_layers: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.rematerialize_layers = rematerialize_layers

    def forward(self, x):
        for layer in self.layers:
            if self.rematerialize_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class DecoderStage(nn.Module):
    """A run of decoder layers of a transformers causal LM, with the embedding when it is the first
    stage and the final norm + LM head when it is the last: ids (B, T) or hidden states (B, T, C)
    in, hidden states (B, T, C) or logits (B, T, V) out."""

    def __init__(self, parts: ModelParts, layers: Sequence[nn.Module], first: bool, last: bool,
                 rematerialize_layers: bool = False):
        super().__init__()
        self.kind = parts.kind
        self.config = parts.config
        self.pre = nn.ModuleList([m for _, m in parts.pre]) if first else None
        self.layers = nn.ModuleList(layers)
        self.post = nn.ModuleList([m for _, m in parts.post]) if last else None
        # the rotary module holds only a buffer (inv_freq) and no parameter; every stage keeps it
        self.rotary = parts.shared[0][1] if parts.shared else None
        self.rematerialize_layers = rematerialize_layers

    def forward(self, x):
        from transformers.masking_utils import create_causal_mask

        if self.pre is not None:
            if self.kind == "llama":
                h = self.pre[0](x)
            else:
                wte, wpe, drop = self.pre
                h = drop(wte(x) + wpe(torch.arange(x.shape[1], device=x.device).unsqueeze(0)))
        else:
            h = x
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                                  position_ids=pos)
        if self.kind == "llama":
            kwargs = {"attention_mask": mask, "position_ids": pos,
                      "position_embeddings": self.rotary(h, position_ids=pos)}
        else:
            kwargs = {"attention_mask": mask, "position_ids": pos}
        for layer in self.layers:
            if self.rematerialize_layers and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False, **kwargs)
            else:
                h = layer(h, **kwargs)
        if self.post is not None:
            for m in self.post:
                h = m(h)
        return h


def build_stage(parts: ModelParts, first_layer: int, last_layer: int, first: bool, last: bool,
                rematerialize_layers: bool) -> nn.Module:
    layers = [m for _, m in parts.layers[first_layer:last_layer]]
    if parts.kind == "sequential":
        return SequentialStage(layers, rematerialize_layers)
    return DecoderStage(parts, layers, first, last, rematerialize_layers)


# --- balancing ---------------------------------------------------------------------------------------


def _min_max_split(weights: list[float], stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Layer counts (each >= 1) of `stages` contiguous runs minimizing the heaviest run, where the
    first run also carries `first_extra` and the last `last_extra`. Dynamic programming over
    prefix sums: O(stages × layers²), 0.1 s for 256 layers × 16 stages."""
    L = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][j]: smallest heaviest-run weight cutting the first j layers into k runs
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, L - (stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                w = prefix[j] - prefix[i] + (first_extra if k == 1 else 0.0) + (last_extra if k == stages else 0.0)
                v = max(best[k - 1][i], w)
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    counts, j = [], L
    for k in range(stages, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def layer_counts(parts: ModelParts, stages: int, partition, layer_times: list[float] | None = None,
                 pre_time: float = 0.0, post_time: float = 0.0) -> list[int]:
    """Number of layers of each of `stages` stages under `partition` (see the module docstring)."""
    L = len(parts.layers)
    if L < stages:
        raise ValueError(f"apply_pipeline: {stages} stages but the model has only {L} layers to split "
                         f"(each stage needs at least one layer); use at most {L} stages "
                         f"(ranks × virtual_stages)")
    if isinstance(partition, (list, tuple)):
        counts = [int(c) for c in partition]
        if len(counts) != stages or sum(counts) != L or min(counts) < 1:
            raise ValueError(f"apply_pipeline: partition={list(partition)} must list {stages} layer counts, each "
                             f">= 1, summing to the model's {L} layers")
        return counts
    if partition == "uniform":
        base, extra = divmod(L, stages)
        return [base + (1 if s < extra else 0) for s in range(stages)]
    if partition == "parameters":
        def n(mods):
            return float(sum(p.numel() for _, m in mods for p in m.parameters()))
        return _min_max_split([n([x]) for x in parts.layers], stages, n(parts.pre), n(parts.post))
    if partition == "time":
        if layer_times is None:
            raise ValueError("apply_pipeline: partition='time' needs example_inputs (a micro-batch) to time the "
                             "layers")
        return _min_max_split(layer_times, stages, pre_time, post_time)
    raise ValueError(f"apply_pipeline: partition must be 'uniform', 'parameters', 'time' or a list of layer "
                     f"counts, got {partition!r}")


def time_layers(parts: ModelParts, example_inputs: torch.Tensor, repeats: int = 3
                ) -> tuple[float, list[float], float]:
    """Measured forward+backward seconds (median of `repeats`) of the first-stage extras, of each
    layer, and of the last-stage extras, on `example_inputs` (one micro-batch). Each piece runs
    on the previous piece's real output, as in the model."""
    def fwd_bwd(stage: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        ts, out = [], None
        for _ in range(repeats):
            xi = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = stage(xi)
            out.float().sum().backward()
            ts.append(time.perf_counter() - t0)
        for p in stage.parameters():
            p.grad = None
        return statistics.median(ts), out.detach()

    L = len(parts.layers)
    if parts.kind == "sequential":
        x, times = example_inputs, []
        for _, m in parts.layers:
            t, x = fwd_bwd(SequentialStage([m]), x)
            times.append(t)
        return 0.0, times, 0.0
    # decoder: the first layer's stage with the embedding, minus the layer alone, is the embedding
    empty = ModelParts(parts.kind, parts.pre, [], parts.post, parts.shared, parts.config)
    t_pre, h = fwd_bwd(DecoderStage(empty, [], True, False), example_inputs)
    times = []
    for i in range(L):
        t, h = fwd_bwd(DecoderStage(parts, [parts.layers[i][1]], False, False), h)
        times.append(t)
    t_post, _ = fwd_bwd(DecoderStage(empty, [], False, True), h)
    return t_pre, times, t_post
