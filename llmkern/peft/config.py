"""Configs for the injection API: ``kw_only``, ``slots`` dataclasses, one docstring per field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmkern.ops.adapter_bottleneck import Activation

__all__ = ["LoraConfig", "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "AdapterConfig"]


def _check_tokens(name: str, k: int) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"{name}: num_virtual_tokens must be a positive int, got {k!r}")


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    r: int = 8
    """LoRA rank R (>= 1)."""
    alpha: float = 16.0
    """Scale numerator: s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter input, in [0, 1). Its mask is regenerated in backward, never stored."""
    target_modules: list[str] | str = "all-linear"
    """Module names (a module matches if its path equals a name or ends with ``.name``), a regex
    (``re.fullmatch`` on the path), or ``"all-linear"`` (every nn.Linear / GPT-2 Conv1D except the LM head)."""
    exclude_modules: list[str] | str | None = None
    """Same forms as ``target_modules``; matching modules are skipped (and reported as such)."""
    use_rslora: bool = False
    """Rank-stabilised scale alpha / sqrt(r)."""
    backend: str | None = None
    """Backend of ``llmkern.ops.lora_linear`` (None: chosen from device and dtype)."""

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout}")


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


@dataclass(kw_only=True, slots=True)
class AdapterConfig:
    bottleneck: int = 16
    """R, the adapter's bottleneck width (>= 1)."""
    form: Literal["series", "parallel"] = "series"
    """``series``: Houlsby adapters after the attention output and after the FFN output;
    ``parallel``: He et al., one adapter beside each FFN, fed the FFN's input."""
    activation: Activation = "relu"
    """Nonlinearity between down and up projections."""
    scale: float = 1.0
    """s in ``h + s·up(act(down(h)))``."""
    layer_norm: bool = False
    """Apply a LayerNorm to the adapter input (the ``LN?`` of the op)."""
    target_modules: list[str] | str | None = None
    """Sublayers to wrap (same forms as LoraConfig.target_modules). None: the per-architecture default
    (attention output and FFN output projections)."""
    exclude_modules: list[str] | str | None = None
    """Modules to skip."""

    def __post_init__(self):
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"AdapterConfig: bottleneck must be a positive int, got {self.bottleneck!r}")
