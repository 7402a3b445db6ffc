"""Liger-Kernel, the GPU peer of the fused-op benchmarks: adapters from llmkern's op signatures to
``liger_kernel.transformers.functional`` and the reason the peer is skipped where it cannot run.

The adapters are written against liger-kernel 0.8.5 (pinned in requirements-bench.txt, which `make
bench` installs into build/bench-deps, and in requirements.txt, so that the tests can run them under
the Triton interpreter). Its conventions, and what each adapter maps:

- ``liger_rms_norm(X, W, eps, offset, casting_mode, in_place)``: Llama is ``offset=0,
  casting_mode="llama"`` (the normalized x is cast to x's dtype, then times the weight), Gemma is
  ``offset=1, casting_mode="gemma"`` (everything in fp32, ``x̂·(1 + w)``, cast once), as llmkern's
  ``convention``. ``in_place=True`` (LigerRMSNorm's default) writes dX over the grad output.
- ``liger_layer_norm(X, W, B, eps)``: B is required; a LayerNorm without bias passes zeros.
- ``liger_swiglu(a, b)`` = silu(a)·b and ``liger_geglu(a, b)`` = gelu_tanh(a)·b: ``a`` is the gate. Liger
  has the tanh GELU only. Their backward writes da and db over the saved a and b.
- ``liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)``: q (B, Hq, S, D), k (B, Hk, S, D), cos/sin
  (1 or B, S, D) in HF's rotate_half layout; it rotates q and k in place (forward) and dq, dk in place
  (backward).
- ``liger_cross_entropy(input (N, V), target (N,), ..., ignore_index, reduction, label_smoothing,
  lse_square_scale)``: 2-D only; ``lse_square_scale`` is llmkern's ``z_loss`` (z·lse² per valid row).
  The forward writes the gradient over the logits and the loss has the logits' dtype (bf16 in, a bf16
  loss out).
- ``liger_fused_linear_cross_entropy(input (N, C), weight (V, C), target (N,), ...)``: the same loss
  options; it leaves its inputs alone.

Because several kernels write over their inputs or grad outputs, the benches give the liger candidate
its own copies of them, made once (bench/ops/_fused.py: fwd/fwd_bwd with ``private=True``): the timed
calls do no extra copy, and a GPU kernel's time does not depend on the values it reads.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

PIN = "0.8.5"
"""The liger-kernel version the adapters are written against (requirements-bench.txt and requirements.txt)."""

ROOT = Path(__file__).resolve().parents[2]


def bench_deps_path() -> Path:
    """Where `make bench` installs the benchmark-only peers: $LLMKERN_BENCH_DEPS, else build/bench-deps."""
    return Path(os.environ.get("LLMKERN_BENCH_DEPS") or ROOT / "build" / "bench-deps")


def _import():
    """liger_kernel.transformers.functional, found in the environment or else in bench_deps_path()
    (appended to sys.path, so that the environment's own packages stay the ones imported)."""
    try:
        import liger_kernel.transformers.functional as lf
        return lf
    except ModuleNotFoundError:
        extra = str(bench_deps_path())
        if extra not in sys.path and Path(extra, "liger_kernel").is_dir():
            sys.path.append(extra)
        import liger_kernel.transformers.functional as lf
        return lf


def version() -> str | None:
    """The importable liger-kernel's version, or None."""
    try:
        import liger_kernel
    except ImportError:
        return None
    path = [str(Path(liger_kernel.__file__).resolve().parents[1])]  # the site-packages or build/bench-deps it is in
    found = [d.version for d in metadata.distributions(name="liger-kernel", path=path)]
    return found[0] if found else None


def skip_reason(device: str) -> str | None:
    """Why the Liger peer cannot run on ``device``, or None when it can."""
    if device != "cuda":
        return (f"no CUDA device (--device {device}): Liger-Kernel's kernels are Triton GPU kernels; "
                f"run the bench with --device cuda on a GPU")
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    try:
        _import()
    except Exception as e:  # noqa: BLE001 - any import failure (missing, broken Triton) skips the peer
        return (f"liger_kernel not importable ({type(e).__name__}: {e}); `make bench` installs liger-kernel=={PIN} "
                f"(requirements-bench.txt) into build/bench-deps")
    found = version()
    if found != PIN:
        return (f"liger-kernel {found} is importable, but the adapters (bench/ops/_liger.py) are written for "
                f"liger-kernel=={PIN} (requirements-bench.txt)")
    return None


def rms_norm(x, weight, eps: float = 1e-6, *, convention: str = "llama", in_place: bool = True):
    """llmkern.ops.rms_norm(x, weight, eps, convention=...) (no residual) through liger_rms_norm."""
    offset, casting_mode = {"llama": (0.0, "llama"), "gemma": (1.0, "gemma")}[convention]
    return _import().liger_rms_norm(x, weight, eps, offset=offset, casting_mode=casting_mode, in_place=in_place)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """llmkern.ops.layer_norm(x, weight, bias, eps) through liger_layer_norm (zeros for a missing bias)."""
    import torch

    if bias is None:
        bias = torch.zeros_like(weight)
    return _import().liger_layer_norm(x, weight, bias, eps)


def swiglu(gate, up):
    """llmkern.ops.swiglu(gate, up) = silu(gate)·up through liger_swiglu."""
    return _import().liger_swiglu(gate, up)


def geglu(gate, up, approximate: str = "tanh"):
    """llmkern.ops.geglu(gate, up, "tanh") through liger_geglu; Liger has no exact-erf GEGLU."""
    if approximate != "tanh":
        raise ValueError(f"Liger-Kernel's geglu is the tanh approximation only; got approximate={approximate!r}")
    return _import().liger_geglu(gate, up)


def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """llmkern.ops.rope(q, k, cos, sin) (HF's apply_rotary_pos_emb) through liger_rope: q (B, Hq, S, D),
    k (B, Hk, S, D), cos/sin (1 or B, S, D)."""
    return _import().liger_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def cross_entropy(logits, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                  reduction: str = "mean"):
    """llmkern.ops.cross_entropy through liger_cross_entropy: logits (..., V) flattened to (N, V)."""
    out = _import().liger_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, lse_square_scale=z_loss)
    return out.reshape(labels.shape) if reduction == "none" else out


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, reduction: str = "mean"):
    """llmkern.ops.fused_linear_cross_entropy through liger_fused_linear_cross_entropy: hidden (..., C)
    flattened to (N, C), the head (V, C)."""
    out = _import().liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                                     ignore_index=ignore_index, lse_square_scale=z_loss,
                                                     label_smoothing=label_smoothing, reduction=reduction)
    return out.reshape(labels.shape) if reduction == "none" else out
