"""PEFT checkpoint interop and the PEFT -> llmkern swap.

The on-disk format (read from PEFT 0.21's save/load code, not copied):
``adapter_config.json`` (``peft_type`` plus that method's fields) and ``adapter_model.safetensors``.
- LoRA: ``base_model.model.<module path>.lora_A.weight`` (R, C_in) and ``.lora_B.weight`` (C_out, R).
- prompt tuning / P-tuning / prefix tuning: one tensor ``prompt_embeddings``: (K, C) for the first
  two, (P, L·2·H_kv·D) for prefixes. PEFT stores the reparameterized *output* (the encoder is a
  training-time device), so a loaded prompt is a plain table of rows, trainable again.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from llmkern.nn.lora import LoRALinear
from llmkern.peft.config import LoraConfig
from llmkern.peft.lora import as_linear, apply_lora, set_submodule
from llmkern.peft.prompt import VirtualTokens, attach_virtual_tokens, model_dims
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.targets import is_linear_like

__all__ = ["save_adapter", "load_adapter", "fuse_peft_model", "task_type"]

_PREFIX = "base_model.model."
_PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for the model's head class (picks the PeftModel subclass on load)."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None


def _task_heads(model: nn.Module) -> list[str]:
    if task_type(model) not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        return []
    return [n for n, _ in model.named_children() if n in ("classifier", "score", "qa_outputs")]


def _load_extra(model: nn.Module, tensors: dict, keys: list[str], path: str) -> list[str]:
    """Copies PEFT's ``modules_to_save`` tensors (e.g. a trained classifier) into the model's modules."""
    params = dict(model.named_parameters())
    done = []
    for key in keys:
        name = key.removeprefix(_PREFIX) if key.startswith(_PREFIX) else key.removeprefix("base_model.")
        name = name.replace(".modules_to_save.default.", ".")
        if name not in params:
            raise KeyError(f"load_adapter: tensor {key} in {path} matches no parameter of the model")
        params[name].data.copy_(tensors[key])
        params[name].requires_grad_(True)
        done.append(name)
    return done


def save_adapter(model: nn.Module, directory: str) -> list[str]:
    """Writes the llmkern adapters of `model` in PEFT's format. Returns the tensor keys written."""
    from safetensors.torch import save_file
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    prompt = getattr(model, "llmkern_prompt", None)
    if bool(loras) == (prompt is not None):
        raise ValueError("save_adapter: the model must carry exactly one method: LoRA layers or a prompt method "
                         f"(found {len(loras)} LoRA layer(s) and {'a' if prompt is not None else 'no'} prompt)")
    if loras:
        ms = list(loras.values())
        first = ms[0]
        if any((m.r, m.alpha, m.use_rslora, m.dropout) != (first.r, first.alpha, first.use_rslora, first.dropout)
               for m in ms):
            raise ValueError("save_adapter: LoRA layers with different r/alpha/dropout need PEFT's rank_pattern, "
                             "which is not written yet")
        if any(m.merged for m in ms):
            raise ValueError("save_adapter: LoRA layers are merged; call unmerge(model) first")
        tensors = {}
        for n, m in loras.items():
            tensors[f"{_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
            tensors[f"{_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
        cfg = {"peft_type": "LORA", "task_type": task_type(model), "r": first.r, "lora_alpha": first.alpha,
               "lora_dropout": first.dropout, "use_rslora": first.use_rslora, "target_modules": sorted(loras),
               "bias": "none", "fan_in_fan_out": any(getattr(m, "from_conv1d", False) for m in ms),
               "inference_mode": True, "base_model_name_or_path": None}
    else:
        d = prompt.dims
        with torch.no_grad():
            emb = prompt().detach().contiguous()
        token_dim = d["hidden"] if prompt.kind != "prefix_tuning" else d["kv_heads"] * d["head_dim"]
        heads = d["kv_heads"] if prompt.kind == "prefix_tuning" else model.config.num_attention_heads
        cfg = {"peft_type": _PEFT_TYPES[prompt.kind], "task_type": task_type(model),
               "num_virtual_tokens": prompt.num_tokens, "token_dim": token_dim, "num_transformer_submodules": 1,
               "num_attention_heads": heads, "num_layers": d["layers"], "inference_mode": True,
               "base_model_name_or_path": None}
        if prompt.kind == "prompt_tuning":
            cfg["prompt_tuning_init"] = "RANDOM"
        tensors = {"prompt_embeddings": emb}
    # PEFT trains (and saves) a copy of a classification head; write ours under its key so it loads.
    heads = _task_heads(model)
    head_prefix = _PREFIX if loras else "base_model."
    for h in heads:
        for pn, p in model.get_submodule(h).named_parameters():
            tensors[f"{head_prefix}{h}.{pn}"] = p.detach().contiguous()
    cfg["modules_to_save"] = heads or None
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return sorted(tensors)


_UNSUPPORTED_LORA = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                     "bias": "none", "use_qalora": False}


def load_adapter(model: nn.Module, directory: str, *, is_trainable: bool = True) -> InjectionReport:
    """Applies the method saved in `directory` (by PEFT or by ``save_adapter``) to `model` with its weights."""
    from safetensors.torch import load_file
    with open(os.path.join(directory, "adapter_config.json")) as f:
        cfg = json.load(f)
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_adapter: {path} not found (only the safetensors format is read)")
    tensors = load_file(path)
    kind = cfg.get("peft_type")
    if kind == "LORA":
        for key, ok in _UNSUPPORTED_LORA.items():
            if cfg.get(key, ok) not in (ok, None, {}, []):
                raise NotImplementedError(f"load_adapter: LoRA with {key}={cfg[key]!r} is not supported")
        target = cfg["target_modules"]
        target = sorted(target) if isinstance(target, (list, set)) else target
        lcfg = LoraConfig(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                          use_rslora=cfg.get("use_rslora", False), target_modules=target)
        report = apply_lora(model, lcfg)
        want = set()
        for n, m in model.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            for ab in ("lora_A", "lora_B"):
                key = f"{_PREFIX}{n}.{ab}.weight"
                if key not in tensors:
                    raise KeyError(f"load_adapter: {key} missing from {path}")
                getattr(m, ab).weight.data.copy_(tensors[key])
                want.add(key)
        extra = _load_extra(model, tensors, sorted(set(tensors) - want), path)
        report.replaced += [f"{n} (modules_to_save)" for n in extra]
    elif kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise NotImplementedError("load_adapter: encoder-decoder prompts (num_transformer_submodules=2) are "
                                      "not supported")
        method = {v: k for k, v in _PEFT_TYPES.items()}[kind]
        dims = model_dims(model, "load_adapter")
        emb = tensors["prompt_embeddings"]
        w = model.get_input_embeddings().weight
        enc = VirtualTokens(method, emb.shape[0], emb.shape[1], init=emb, device=w.device, dtype=emb.dtype)
        report = attach_virtual_tokens(model, enc, dims, "load_adapter")
        extra = _load_extra(model, tensors, sorted(set(tensors) - {"prompt_embeddings"}), path)
        report.replaced += [f"{n} (modules_to_save)" for n in extra]
        if method == "prefix_tuning" and emb.shape[1] != dims["layers"] * 2 * dims["kv_heads"] * dims["head_dim"]:
            raise ValueError(f"load_adapter: prefix of width {emb.shape[1]} does not fit this model")
    else:
        raise NotImplementedError(f"load_adapter: peft_type {kind!r} is not supported; supported: LORA, "
                                  "PROMPT_TUNING, P_TUNING, PREFIX_TUNING")
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    report.trainable_params, report.total_params = count_parameters(model)
    return report


def fuse_peft_model(peft_model: nn.Module) -> InjectionReport:
    """Swaps each PEFT LoRA ``Linear`` (single active adapter, unmerged, no DoRA) for ``LoRALinear`` in
    place, sharing its base weight and keeping its A, B and scale (a GPT-2 Conv1D base weight is
    transposed into a Linear once). Everything else is reported as a
    fallback with the reason; it keeps running as PEFT's layer. After the swap, save with
    ``save_adapter`` (PEFT's ``save_pretrained`` no longer finds its layers)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    replaced, skipped = [], {}
    for name, m in list(peft_model.named_modules()):
        if not isinstance(m, LoraLayer):
            continue
        why = None
        adapters = list(m.lora_A.keys())
        if not isinstance(m, PeftLoraLinear):
            why = f"{type(m).__name__} (only nn.Linear LoRA layers have a fused kernel)"
        elif len(adapters) != 1:
            why = f"{len(adapters)} adapters on one layer ({adapters}); LoRALinear holds one"
        elif m.use_dora.get(adapters[0], False):
            why = "DoRA (magnitude-normalised weight) is not implemented by LoRALinear"
        elif m.merged:
            why = "layer is merged; unmerge first"
        elif not is_linear_like(m.get_base_layer()):
            why = f"base layer is {type(m.get_base_layer()).__name__}, not nn.Linear / Conv1D (quantized?)"
        elif m.lora_bias.get(adapters[0], False):
            why = "lora_bias=True is not implemented by LoRALinear"
        if why:
            skipped[name] = why
            continue
        a = adapters[0]
        drop = m.lora_dropout[a]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        # A GPT-2 Conv1D base (fan_in_fan_out) becomes a Linear holding its transposed weight.
        base, from_conv1d = as_linear(m.get_base_layer())
        new = LoRALinear.from_linear(base, m.r[a], m.lora_alpha[a], p)
        new.from_conv1d = from_conv1d
        new.scale = float(m.scaling[a])
        new.lora_A.weight = m.lora_A[a].weight
        new.lora_B.weight = m.lora_B[a].weight
        new.disabled = m.disable_adapters
        set_submodule(peft_model, name, new)
        replaced.append(name)
    if not replaced and not skipped:
        raise ValueError(f"fuse_peft_model: no PEFT LoRA layer found in {type(peft_model).__name__}")
    trainable, total = count_parameters(peft_model)
    return InjectionReport(method="fuse_peft_model", replaced=replaced, skipped=skipped, trainable_params=trainable,
                           total_params=total)
