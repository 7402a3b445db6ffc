"""adapter_bottleneck's entry point (the formula, in fp64 on the reference) and the Adapter /
ParallelAdapter modules. The kernels themselves: tests/ops/test_adapter_bottleneck.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkern.nn import Adapter, ParallelAdapter
from llmkern.ops import adapter_bottleneck, adapter_bottleneck_ref
from llmkern.testing import assert_close_to_ref

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}


def _params(c, r, dtype=torch.float64, ln=False):
    p = [torch.randn(r, c, dtype=dtype) / c**0.5, torch.randn(r, dtype=dtype), torch.randn(c, r, dtype=dtype) / r**0.5,
         torch.randn(c, dtype=dtype)]
    lnp = [1 + 0.1 * torch.randn(c, dtype=dtype), 0.1 * torch.randn(c, dtype=dtype)] if ln else [None, None]
    return p, lnp


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("shape", [(3, 97, 123), (5, 33), (0, 17)])
def test_op_matches_formula(act, ln, shape):
    c, r = shape[-1], 7
    x = torch.randn(*shape, dtype=torch.float64)
    (dw, db, uw, ub), (lw, lb) = _params(c, r, ln=ln)
    h = F.layer_norm(x, (c,), lw, lb, 1e-5) if ln else x
    want = x + 0.5 * (ACTS[act](h @ dw.T + db) @ uw.T + ub)
    torch.testing.assert_close(adapter_bottleneck(x, dw, db, uw, ub, 0.5, act, lw, lb, backend="ref"), want)
    res = torch.randn_like(x)  # parallel form: the sublayer's output is the residual
    torch.testing.assert_close(adapter_bottleneck(x, dw, db, uw, ub, 0.5, act, lw, lb, residual=res, backend="ref"),
                               want - x + res)


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_op_gradcheck(act):
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    (dw, db, uw, ub), (lw, lb) = _params(6, 3, ln=True)
    args = [t.requires_grad_() for t in (dw, db, uw, ub, lw, lb)]
    assert torch.autograd.gradcheck(lambda *a: adapter_bottleneck(x, *a[:4], 0.7, act, a[4], a[5], backend="ref"),
                                    args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_low_precision_within_2x_of_torch(dtype):
    """The automatic backend (the fused CPU kernel here) within the 2x rule of PyTorch's own error."""
    x = torch.randn(4, 31, 64)
    (dw, db, uw, ub), _ = _params(64, 16, dtype=torch.float32)
    exact = adapter_bottleneck_ref(*(t.double() for t in (x, dw, db, uw, ub)), 1.0, "gelu")
    lo = [t.to(dtype) for t in (x, dw, db, uw, ub)]
    assert_close_to_ref(adapter_bottleneck(*lo, 1.0, "gelu"), exact, adapter_bottleneck_ref(*lo, 1.0, "gelu"))


def test_op_bad_input():
    x = torch.randn(2, 8)
    (dw, db, uw, ub), _ = _params(8, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"down_weight must be \(R, 8\)"):
        adapter_bottleneck(x, dw[:, :5], db, uw, ub)
    with pytest.raises(ValueError, match=r"up_weight must be \(C, R\) = \(8, 4\)"):
        adapter_bottleneck(x, dw, db, uw.T, ub)
    with pytest.raises(ValueError, match="activation must be one of"):
        adapter_bottleneck(x, dw, db, uw, ub, 1.0, "tanh")
    with pytest.raises(TypeError, match="same dtype"):
        adapter_bottleneck(x, dw.double(), db, uw, ub)
    with pytest.raises(ValueError, match="residual must have"):
        adapter_bottleneck(x, dw, db, uw, ub, residual=x[:1])


def test_modules():
    h = torch.randn(3, 10, 16)
    a = Adapter(16, 4, "relu", scale=2.0, layer_norm=True)
    torch.testing.assert_close(a(h), h)  # up = 0 at init
    torch.nn.init.normal_(a.up.weight)
    out = a(h)
    out.sum().backward()
    assert a.down.weight.grad is not None and a.up.weight.grad is not None and a.ln.weight.grad is not None
    a.disabled = True
    assert a(h) is h
    p = ParallelAdapter(16, 4, "silu")
    sub = torch.randn_like(h)
    torch.testing.assert_close(p(h, sub), sub)
    with pytest.raises(ValueError, match="bottleneck must be >= 1"):
        Adapter(16, 0)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        Adapter(16, 4, backend="gpu")


@pytest.mark.parametrize("cls", [Adapter, ParallelAdapter])
def test_module_backends_agree(cls):
    """The modules run the fused op (default: automatic, the CPU kernel here); output and every
    parameter gradient within the 2x/3x rule of the eager (``ref``) module, against fp64."""
    torch.manual_seed(0)
    mods = {"fused": cls(24, 6, "gelu", scale=0.5, layer_norm=True),
            "eager": cls(24, 6, "gelu", scale=0.5, layer_norm=True, backend="ref"),
            "fp64": cls(24, 6, "gelu", scale=0.5, layer_norm=True, backend="ref", dtype=torch.float64)}
    torch.nn.init.normal_(mods["fused"].up.weight)
    for m in ("eager", "fp64"):
        mods[m].load_state_dict(mods["fused"].state_dict())
    assert mods["fused"].backend is None and "backend=auto" in repr(mods["fused"])
    h = torch.randn(2, 9, 24)
    args = (h,) if cls is Adapter else (h, torch.randn_like(h))
    ys = {}
    for n, m in mods.items():
        ys[n] = m(*(a.double() if n == "fp64" else a for a in args))
        ys[n].square().sum().backward()
    assert_close_to_ref(ys["fused"], ys["fp64"].detach(), ys["eager"], name="y")
    for (n, pf), pe, pr in zip(mods["fused"].named_parameters(), mods["eager"].parameters(),
                               mods["fp64"].parameters()):
        assert_close_to_ref(pf.grad, pr.grad, pe.grad, grad=True, name=n)
