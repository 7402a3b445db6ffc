"""Configs for the injection API: ``kw_only``, ``slots`` dataclasses, one docstring per field.

:class:`LoraConfig` speaks PEFT's language: every field of ``peft.LoraConfig`` (peft 0.21) is
accepted under PEFT's name, so a PEFT user changes the import and nothing else. What llmkern can
honour, it honours with PEFT's meaning; what it cannot (DoRA, PiSSA/LoftQ-style inits, QA-LoRA,
Megatron layers, ...) is refused with a ValueError naming the field, never ignored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, get_args

from llmkern._rng import check_dropout_p
from llmkern.ops._backends import BACKENDS, Backend
from llmkern.peft.targets import ModuleSpec, normalize_spec

from llmkern.ops.adapter_bottleneck import Activation

__all__ = ["LoraConfig", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "AdapterConfig"]

LoraBias = Literal["none", "all", "lora_only"]
TaskType = Literal["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"]
AdapterForm = Literal["series", "parallel"]


def _check_tokens(name: str, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"{name}: num_virtual_tokens must be a positive int, got {k!r}")


def _check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")


def _check_width(owner: str, width: int) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ValueError(f"{owner}: encoder_hidden_size must be a positive int, got {width!r}")


def _is_off(value) -> bool:
    """A refused feature's field left at a value that means "not used"."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set)) and not value)


# Fields of peft.LoraConfig llmkern cannot honour: name -> why. They are accepted only "off" (None,
# False, empty), so a PEFT config that leaves them at their defaults works unchanged.
_REFUSED = {
    "rank_pattern": "per-module ranks are not implemented; give one r",
    "alpha_pattern": "per-module alphas are not implemented; give one lora_alpha",
    "use_dora": "DoRA (magnitude-normalised weights) has no fused kernel in llmkern",
    "lora_bias": "a bias on lora_B is not part of the fused lora_linear op",
    "use_qalora": "QA-LoRA needs a quantized base, which llmkern does not have",
    "layer_replication": "layer replication builds new blocks; llmkern only swaps linears",
    "megatron_config": "use llmkern's own tensor parallelism for LoRA on TP layers",
    "loftq_config": "LoftQ init needs a quantized base",
    "eva_config": "EVA init is data-driven and not implemented",
    "corda_config": "CorDA init is data-driven and not implemented",
    "lora_ga_config": "LoRA-GA init is not implemented",
    "velora_config": "VeLoRA is not implemented",
    "monteclora_config": "MonteCLoRA is not implemented",
    "arrow_config": "Arrow routing is not implemented",
    "kasa_config": "KaSA is not implemented",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not implemented",
    "trainable_token_indices": "trainable token rows are not implemented",
    "target_parameters": "LoRA on bare nn.Parameters (MoE experts) is not implemented",
    "use_bdlora": "block-diagonal LoRA is not implemented",
    "ensure_weight_tying": "tying adapters of tied embeddings is not implemented",
}


@dataclass(kw_only=True, slots=True, repr=False)
class LoraConfig:
    """LoRA: which linears get an adapter, its rank and scale, and what else trains. Field names and
    defaults are PEFT's (``peft.LoraConfig``); :meth:`from_peft` converts a PEFT config object."""

    r: int = 8
    """LoRA rank R (>= 1)."""
    lora_alpha: float | None = None
    """Scale numerator: s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). None: 8, PEFT's default."""
    lora_dropout: float | None = None
    """Dropout on the adapter input, in [0, 1); None: 0. Its mask is regenerated in backward, never stored."""
    alpha: InitVar[float | None] = None
    """Alias of ``lora_alpha`` (llmkern's first spelling); reads back as lora_alpha. Giving both, different,
    raises."""
    dropout: InitVar[float | None] = None
    """Alias of ``lora_dropout``; reads back as lora_dropout. Giving both, different, raises."""
    target_modules: ModuleSpec = None
    """Module names (a module matches if its path equals a name or ends with ``.name``; any collection
    type), a regex (``re.fullmatch`` on the path), ``"all-linear"`` (every nn.Linear / GPT-2 Conv1D
    except the output head), or None: PEFT's default for the model type (q_proj/v_proj for Llama)."""
    exclude_modules: ModuleSpec = None
    """Same forms as ``target_modules``; matching modules are skipped (and reported as such)."""
    use_rslora: bool = False
    """Rank-stabilised scale lora_alpha / sqrt(r)."""
    bias: LoraBias = "none"
    """Which existing biases train with the adapters: ``none``; ``all`` (every parameter named ``bias``);
    ``lora_only`` (the biases of the adapted linears). They train in place, as in PEFT, so
    ``disable_adapters`` refuses a model whose biases trained."""
    modules_to_save: list[str] | None = None
    """Modules (names matched like ``target_modules`` lists) that train whole, in place (e.g. a new
    classifier). Saved with the adapter; never given LoRA. A name that matches nothing raises."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """True: A Kaiming-uniform, B zero (a no-op at start). ``"gaussian"``: A ~ N(0, 1/r²), B zero.
    False: A and B keep nn.Linear's random init (the adapter changes the output from the start; for
    tests). PiSSA, OLoRA, LoftQ and the data-driven inits are refused."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules in these transformer blocks (index from the path, PEFT's rule). Needs a
    collection of names as ``target_modules`` (PEFT refuses it with a regex)."""
    layers_pattern: list[str] | str | None = None
    """The path segment that precedes the block index (``"layers"``, ``"h"``); None: the first numbered
    segment. Only with ``layers_to_transform``."""
    fan_in_fan_out: bool = False
    """PEFT's flag for GPT-2's Conv1D (weight stored (C_in, C_out)). llmkern reads the layout from the
    module's type, which is what PEFT ends up doing too (it warns and corrects a wrong flag)."""
    inference_mode: bool = False
    """True: the adapters are created frozen (nothing trains), as PEFT does."""
    task_type: TaskType | None = None
    """PEFT's task type. ``SEQ_CLS`` / ``TOKEN_CLS`` add ``classifier`` and ``score``, and
    ``QUESTION_ANS`` adds ``qa_outputs``, to modules_to_save where the model has them (PEFT's rule)."""
    backend: Backend | None = None
    """Backend of ``llmkern.ops.lora_linear`` (None: chosen from device and dtype). llmkern only."""
    peft_type: Literal["LORA"] | None = None
    """PEFT's method tag; only ``"LORA"`` (or None) makes sense here."""
    base_model_name_or_path: str | None = None
    """Metadata PEFT writes into adapter_config.json; no effect on the model."""
    revision: str | None = None
    """Metadata (the base model's revision); no effect on the model."""
    auto_mapping: dict | None = None
    """Metadata (PEFT's custom-model mapping); no effect on the model."""
    peft_version: str | None = None
    """Metadata (the PEFT version that wrote the config); no effect on the model."""
    megatron_core: str | None = "megatron.core"
    """PEFT's Megatron module name; only read with ``megatron_config``, which is refused."""
    qalora_group_size: int = 16
    """PEFT's QA-LoRA pooling size; only read with ``use_qalora``, which is refused."""
    runtime_config: Any = None
    """PEFT's ``LoraRuntimeConfig``; accepted when its ``ephemeral_gpu_offload`` is off."""
    rank_pattern: dict = field(default_factory=dict)
    """Refused unless empty: per-module ranks."""
    alpha_pattern: dict = field(default_factory=dict)
    """Refused unless empty: per-module alphas."""
    use_dora: bool = False
    """Refused unless False: DoRA."""
    lora_bias: bool = False
    """Refused unless False: a bias on lora_B."""
    use_qalora: bool = False
    """Refused unless False: QA-LoRA."""
    layer_replication: list | None = None
    """Refused unless None: layer replication."""
    megatron_config: dict | None = None
    """Refused unless None: PEFT's Megatron LoRA layers."""
    loftq_config: dict = field(default_factory=dict)
    """Refused unless empty: LoftQ init."""
    eva_config: Any = None
    """Refused unless None: EVA init."""
    corda_config: Any = None
    """Refused unless None: CorDA init."""
    lora_ga_config: Any = None
    """Refused unless None: LoRA-GA init."""
    velora_config: Any = None
    """Refused unless None: VeLoRA."""
    monteclora_config: Any = None
    """Refused unless None: MonteCLoRA."""
    arrow_config: Any = None
    """Refused unless None: Arrow."""
    kasa_config: Any = None
    """Refused unless None: KaSA."""
    alora_invocation_tokens: list[int] | None = None
    """Refused unless None: activated LoRA."""
    trainable_token_indices: Any = None
    """Refused unless None: trainable token rows."""
    target_parameters: list[str] | None = None
    """Refused unless None: LoRA on bare parameters."""
    use_bdlora: Any = None
    """Refused unless None: block-diagonal LoRA."""
    ensure_weight_tying: bool = False
    """Refused unless False: tied adapters."""

    def __post_init__(self, alpha, dropout):
        self.lora_alpha = _alias("lora_alpha", self.lora_alpha, "alpha", alpha, 8.0)
        self.lora_dropout = _alias("lora_dropout", self.lora_dropout, "dropout", dropout, 0.0)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive int, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig: lora_alpha must be a finite number, got {self.lora_alpha!r}")
        check_dropout_p(self.lora_dropout, "LoraConfig", "lora_dropout")  # the op's own range check
        self.target_modules = normalize_spec("LoraConfig", "target_modules", self.target_modules)
        self.exclude_modules = normalize_spec("LoraConfig", "exclude_modules", self.exclude_modules)
        self.modules_to_save = normalize_spec("LoraConfig", "modules_to_save", self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            raise TypeError("LoraConfig: modules_to_save must be a collection of module names, got a str")
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            self.layers_to_transform = list(self.layers_to_transform)
            if not all(isinstance(i, int) and i >= 0 for i in self.layers_to_transform):
                raise ValueError(f"LoraConfig: layers_to_transform must hold block indices >= 0, got "
                                 f"{self.layers_to_transform!r}")
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig: layers_to_transform needs target_modules as module names, not the "
                                 f"string {self.target_modules!r} (PEFT refuses it too)")
        elif self.layers_pattern:
            raise ValueError("LoraConfig: layers_pattern is only read with layers_to_transform; give both")
        _check_choice("LoraConfig", "bias", self.bias, get_args(LoraBias))
        _check_choice("LoraConfig", "init_lora_weights", self.init_lora_weights, (True, False, "gaussian"))
        if self.task_type is not None:
            _check_choice("LoraConfig", "task_type", self.task_type, get_args(TaskType))
        if self.peft_type not in (None, "LORA"):
            raise ValueError(f"LoraConfig: peft_type must be 'LORA' (or None), got {self.peft_type!r}")
        if self.backend is not None:
            _check_choice("LoraConfig", "backend", self.backend, BACKENDS)
        for name, why in _REFUSED.items():
            value = getattr(self, name)
            if not _is_off(value):
                raise ValueError(f"LoraConfig: {name}={value!r} is not supported by llmkern ({why}); leave it at "
                                 "its default")
        offload = getattr(self.runtime_config, "ephemeral_gpu_offload", None)
        if isinstance(self.runtime_config, dict):
            offload = self.runtime_config.get("ephemeral_gpu_offload")
        if offload:
            raise ValueError("LoraConfig: runtime_config.ephemeral_gpu_offload=True is not supported by llmkern "
                             "(there is no CPU-resident adapter path); leave it False")

    def __repr__(self) -> str:
        """The fields that differ from their defaults (PEFT's field list is 40 long)."""
        default = LoraConfig()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)]
        return f"LoraConfig({', '.join(changed)})"

    @property
    def scale(self) -> float:
        """s, the factor on B·A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    @classmethod
    def from_peft(cls, config) -> "LoraConfig":
        """The llmkern config of a ``peft.LoraConfig`` (or of its ``adapter_config.json`` dict).

        Every field is read under its PEFT name; a field llmkern does not know (a newer PEFT) is
        refused unless it is off (None, False, empty)."""
        items = dict(config) if isinstance(config, dict) else {f.name: getattr(config, f.name)
                                                                for f in dataclasses.fields(config)}
        kind = items.get("peft_type")
        kind = getattr(kind, "value", kind)  # PEFT's PeftType enum
        if kind not in (None, "LORA"):
            raise ValueError(f"LoraConfig.from_peft: a {kind} config is not a LoRA config")
        task = items.get("task_type")
        known = {f.name for f in dataclasses.fields(cls)} | {"alpha", "dropout"}
        unknown = {k: v for k, v in items.items() if k not in known and not _is_off(v)}
        if unknown:
            raise ValueError(f"LoraConfig.from_peft: fields unknown to llmkern are set: {unknown}; llmkern "
                             "cannot honour them")
        kw = {k: v for k, v in items.items() if k in known}
        kw.update(peft_type="LORA", task_type=getattr(task, "value", task))
        runtime = kw.get("runtime_config")
        if runtime is not None and not isinstance(runtime, dict):
            kw["runtime_config"] = {"ephemeral_gpu_offload": bool(getattr(runtime, "ephemeral_gpu_offload", False))}
        return cls(**kw)


# The aliases read back too (cfg.alpha is cfg.lora_alpha). Set after @dataclass, which has already
# taken their InitVar defaults (None) for __init__.
LoraConfig.alpha = property(lambda self: self.lora_alpha, doc="Alias of lora_alpha.")
LoraConfig.dropout = property(lambda self: self.lora_dropout, doc="Alias of lora_dropout.")


def _alias(name: str, value, alias: str, alias_value, default):
    if alias_value is None:
        return default if value is None else value
    if value is not None and value != alias_value:
        raise ValueError(f"LoraConfig: {name}={value!r} and its alias {alias}={alias_value!r} disagree; give one")
    return alias_value


@dataclass(kw_only=True, slots=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 8
    """K, the number of trainable virtual-token embeddings prepended to the input."""
    init: Literal["random", "text"] = "random"
    """``random``: N(0, σ²) with σ the std of the model's word embeddings; ``text``: the embeddings of
    ``init_text``'s tokens, repeated to fill K and truncated (needs a tokenizer at apply time)."""
    init_text: str | None = None
    """The text for ``init="text"``."""

    def __post_init__(self):
        _check_tokens("PromptTuningConfig", self.num_virtual_tokens)
        _check_choice("PromptTuningConfig", "init", self.init, ("random", "text"))
        if self.init == "text" and not self.init_text:
            raise ValueError("PromptTuningConfig: init='text' needs init_text")


@dataclass(kw_only=True, slots=True)
class PTuningConfig:
    num_virtual_tokens: int = 8
    """K, the number of virtual tokens produced by the prompt encoder."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """Reparameterization: a 3-layer MLP, or a 2-layer bidirectional LSTM followed by a 2-layer MLP."""
    encoder_hidden_size: int = 64
    """Hidden width of the prompt encoder."""

    def __post_init__(self):
        _check_tokens("PTuningConfig", self.num_virtual_tokens)
        _check_choice("PTuningConfig", "encoder", self.encoder, ("mlp", "lstm"))
        _check_width("PTuningConfig", self.encoder_hidden_size)


@dataclass(kw_only=True, slots=True)
class PrefixTuningConfig:
    num_virtual_tokens: int = 8
    """P, the number of key/value prefix positions per layer."""
    projection: bool = False
    """Reparameterize the prefix as MLP(embedding) during training (Li & Liang); saved as its output."""
    encoder_hidden_size: int = 64
    """Hidden width of the projection MLP."""

    def __post_init__(self):
        _check_tokens("PrefixTuningConfig", self.num_virtual_tokens)
        _check_width("PrefixTuningConfig", self.encoder_hidden_size)


@dataclass(kw_only=True, slots=True)
class AdapterConfig:
    bottleneck: int = 16
    """R, the adapter's bottleneck width (>= 1)."""
    form: AdapterForm = "series"
    """``series``: Houlsby adapters after the attention output and after the FFN output;
    ``parallel``: He et al., one adapter beside each FFN, fed the FFN's input."""
    activation: Activation = "relu"
    """Nonlinearity between down and up projections."""
    scale: float = 1.0
    """s in ``h + s·up(act(down(h)))``."""
    layer_norm: bool = False
    """Apply a LayerNorm to the adapter input (the ``LN?`` of the op)."""
    target_modules: ModuleSpec = None
    """Sublayers to wrap (same forms as LoraConfig.target_modules). None: the per-architecture default
    (attention output and FFN output projections)."""
    exclude_modules: ModuleSpec = None
    """Modules to skip (same forms as target_modules)."""

    def __post_init__(self):
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"AdapterConfig: bottleneck must be a positive int, got {self.bottleneck!r}")
        _check_choice("AdapterConfig", "form", self.form, get_args(AdapterForm))
        self.target_modules = normalize_spec("AdapterConfig", "target_modules", self.target_modules)
        self.exclude_modules = normalize_spec("AdapterConfig", "exclude_modules", self.exclude_modules)
