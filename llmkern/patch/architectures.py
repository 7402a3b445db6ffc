"""The transformers architectures ``apply_llmkern_kernels`` knows, as data.

Each entry names the classes of the pinned transformers (5.23) that the patch looks for in a live
model: the causal-LM head model, its decoder, the norm, MLP and attention modules, and the modeling
module whose ``apply_rotary_pos_emb`` the attention calls. Classes are matched by module path and
name, so importing this file imports no model code.
"""
from __future__ import annotations

import dataclasses

from llmkern.ops.rms_norm import Convention

__all__ = ["Architecture", "ARCHITECTURES", "GATED_ACTIVATIONS"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """One supported architecture family."""

    name: str
    """The config's model_type ("llama", "gpt2", ...)."""
    modeling: str
    """The transformers modeling module, e.g. "transformers.models.llama.modeling_llama"."""
    causal_lm: str
    """The causal-LM class (decoder + lm_head + loss), e.g. "LlamaForCausalLM"."""
    decoder: str
    """The decoder class without the head, e.g. "LlamaModel"."""
    rms_norm: str | None = None
    """The RMSNorm class, or None where the model has LayerNorms (``layer_norm``)."""
    convention: Convention = "llama"
    """How the RMSNorm weight applies: "llama" (w·x̂, cast before the scale) or "gemma" ((1 + w)·x̂)."""
    layer_norm: bool = False
    """The model's norms are torch.nn.LayerNorm (GPT-2)."""
    mlp: str | None = None
    """The gated MLP class (gate_proj, up_proj, down_proj, act_fn), or None where the MLP is not gated."""
    attention: str | None = None
    """The attention class that calls the modeling module's apply_rotary_pos_emb, or None (no RoPE)."""
    not_patched: tuple[tuple[str, str], ...] = ()
    """(kernel, reason) for the kernels that do not apply to this architecture at all."""


def _llama_like(name: str, prefix: str, convention: Convention = "llama") -> Architecture:
    return Architecture(name=name, modeling=f"transformers.models.{name}.modeling_{name}",
                        causal_lm=f"{prefix}ForCausalLM", decoder=f"{prefix}Model", rms_norm=f"{prefix}RMSNorm",
                        convention=convention, mlp=f"{prefix}MLP", attention=f"{prefix}Attention",
                        not_patched=(("layer_norm", f"{prefix} has no LayerNorm (its norms are RMSNorm)"),))


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _llama_like("llama", "Llama"),
    _llama_like("mistral", "Mistral"),
    _llama_like("qwen2", "Qwen2"),
    _llama_like("qwen3", "Qwen3"),
    _llama_like("gemma", "Gemma", convention="gemma"),
    Architecture(name="gpt2", modeling="transformers.models.gpt2.modeling_gpt2", causal_lm="GPT2LMHeadModel",
                 decoder="GPT2Model", layer_norm=True,
                 not_patched=(("rms_norm", "GPT-2's norms are LayerNorm, not RMSNorm"),
                              ("swiglu", "GPT-2's MLP is not gated (c_fc -> gelu_new -> c_proj): no gated "
                                         "activation to fuse"),
                              ("rope", "GPT-2 has learned absolute position embeddings, no rotary embedding"))),
)}

GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_new": "gelu_tanh"}
"""config.hidden_act -> the fused gated activation (llmkern.nn.mlp.gated_activation). gelu_new and
gelu_pytorch_tanh are the same function (the tanh approximation), computed differently."""
