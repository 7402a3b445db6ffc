"""The Liger-Kernel adapters of the fused-op benches (bench/ops/_liger.py) against llmkern's fp64 oracles.

The adapters map llmkern's op signatures onto liger_kernel.transformers.functional (0.8.5): argument
order (the gate first), layouts ((B, H, S, D) q/k with (B, S, D) cos/sin, (..., V) logits flattened),
RMSNorm's offset and casting mode per convention, the cross-entropy options (ignore_index, label
smoothing, z-loss as lse_square_scale, reductions). A wrong mapping gives a wrong value, which these
tests catch on CPU tensors: Liger's Triton kernels run in the Triton interpreter once three gaps of
the interpreter (triton 3.8) are bridged, for this module only (tests/bench/liger_interpreter.py says
which and how). Every Liger output and
gradient here is held to the 2x/3x rule against the fp64 oracle (llmkern.testing.assert_close_to_ref),
with plain PyTorch (the ``_ref`` op) in the same dtype as the baseline. Liger writes over some inputs
(bench/ops/_liger.py), so every call gets fresh copies. Shapes are tiny: an interpreted launch costs
0.1-1 s per program on the shared machine. On a GPU the same checks run compiled (``cuda`` marker).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from llmkern.ops.cross_entropy import cross_entropy_ref
from llmkern.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_ref
from llmkern.ops.layer_norm import layer_norm_ref
from llmkern.ops.rms_norm import rms_norm_ref
from llmkern.ops.rope import rope_ref
from llmkern.ops.swiglu import geglu_ref, swiglu_ref
from llmkern.testing import assert_close_to_ref

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "ops"))
import _liger  # noqa: E402

import liger_kernel.transformers.functional  # noqa: E402,F401 (pinned in requirements.txt: missing is a failure, not a skip)
from liger_interpreter import bridge_interpreter  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def bridged():
    if not INTERPRET:
        pytest.skip("Triton kernels are compiled in this session (a GPU is present): the cuda cases cover them")
    with pytest.MonkeyPatch.context() as mp:
        replaced = bridge_interpreter(mp)
        # rms_norm and layer_norm use rsqrt, geglu tanh: if Liger stops importing them from libdevice the
        # bridge is no longer needed there, and this says so instead of patching nothing silently.
        assert {"liger_kernel.ops.rms_norm.rsqrt", "liger_kernel.ops.layer_norm.rsqrt",
                "liger_kernel.ops.geglu.tanh"} <= set(replaced), replaced
        yield "cpu"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def dev(request):
    """cpu: Liger in the bridged interpreter (skipped when a GPU compiles the kernels); cuda: compiled."""
    if request.param == "cpu":
        return request.getfixturevalue("bridged")
    return "cuda"


def rand(*shape, dtype=torch.float64, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def grads_of(fn, inputs, gys):
    """fn(*leaves) and the gradients of every input, for fixed output gradients ``gys``; the leaves are
    fresh copies (Liger writes over its inputs and grad outputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gs = torch.autograd.grad(outs, leaves, [g.clone() for g in gys])
    return [o.detach() for o in outs], list(gs)


def check(name, liger_fn, ref_fn, inputs64, gys64, dev, dtype):
    """Liger's outputs and gradients vs the oracle in fp64 and plain PyTorch (ref_fn) in ``dtype``."""
    cast = [t.to(dev, dtype) for t in inputs64]
    gys = [g.to(dev, dtype) for g in gys64]
    ours = grads_of(liger_fn, cast, gys)
    base = grads_of(ref_fn, cast, gys)
    ref = grads_of(ref_fn, [t.to(dev) for t in inputs64], [g.to(dev) for g in gys64])
    for i, (o, r, b) in enumerate(zip(ours[0], ref[0], base[0])):
        assert o.shape == r.shape, f"{name} output {i}: {tuple(o.shape)} vs {tuple(r.shape)}"
        assert_close_to_ref(o.to(b.dtype), r, b, name=f"{name} output {i}")
    for i, (o, r, b) in enumerate(zip(ours[1], ref[1], base[1])):
        assert_close_to_ref(o, r, b, grad=True, name=f"{name} grad of input {i}")


def test_the_two_pins_agree():
    """liger-kernel is pinned in requirements.txt (the tests) and requirements-bench.txt (`make bench`) at
    the version the adapters are written for, and that version is the one installed."""
    pins = {}
    for f in ("requirements.txt", "requirements-bench.txt"):
        found = re.findall(r"^liger-kernel==(\S+)\s*$", (ROOT / f).read_text(), flags=re.M)
        assert len(found) == 1, f"{f}: expected one liger-kernel==X line, found {found}"
        pins[f] = found[0]
    assert set(pins.values()) == {_liger.PIN}, pins
    assert _liger.version() == _liger.PIN


@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_rms_norm(dev, convention):
    """offset 0 / casting "llama" vs offset 1 / casting "gemma": in bf16 the two castings round differently,
    and the offset is the 1 + w of Gemma's weight."""
    x, w = rand(3, 37, scale=2, shift=0.3), rand(37, scale=0.2, shift=1.0 if convention == "llama" else 0.0, seed=1)
    check(f"rms_norm {convention}", lambda x, w: _liger.rms_norm(x, w, 1e-6, convention=convention),
          lambda x, w: rms_norm_ref(x, w, 1e-6, convention=convention), [x, w], [rand(3, 37, seed=2)], dev,
          torch.bfloat16)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_layer_norm(dev, bias):
    x, w, b = rand(3, 37, scale=2, shift=0.5), rand(37, scale=0.1, shift=1.0, seed=1), rand(37, scale=0.1, seed=2)
    inputs = [x, w, b] if bias else [x, w]
    check("layer_norm", lambda x, w, b=None: _liger.layer_norm(x, w, b, 1e-5),
          lambda x, w, b=None: layer_norm_ref(x, w, b, 1e-5), inputs, [rand(3, 37, seed=3)], dev, torch.float32)


def test_swiglu(dev):
    """silu(gate)·up, gate first: swapping the two gives another value."""
    check("swiglu", _liger.swiglu, swiglu_ref, [rand(3, 37), rand(3, 37, seed=1)], [rand(3, 37, seed=2)], dev,
          torch.float32)


def test_geglu(dev):
    check("geglu", _liger.geglu, lambda a, b: geglu_ref(a, b, "tanh"), [rand(3, 37), rand(3, 37, seed=1)],
          [rand(3, 37, seed=2)], dev, torch.float32)
    with pytest.raises(ValueError, match="tanh approximation only"):
        _liger.geglu(torch.zeros(1, 2), torch.zeros(1, 2), approximate="none")


def test_rope(dev):
    """q and k as LlamaAttention makes them (transposed views of (B, S, H·D)), Hk < Hq, cos/sin (B, S, D)
    from transformers' LlamaRotaryEmbedding, compared in bf16."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding

    b, s, hq, hk, d = 2, 5, 4, 2, 16
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk))(
        torch.zeros(1, dtype=torch.float64), torch.arange(s)[None].expand(b, s))
    cos, sin = cos.double(), sin.double()

    def as_heads(t, h):  # (B, S, H·D) -> the (B, H, S, D) transposed view
        return t.view(b, s, h, d).transpose(1, 2)

    def liger(q, k):
        return _liger.rope(as_heads(q, hq), as_heads(k, hk), cos.to(q), sin.to(q))

    def ref(q, k):
        return rope_ref(as_heads(q, hq), as_heads(k, hk), cos.to(q), sin.to(q))

    check("rope", liger, ref, [rand(b, s, hq * d), rand(b, s, hk * d, seed=1)],
          [rand(b, hq, s, d, seed=2), rand(b, hk, s, d, seed=3)], dev, torch.bfloat16)


@pytest.mark.parametrize("reduction,label_smoothing,z_loss", [("mean", 0.0, 0.0), ("none", 0.1, 1e-2)])
def test_cross_entropy(dev, reduction, label_smoothing, z_loss):
    """(B, T, V) logits flattened by the adapter; ignored labels; label smoothing and z-loss mapped."""
    labels = torch.tensor([[3, -100, 96, 0, 50], [-100, 7, 7, 1, 42]])
    gy = rand(2, 5, seed=1) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    check(f"cross_entropy {kw}", lambda x: _liger.cross_entropy(x, labels.to(x.device), **kw),
          lambda x: cross_entropy_ref(x, labels.to(x.device), **kw), [rand(2, 5, 97, scale=3)], [gy], dev,
          torch.float32)


def test_fused_linear_cross_entropy(dev):
    """(B, T, C) hidden flattened by the adapter, the head (V, C), ignored labels, mean over the rest."""
    labels = torch.tensor([[3, -100, 96, 0], [-100, 7, 7, 1]])
    check("fused_linear_cross_entropy", lambda h, w: _liger.fused_linear_cross_entropy(h, w, labels.to(h.device)),
          lambda h, w: fused_linear_cross_entropy_ref(h, w, labels.to(h.device)),
          [rand(2, 4, 24), rand(97, 24, scale=0.3, seed=1)], [torch.tensor(1.0, dtype=torch.float64)], dev,
          torch.float32)
