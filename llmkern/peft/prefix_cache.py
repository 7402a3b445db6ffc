"""``PrefixCache``: the transformers cache that carries prefix tuning's per-layer keys and values.

Its own module because it subclasses ``transformers.DynamicCache``: ``llmkern.peft`` imports it
only when a prefix-tuned model runs, so the package imports without transformers.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

__all__ = ["PrefixCache"]


class PrefixCache(DynamicCache):
    """A cache preloaded with per-layer prefixes whose ``update`` stores nothing: it returns
    ``cat(prefix, new)`` on the sequence axis, so recomputing a layer (gradient checkpointing) or
    calling the model twice sees the same keys. ``get_seq_length()`` is P, so positions start at P."""

    def preload(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Stores layer `layer_idx`'s (B, H_kv, P, D) prefix keys and values (DynamicCache's own update)."""
        DynamicCache.update(self, key_states, value_states, layer_idx)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return (torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2))
