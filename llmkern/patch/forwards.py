"""The forwards ``apply_llmkern_kernels`` binds to a model's modules, and the RoPE dispatch.

Each runs the fused op on the module's own parameters and attributes, so weights, state dicts,
LoRA wrappers of the projections and hooks on the modules are untouched. Where an input makes the
fused op inapplicable (a norm weight in another dtype than its input, lm_head with forward hooks),
the module runs transformers' own code and says why, once per reason (never a silent fallback).
"""
from __future__ import annotations

import functools
import inspect
import threading
import warnings

import torch
import torch.nn.functional as F

from llmkern.nn.mlp import gated_activation
from llmkern.ops.cross_entropy import cross_entropy
from llmkern.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from llmkern.ops.layer_norm import layer_norm
from llmkern.ops.rms_norm import rms_norm
from llmkern.ops.rope import rope

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _original(module, name: str = "forward"):
    """The class's own method, bound to the module (what runs without the patch)."""
    return getattr(type(module), name).__get__(module)


# ---------------------------------------------------------------------------------------------
# Norms and the MLP

def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    info = self.__dict__["_llmkern_patch"]
    if hidden_states.dtype != self.weight.dtype:
        warn_once(f"llmkern.patch: {type(self).__name__} got a {hidden_states.dtype} input for a {self.weight.dtype} "
                  f"weight (the fused rms_norm needs one dtype); running transformers' code for it")
        return _original(self)(hidden_states)
    return rms_norm(hidden_states, self.weight, info["eps"], convention=info["convention"], backend=info["backend"])


def layer_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    info = self.__dict__["_llmkern_patch"]
    if any(p is not None and p.dtype != x.dtype for p in (self.weight, self.bias)):
        warn_once(f"llmkern.patch: LayerNorm got a {x.dtype} input for {self.weight.dtype} parameters; running "
                  f"torch's code for it")
        return _original(self)(x)
    return layer_norm(x, self.weight, self.bias, self.eps, backend=info["backend"])


def gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    info = self.__dict__["_llmkern_patch"]
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype:
        warn_once(f"llmkern.patch: {type(self).__name__}'s gate and up projections returned {gate.dtype} and "
                  f"{up.dtype}; running transformers' code for it")
        return _original(self)(x)
    return self.down_proj(gated_activation(gate, up, info["activation"], info["backend"]))


# ---------------------------------------------------------------------------------------------
# RoPE: transformers' attention calls its modeling module's global apply_rotary_pos_emb. The patch
# replaces that global once by a dispatcher, which runs llmkern's rope while a patched attention
# module's forward is on the stack (a per-thread depth, so threads running unpatched models of the
# same class are unaffected) and the original function otherwise.

_rope_active = threading.local()


class RopeDispatch:
    """Stands in for a modeling module's apply_rotary_pos_emb (see above)."""

    def __init__(self, original):
        self.original = original
        self.signature = inspect.signature(original)
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        if getattr(_rope_active, "depth", 0) == 0:
            return self.original(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        q, k, cos, sin = a["q"], a["k"], a["cos"], a["sin"]
        unsqueeze_dim = a.get("unsqueeze_dim", 1)
        inplace = not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad)
        if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
            # Under autocast q and k come from bf16/fp16 projections while the rotary module returns cos
            # and sin in the fp32 hidden states' dtype; transformers' q * cos + rotate_half(q) * sin then
            # computes and returns in the promoted dtype (fp32). The fused op does the same on q and k
            # cast to it: the same dtype out, the same math, and the casts are the copies eager makes too.
            dtype = functools.reduce(torch.promote_types, (k.dtype, cos.dtype, sin.dtype), q.dtype)
            if not all(t.dtype.is_floating_point for t in (q, k, cos, sin)):
                warn_once(f"llmkern.patch: rotary embedding with q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin "
                          f"{sin.dtype}; the fused rope takes floating tensors, running transformers' "
                          f"apply_rotary_pos_emb for it")
                return self.original(*args, **kwargs)
            q, k, cos, sin = (t.to(dtype) for t in (q, k, cos, sin))
        if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
            inplace = False
        return rope(q, k, cos, sin, unsqueeze_dim, inplace=inplace, backend=getattr(_rope_active, "backend", None))


def attention_forward(self, *args, **kwargs):
    info = self.__dict__["_llmkern_patch"]
    install_rope_dispatch(info["modeling"])
    depth = getattr(_rope_active, "depth", 0)
    saved_backend = getattr(_rope_active, "backend", None)
    _rope_active.depth, _rope_active.backend = depth + 1, info["backend"]
    try:
        return _original(self)(*args, **kwargs)
    finally:
        _rope_active.depth, _rope_active.backend = depth, saved_backend


def install_rope_dispatch(modeling) -> None:
    if not isinstance(modeling.apply_rotary_pos_emb, RopeDispatch):
        modeling.apply_rotary_pos_emb = RopeDispatch(modeling.apply_rotary_pos_emb)


def uninstall_rope_dispatch(modeling) -> None:
    if isinstance(modeling.apply_rotary_pos_emb, RopeDispatch):
        modeling.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb.original


# ---------------------------------------------------------------------------------------------
# The loss

def _shifted(labels, ignore_index: int, shift_labels):
    """transformers' ForCausalLMLoss shift: token t predicts labels[t + 1]; the last one predicts nothing."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss (same arguments, same result) on llmkern's cross_entropy, which
    reads the logits in their dtype (no ``logits.float()`` copy of the (B, T, V) logits)."""
    labels = _shifted(labels, ignore_index, shift_labels).to(logits.device)
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"llmkern.patch: logits have {logits.shape[-1]} classes but vocab_size is {vocab_size}")
    if num_items_in_batch is None:
        return cross_entropy(logits, labels, ignore_index=ignore_index)
    loss = cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def causal_lm_forward(self, *args, **kwargs):
    """The causal-LM forward with the LM head and the loss fused: in training with labels, the decoder
    runs as usual and fused_linear_cross_entropy replaces ``lm_head`` + the loss, so the output has a
    loss and no logits. Otherwise (no labels, eval mode or no grad) transformers' forward runs."""
    info = self.__dict__["_llmkern_patch"]
    original = _original(self)
    bound = info["signature"].bind(*args, **kwargs)
    labels = bound.arguments.get("labels")
    if labels is None or not (self.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)
    head = self.lm_head
    if head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__:
        warn_once(f"llmkern.patch: {type(self).__name__}.lm_head has forward hooks or a replaced forward (e.g. a "
                  f"ZeRO-3 parameter gather); fused_linear_cross_entropy reads lm_head.weight directly and would "
                  f"bypass them, so transformers' forward runs")
        return original(*args, **kwargs)
    call = dict(bound.arguments)
    extra = call.pop(next((n for n, p in info["signature"].parameters.items() if p.kind is p.VAR_KEYWORD), ""), {})
    call.update(extra)
    for name in ("labels", "logits_to_keep"):
        call.pop(name, None)
    return_dict = call.pop("return_dict", None)
    loss_kw = {n: call[n] for n in _LOSS_KWARGS if n in call}
    call = {n: v for n, v in call.items() if n not in ("ignore_index", "shift_labels")}  # the decoder takes the rest
    outputs = getattr(self, self.base_model_prefix)(**call)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    weight = head.weight
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError(f"llmkern.patch: lm_head.weight is {tuple(weight.shape)} {weight.dtype} but the hidden states "
                         f"are (..., {hidden.shape[-1]}) {hidden.dtype}; a sharded weight (ZeRO-3) must be gathered "
                         f"first (or patch with fused_linear_cross_entropy=False)")
    ignore_index = loss_kw.get("ignore_index", -100)
    labels = _shifted(labels, ignore_index, loss_kw.get("shift_labels")).to(hidden.device)
    n = loss_kw.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                      reduction="mean" if n is None else "sum", backend=info["backend"])
    if n is not None:
        loss = loss / (n.to(loss.device) if torch.is_tensor(n) else n)
    fields = {k: getattr(outputs, k, None) for k in ("past_key_values", "hidden_states", "attentions",
                                                     "cross_attentions")}
    out = info["output_type"](loss=loss, logits=None, **{k: v for k, v in fields.items()
                                                           if k in info["output_type"].__dataclass_fields__})
    return out.to_tuple() if return_dict is False else out
