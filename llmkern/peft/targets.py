"""Which modules a config selects, and how a selected module is swapped in place.

Selection follows PEFT's rules (read from peft 0.21's ``check_target_module_exists``): a collection
of names matches a module path equal to a name or ending with ``.name``; a string is a regex that
must ``re.fullmatch`` the path; ``layers_to_transform`` keeps only modules under the listed layer
indices. Unlike PEFT, a listed name that matches no module is an error, whatever the collection type.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection

from torch import nn

__all__ = ["ModuleSpec", "as_linear", "is_linear_like", "layer_index", "matches", "normalize_spec",
           "output_head_names", "select_modules", "set_submodule"]

ModuleSpec = list[str] | str | None
"""A module selection: a list of names, a regex, or None (the caller's default)."""


def normalize_spec(owner: str, field: str, spec) -> ModuleSpec:
    """The spec with any collection of names (list, tuple, set, frozenset, dict keys) as a list.

    A set has no order, so it is sorted: two runs select, and report, the same modules in the same
    order. Anything else (a bytes object, a number, a list holding a non-string) is a TypeError."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Collection) and not isinstance(spec, (bytes, bytearray)):
        names = sorted(spec) if isinstance(spec, (set, frozenset)) else list(spec)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"{owner}: {field} must hold module names (str); got {bad!r}")
        return names
    raise TypeError(f"{owner}: {field} must be a collection of module names, a regex string or None; "
                    f"got {type(spec).__name__}")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers absent: no Conv1D to support
        return None


def is_linear_like(m: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: a Linear with a transposed weight)."""
    conv1d = _conv1d_type()
    return isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))


def matches(name: str, spec: ModuleSpec) -> bool:
    """A list matches a path equal to an entry or ending with ``.entry``; a string is a regex
    (``re.fullmatch``). ``"all-linear"`` is handled by the caller."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_index(name: str, layers_pattern: list[str] | None) -> int | None:
    """The transformer-block index in a module path: the first ``<pattern>.<digits>.`` segment
    (any segment when no pattern is given), PEFT's rule; None when the path has none."""
    if not layers_pattern:
        # Lazy: the first numbered segment is the block ("layers.1.experts.0" is block 1, not expert 0).
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m is not None else None


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


def select_modules(model: nn.Module, target: ModuleSpec, exclude: ModuleSpec, method: str, *,
                   accept: Callable[[nn.Module], bool] = is_linear_like,
                   kind: str = "nn.Linear or transformers Conv1D", layers: Collection[int] | None = None,
                   layers_pattern: list[str] | None = None,
                   protected: Collection[str] = ()) -> tuple[list[str], dict[str, str]]:
    """(selected paths, skipped path -> reason). Reads the model, changes nothing.

    ``layers``: keep only modules whose block index (see :func:`layer_index`) is listed.
    ``protected``: paths (and everything under them) that must not be selected, e.g. modules_to_save.
    Raises when a listed target names no module, or when nothing at all is selected: a config that
    silently applies to nothing is the failure we refuse."""
    target = normalize_spec(method, "target_modules", target)
    exclude = normalize_spec(method, "exclude_modules", exclude)
    heads = output_head_names(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(target, list):
        for t in target:
            if not any(matches(n, [t]) for n, _ in named):
                leaves = sorted({n.split(".")[-1] for n, m in named if accept(m)})
                raise ValueError(f"{method}: target module {t!r} matches no module of {type(model).__name__}; "
                                 f"candidate {kind} names are {leaves}")
    selected, skipped = [], {}
    for n, m in named:
        if any(n.startswith(s + ".") for s in selected):
            continue
        if target == "all-linear":
            if not accept(m):
                continue
            if n in heads:
                skipped[n] = "output head (all-linear leaves it alone)"
                continue
        elif not matches(n, target):
            continue
        if not accept(m):
            skipped[n] = f"{type(m).__name__} is not a {kind}"
        elif exclude is not None and matches(n, exclude):
            skipped[n] = "excluded by exclude_modules"
        elif any(n == p or n.startswith(p + ".") for p in protected):
            skipped[n] = "inside a module of modules_to_save"
        elif layers is not None and layer_index(n, layers_pattern) not in layers:
            skipped[n] = f"block {layer_index(n, layers_pattern)} is not in layers_to_transform"
        else:
            selected.append(n)
    if not selected:
        raise ValueError(f"{method}: target_modules={target!r} selected no module of {type(model).__name__} "
                         f"(skipped: {skipped or 'none matched'})")
    return selected, skipped


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts `new` at path `name` (the root when `name` is empty is not allowed)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def as_linear(m: nn.Module) -> tuple[nn.Linear, bool]:
    """(the module as an nn.Linear, whether it was a Conv1D). A Conv1D (weight (C_in, C_out)) gets a
    new Linear holding a transposed copy of its weight and sharing its bias; the model is not touched."""
    if isinstance(m, nn.Linear):
        return m, False
    c_in, c_out = m.weight.shape
    lin = nn.Linear(c_in, c_out, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False)
    lin.bias = m.bias
    return lin, True
