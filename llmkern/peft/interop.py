"""PEFT checkpoint interop and the PEFT -> llmkern swap.

The on-disk format (read from PEFT 0.21's save/load code, not copied):
``adapter_config.json`` (``peft_type`` plus that method's fields) and ``adapter_model.safetensors``.
- LoRA: ``base_model.model.<module path>.lora_A.weight`` (R, C_in) and ``.lora_B.weight`` (C_out, R);
  with ``bias`` other than ``none``, the trained biases (``<path>.base_layer.bias`` for an adapted layer);
  ``modules_to_save`` as ``base_model.model.<module path>.<param>``.
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
from llmkern.peft.lora import commit_lora, plan_lora
from llmkern.peft.models import HF_EXTRA, model_dims
from llmkern.peft.prompt import VirtualTokens, attach_virtual_tokens, check_can_attach, prompt_width
from llmkern.peft.report import InjectionReport, count_parameters
from llmkern.peft.targets import as_linear, is_linear_like, set_submodule

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


def _param_key(name: str, loras: dict[str, LoRALinear], prefix: str) -> str:
    """PEFT's saved key of an existing parameter that trains in place: a LoRA layer's bias lives
    under ``base_layer`` in PEFT's module tree; anything else keeps its path."""
    path, _, leaf = name.rpartition(".")
    return f"{prefix}{path}.base_layer.{leaf}" if path in loras else f"{prefix}{name}"


def _extra_params(model: nn.Module, tensors: dict, keys: list[str], path: str) -> dict[str, torch.Tensor]:
    """Parameter name -> tensor for the saved tensors that are not adapter factors: PEFT's
    ``modules_to_save`` (e.g. a trained classifier) and biases. Checked against the model's
    parameters (name and shape) before anything is copied."""
    params = dict(model.named_parameters())
    out = {}
    for key in keys:
        name = key.removeprefix(_PREFIX) if key.startswith(_PREFIX) else key.removeprefix("base_model.")
        name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        if name not in params:
            raise ValueError(f"load_adapter: tensor {key} in {path} matches no parameter of {type(model).__name__} "
                             f"(looked for {name!r})")
        if tuple(tensors[key].shape) != tuple(params[name].shape):
            raise ValueError(f"load_adapter: tensor {key} in {path} has shape {tuple(tensors[key].shape)}; the "
                             f"model's {name} has shape {tuple(params[name].shape)}")
        out[name] = tensors[key]
    return out


@torch.no_grad()
def _copy_extra(model: nn.Module, extra: dict[str, torch.Tensor], trainable, path: str) -> dict[str, str]:
    """Copies the checked tensors in; `trainable(name)` says which of them train afterwards."""
    params = dict(model.named_parameters())
    for name, t in extra.items():
        params[name].copy_(t)
        params[name].requires_grad_(trainable(name))
    return {name: f"loaded from {path}" for name in extra}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(f"PEFT-format adapters are safetensors files, and safetensors is not installed: "
                          f"{HF_EXTRA}") from e
    return safetensors.torch


def save_adapter(model: nn.Module, directory: str) -> list[str]:
    """Writes the llmkern adapters of `model` in PEFT's format. Returns the tensor keys written."""
    save_file = _safetensors().save_file
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    prompt = getattr(model, "llmkern_prompt", None)
    if bool(loras) == (prompt is not None):
        raise ValueError("save_adapter: the model must carry exactly one method: LoRA layers or a prompt method "
                         f"(found {len(loras)} LoRA layer(s) and {'a' if prompt is not None else 'no'} prompt)")
    applied = getattr(model, "llmkern_lora_config", None)
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
               "bias": applied.bias if applied is not None else "none",
               "fan_in_fan_out": any(m.from_conv1d for m in ms), "inference_mode": True,
               "base_model_name_or_path": None}
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
    # Parameters that trained in place (modules_to_save, biases) go under PEFT's keys too.
    prefix = _PREFIX if loras else "base_model."
    heads = _task_heads(model)
    saved_modules = list(applied.modules_to_save or []) if applied is not None else []
    names = [f"{h}.{pn}" for h in heads for pn, _ in model.get_submodule(h).named_parameters()]
    names += [n for n in getattr(model, "llmkern_in_place", {}) if n not in names]
    params = dict(model.named_parameters())
    for name in names:
        tensors[_param_key(name, loras, prefix)] = params[name].detach().contiguous()
    cfg["modules_to_save"] = (heads + [m for m in saved_modules if m not in heads]) or None
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return sorted(tensors)


def _read_adapter(directory: str) -> tuple[dict, dict, str, str]:
    """(config dict, tensors, config path, tensor path), with errors that name the file at fault."""
    load_file = _safetensors().load_file
    cfg_path = os.path.join(directory, "adapter_config.json")
    path = os.path.join(directory, "adapter_model.safetensors")
    for p, what in ((cfg_path, "the adapter config"), (path, "the adapter weights (only safetensors is read)")):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapter: {p} not found ({what})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_adapter: {cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"load_adapter: {cfg_path} holds a JSON {type(cfg).__name__}; expected an object with "
                         "'peft_type' and the method's fields")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise ValueError(f"load_adapter: {path} is not a readable safetensors file "
                         f"({type(e).__name__}: {e}); was it truncated or written by something else?") from e
    return cfg, tensors, cfg_path, path


def _load_lora(model: nn.Module, cfg: dict, tensors: dict, cfg_path: str, path: str,
               is_trainable: bool) -> InjectionReport:
    if "r" not in cfg:
        raise ValueError(f"load_adapter: {cfg_path} has no 'r' (the LoRA rank), which every PEFT LoRA config has")
    try:
        # PEFT's from_pretrained: the saved inference_mode is replaced by `not is_trainable`.
        lcfg = LoraConfig.from_peft({**cfg, "inference_mode": not is_trainable})
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {cfg_path}: {e}") from e
    plan = plan_lora(model, lcfg, "load_adapter")
    factors, want = {}, set()
    for n in plan.selected:
        c_in, c_out = plan.shapes[n]
        pair = []
        for ab, shape in (("lora_A", (lcfg.r, c_in)), ("lora_B", (c_out, lcfg.r))):
            key = f"{_PREFIX}{n}.{ab}.weight"
            if key not in tensors:
                raise ValueError(f"load_adapter: {path} has no tensor {key}, though the config in {cfg_path} "
                                 f"selects {n}")
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"load_adapter: tensor {key} in {path} has shape {tuple(tensors[key].shape)}; "
                                 f"r={lcfg.r} (from {cfg_path}) and {n} (C_in={c_in}, C_out={c_out}) need {shape}")
            pair.append(tensors[key])
            want.add(key)
        factors[n] = tuple(pair)
    stray = sorted(k for k in tensors if k not in want and (".lora_A." in k or ".lora_B." in k))
    if stray:
        raise ValueError(f"load_adapter: {path} has LoRA tensors for modules the config in {cfg_path} does not "
                         f"select on this model: {stray[:4]}{' ...' if len(stray) > 4 else ''}")
    extra = _extra_params(model, tensors, sorted(set(tensors) - want), path)
    report = commit_lora(model, plan, factors, "load_adapter")
    loaded = _copy_extra(model, extra, lambda name: is_trainable and name in plan.in_place, path)
    model.llmkern_in_place.update(loaded)
    report.in_place.update(loaded)
    return report


def _load_prompt(model: nn.Module, cfg: dict, tensors: dict, cfg_path: str, path: str) -> InjectionReport:
    kind = cfg["peft_type"]
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise NotImplementedError("load_adapter: encoder-decoder prompts (num_transformer_submodules=2) are "
                                  "not supported")
    method = {v: k for k, v in _PEFT_TYPES.items()}[kind]
    dims = model_dims(model, "load_adapter")
    check_can_attach(model, method, "load_adapter")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"load_adapter: {path} has no tensor 'prompt_embeddings' (a {kind} adapter's only "
                         f"tensor); it has {sorted(tensors)[:4]}")
    emb = tensors["prompt_embeddings"]
    k = cfg.get("num_virtual_tokens", emb.shape[0] if emb.dim() else 0)
    want = (k, prompt_width(method, dims))
    if tuple(emb.shape) != want:
        raise ValueError(f"load_adapter: prompt_embeddings in {path} has shape {tuple(emb.shape)}; "
                         f"num_virtual_tokens={k} (from {cfg_path}) on this {dims['model_type']} model "
                         f"(hidden {dims['hidden']}, {dims['layers']} layers, {dims['kv_heads']} KV heads of "
                         f"{dims['head_dim']}) needs {want}: was it saved for another model?")
    extra = _extra_params(model, tensors, sorted(set(tensors) - {"prompt_embeddings"}), path)
    w = model.get_input_embeddings().weight
    enc = VirtualTokens(method, emb.shape[0], emb.shape[1], init=emb, device=w.device, dtype=emb.dtype)
    report = attach_virtual_tokens(model, enc, dims, "load_adapter")
    loaded = _copy_extra(model, extra, lambda name: True, path)  # PEFT's modules_to_save: a classifier
    if loaded:
        model.llmkern_in_place = loaded
    report.in_place.update(loaded)
    return report


def load_adapter(model: nn.Module, directory: str, *, is_trainable: bool = True) -> InjectionReport:
    """Applies the method saved in `directory` (by PEFT or by ``save_adapter``) to `model` with its weights.

    Everything is read and checked first (the config, every tensor's key and shape against the config
    and the target module), so a failed load leaves the model as it was. `is_trainable=False` loads
    frozen, as ``PeftModel.from_pretrained`` does by default."""
    cfg, tensors, cfg_path, path = _read_adapter(directory)
    kind = cfg.get("peft_type")
    if kind == "LORA":
        report = _load_lora(model, cfg, tensors, cfg_path, path, is_trainable)
    elif kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        report = _load_prompt(model, cfg, tensors, cfg_path, path)
    else:
        raise NotImplementedError(f"load_adapter: peft_type {kind!r} in {cfg_path} is not supported; supported: "
                                  "LORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING")
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
        new = LoRALinear.from_linear(base, m.r[a], m.lora_alpha[a], p, from_conv1d=from_conv1d)
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
