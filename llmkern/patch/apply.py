"""``apply_llmkern_kernels(model)``: llmkern's fused kernels in a live transformers model, and ``revert``.

Patching is per module instance, never per class: each matching module gets an instance-level
``forward`` (and the causal-LM module an instance-level ``loss_function``) that calls the fused op
on the module's own parameters, and records what it replaced in ``module._llmkern_patch``. So
other models of the same class in the process are untouched, parameters and state dicts stay as
they are, and wrappers around the model (llmkern.peft, PEFT's PeftModel, llmkern DDP/ZeRO) do not
matter: the modules are found by walking ``model.modules()``. ``revert(model)`` deletes the
instance attributes, which restores the class's own forward exactly.

The one process-wide change is RoPE's: transformers' attention calls its modeling module's global
``apply_rotary_pos_emb``, which is replaced by a dispatcher that runs llmkern's rope only inside a
patched attention module's forward (llmkern/patch/forwards.py) and is put back when no patched
attention module is left.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import weakref

from torch import nn

from llmkern.ops import _backends
from llmkern.patch import forwards
from llmkern.patch.architectures import ARCHITECTURES, GATED_ACTIVATIONS, Architecture

__all__ = ["apply_llmkern_kernels", "revert", "PatchReport", "KERNELS"]

KERNELS = ("rms_norm", "layer_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy")

# Patched attention modules per modeling module: the RoPE dispatcher is removed when none is left,
# by revert or when the last one is garbage-collected (a weakref.finalize per module): a model that
# died unreverted in a reference cycle used to keep the dispatcher installed after the next revert.
_rope_users: dict[str, weakref.WeakSet] = {}


def _drop_rope_dispatch_if_unused(modeling) -> None:
    users = _rope_users.get(modeling.__name__)
    # Iterating yields only live modules; len() may still count one whose weakref callbacks are running.
    if users is not None and not any(True for _ in users):
        forwards.uninstall_rope_dispatch(modeling)


@dataclasses.dataclass(kw_only=True, slots=True)
class PatchReport:
    """What ``apply_llmkern_kernels`` did to a model."""

    architecture: str
    """The architecture found (a key of llmkern.patch.architectures.ARCHITECTURES)."""
    patched: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Kernel -> the module paths it was applied to (the model's own names)."""
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Kernel -> why it was not applied (asked for but inapplicable, or not asked for)."""

    def __str__(self) -> str:
        lines = [f"llmkern kernels for {self.architecture}:"]
        lines += [f"  patched {k}: {len(v)} module(s)" for k, v in self.patched.items()]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        return "\n".join(lines)


def _class_name(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__name__


def _find_architecture(model: nn.Module) -> Architecture:
    found = {}
    for m in model.modules():
        mod, name = _class_name(m)
        for arch in ARCHITECTURES.values():
            if mod == arch.modeling and name in (arch.causal_lm, arch.decoder):
                found[arch.name] = arch
    if not found:
        kinds = sorted({f"{a.causal_lm}/{a.decoder}" for a in ARCHITECTURES.values()})
        raise ValueError(f"apply_llmkern_kernels: {type(model).__name__} contains none of the supported transformers "
                         f"architectures {sorted(ARCHITECTURES)} (looked for the classes {kinds})")
    if len(found) > 1:
        raise ValueError(f"apply_llmkern_kernels: {type(model).__name__} contains several architectures "
                         f"{sorted(found)}; patch each submodel on its own")
    return next(iter(found.values()))


def _set_forward(module: nn.Module, fn, info: dict) -> None:
    module.__dict__["_llmkern_patch"] = info
    module.forward = types.MethodType(fn, module)


def _patchable(module: nn.Module) -> str | None:
    """Why the module's forward cannot be replaced, or None."""
    if "forward" in module.__dict__:
        return "it already has an instance-level forward (another patch, or an accelerate hook)"
    return None


def apply_llmkern_kernels(model: nn.Module, *, rms_norm: bool = True, layer_norm: bool = True, swiglu: bool = True,
                          rope: bool = True, cross_entropy: bool = True, fused_linear_cross_entropy: bool = True,
                          backend: _backends.Backend | None = None) -> PatchReport:
    """Patches the modules of a transformers Llama, Mistral, Qwen2, Qwen3, Gemma or GPT-2 model (also
    inside llmkern.peft / PEFT wrappers) to run llmkern's fused kernels; returns a :class:`PatchReport`.

    rms_norm      the RMSNorm modules (Llama's or Gemma's convention)
    layer_norm    GPT-2's LayerNorm modules
    swiglu        the gated MLPs: the activation and the product as one op (SwiGLU, or GeGLU for Gemma)
    rope          rotary embeddings of q and k in one op (cos/sin from the model's rotary module)
    cross_entropy the causal-LM loss without the fp32 copy of the logits (``model.loss_function``)
    fused_linear_cross_entropy  in training with labels, lm_head + loss over chunks of tokens: the
                  (B, T, V) logits are never formed and the output's ``logits`` is None; needs a plain
                  ``nn.Linear`` head without bias (a LoRA-wrapped head keeps the unfused head, with
                  cross_entropy still fused)
    backend       the ops' backend (None: automatic; see llmkern.ops._backends)

    Raises ValueError for an architecture it does not know, or a model that is already patched.
    ``revert(model)`` undoes everything.
    """
    arch = _find_architecture(model)
    already = [n for n, m in model.named_modules() if "_llmkern_patch" in m.__dict__ or "_llmkern_loss" in m.__dict__]
    if already:
        raise ValueError(f"apply_llmkern_kernels: the model is already patched ({already[0]!r} and "
                         f"{len(already) - 1} more); call llmkern.patch.revert(model) first")
    want = {"rms_norm": rms_norm, "layer_norm": layer_norm, "swiglu": swiglu, "rope": rope,
            "cross_entropy": cross_entropy, "fused_linear_cross_entropy": fused_linear_cross_entropy}
    report = PatchReport(architecture=arch.name)
    for kernel, reason in arch.not_patched:
        if want[kernel]:
            report.skipped[kernel] = reason
            want[kernel] = False
    for kernel, on in want.items():
        if not on and kernel not in report.skipped:
            report.skipped[kernel] = "not asked for"
    modeling = importlib.import_module(arch.modeling)
    base = {"backend": backend}
    named = list(model.named_modules())
    causal = [(n, m) for n, m in named if _class_name(m) == (arch.modeling, arch.causal_lm)]

    def patch_modules(kernel: str, select, fn, info_of) -> None:
        done, refused = [], {}
        for name, m in named:
            if not select(m):
                continue
            why = _patchable(m)
            if why is None:
                info = info_of(m)
                if isinstance(info, str):
                    why = info
                else:
                    _set_forward(m, fn, {**base, "kernel": kernel, **info})
                    done.append(name)
                    continue
            refused[name] = why
        if done:
            report.patched[kernel] = done
        if refused:
            report.skipped[kernel] = "; ".join(f"{n or type(model).__name__}: {w}" for n, w in refused.items())
        elif not done:
            report.skipped[kernel] = "the model has no module it applies to"

    if want["rms_norm"]:
        def norm_info(m):
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
            return {"eps": float(eps), "convention": arch.convention} if eps is not None else \
                f"{type(m).__name__} has no variance_epsilon/eps attribute"
        patch_modules("rms_norm", lambda m: _class_name(m) == (arch.modeling, arch.rms_norm),
                      forwards.rms_norm_forward, norm_info)
    if want["layer_norm"]:
        def ln_info(m):
            return {} if len(m.normalized_shape) == 1 else f"normalized_shape {m.normalized_shape} spans several dims"
        patch_modules("layer_norm", lambda m: type(m) is nn.LayerNorm, forwards.layer_norm_forward, ln_info)
    if want["swiglu"]:
        act_name = _hidden_act(causal or named)

        def mlp_info(m):
            act = GATED_ACTIVATIONS.get(act_name)
            if act is None:
                return f"hidden_act {act_name!r} has no fused gated activation (known: {sorted(GATED_ACTIVATIONS)})"
            if not all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")):
                return f"{type(m).__name__} lacks gate_proj/up_proj/down_proj"
            return {"activation": act}
        patch_modules("swiglu", lambda m: _class_name(m) == (arch.modeling, arch.mlp), forwards.gated_mlp_forward,
                      mlp_info)
    if want["rope"]:
        if not isinstance(getattr(modeling, "apply_rotary_pos_emb", None), (types.FunctionType, forwards.RopeDispatch)):
            report.skipped["rope"] = f"{arch.modeling} has no apply_rotary_pos_emb function"
        else:
            patch_modules("rope", lambda m: _class_name(m) == (arch.modeling, arch.attention),
                          forwards.attention_forward, lambda m: {"modeling": modeling})
            users = _rope_users.setdefault(arch.modeling, weakref.WeakSet())
            for name in report.patched.get("rope", []):
                m = model.get_submodule(name)
                users.add(m)
                weakref.finalize(m, _drop_rope_dispatch_if_unused, modeling)
            if users:
                forwards.install_rope_dispatch(modeling)
    if want["cross_entropy"]:
        done = []
        for name, m in causal:
            m.__dict__["_llmkern_loss"] = m.__dict__.get("_loss_function", _MISSING)
            m.loss_function = forwards.causal_lm_loss
            done.append(name)
        if done:
            report.patched["cross_entropy"] = done
        else:
            report.skipped["cross_entropy"] = f"no {arch.causal_lm} in the model (a bare decoder computes no loss)"
    if want["fused_linear_cross_entropy"]:
        output_type = _output_type(arch)

        def flce_info(m):
            head = getattr(m, "lm_head", None)
            if type(head) is not nn.Linear:
                return (f"lm_head is {type(head).__name__}, not a plain nn.Linear (an adapter or wrapper on the head "
                        f"would be bypassed by reading lm_head.weight); the head stays unfused")
            if head.bias is not None:
                return "lm_head has a bias; the fused op has none"
            if getattr(m.config, "final_logit_softcapping", None):
                return "the model soft-caps its logits (final_logit_softcapping); the fused op does not"
            return {"signature": inspect.signature(type(m).forward.__get__(m)), "output_type": output_type}
        patch_modules("fused_linear_cross_entropy", lambda m: _class_name(m) == (arch.modeling, arch.causal_lm),
                      forwards.causal_lm_forward, flce_info)
    return report


_MISSING = object()


def _hidden_act(named) -> str | None:
    for _, m in named:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "hidden_act"):
            return cfg.hidden_act
    return None


def _output_type(arch: Architecture):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    return CausalLMOutputWithCrossAttentions if arch.name == "gpt2" else CausalLMOutputWithPast


def revert(model: nn.Module) -> list[str]:
    """Undoes ``apply_llmkern_kernels`` on every module of ``model``: the instance-level forwards and
    loss_function go, so each module runs its class's code again. Returns the paths of the modules
    reverted (empty when nothing was patched)."""
    reverted = []
    for name, m in model.named_modules():
        if "_llmkern_patch" in m.__dict__:
            info = m.__dict__.pop("_llmkern_patch")
            m.__dict__.pop("forward", None)
            if info["kernel"] == "rope":
                users = _rope_users.get(info["modeling"].__name__)
                if users is not None:
                    users.discard(m)
                    _drop_rope_dispatch_if_unused(info["modeling"])
            reverted.append(name)
        if "_llmkern_loss" in m.__dict__:
            previous = m.__dict__.pop("_llmkern_loss")
            if previous is _MISSING:
                m.__dict__.pop("_loss_function", None)
            else:
                m.__dict__["_loss_function"] = previous
            if name not in reverted:
                reverted.append(name)
    return reverted
