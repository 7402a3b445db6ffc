"""Which modules a config's ``target_modules`` / ``exclude_modules`` select."""
from __future__ import annotations

import re

from torch import nn

__all__ = ["matches", "is_linear_like", "output_head_names"]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers absent: no Conv1D to support
        return None


def is_linear_like(m: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: a Linear with a transposed weight)."""
    conv1d = _conv1d_type()
    return isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))


def matches(name: str, spec: list[str] | str | None) -> bool:
    """A list matches a path equal to an entry or ending with ``.entry``; a string is a regex
    (``re.fullmatch``). ``"all-linear"`` is handled by the caller."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the LM / classifier output head, which ``"all-linear"`` leaves alone."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, m in model.named_modules():
        if out is not None and m is out:
            heads.add(name)
        elif name.split(".")[-1] in {"lm_head", "score", "classifier", "qa_outputs"}:
            heads.add(name)
    return heads
