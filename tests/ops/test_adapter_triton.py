"""Triton adapter kernels (triton_kernels/adapter_bottleneck.py) vs fp64 PyTorch, under TRITON_INTERPRET=1.

Error rule (STYLE.md): the kernel's max error against an fp64 reference is at most 2× the error of
the same computation in plain PyTorch in the same dtype (3× for gradients). The reference is
llmkern.ops.adapter_bottleneck.adapter_bottleneck_ref under autograd, in fp64 (oracle) and in the
input dtype (PyTorch's error). Every dtype meets all four activations and all four (series |
parallel) × (LN | no LN) forms; odd shapes (T = 97, 1, 0; C = 100, 1025; R = 1, 7, 64, 200), strided
weights, the 16-aligned variants (C = 128) and bad input (through the dispatcher ops
llmkern_triton::adapter_bottleneck and its backward, which check what the C++ ops check) are
covered separately. The launchers take the activation as its code, 1 + its index in ACTIVATIONS.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit (decoration reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from llmkern.ops.adapter_bottleneck import ACTIVATIONS, UNAVAILABLE, adapter_bottleneck_ref  # noqa: E402
from llmkern.testing import assert_close_to_ref  # noqa: E402
from llmkern.triton_kernels import adapter_bottleneck as K  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = list(ACTIVATIONS)
EPS, SCALE = 1e-5, 0.7
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "ln_weight", "ln_bias")


def _rand(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)


def _inputs(t, c, r, dtype, *, ln, parallel, ln_bias=True, biases=True, strided=False):
    """Parameters scaled so that z and the output are O(1); strided: weights as transposed views."""
    p = dict(x=_rand(t, c, dtype=dtype, shift=0.5),
             down_weight=_rand(c, r, dtype=dtype, scale=c**-0.5).t() if strided else
             _rand(r, c, dtype=dtype, scale=c**-0.5),
             down_bias=_rand(r, dtype=dtype, scale=0.1) if biases else None,
             up_weight=_rand(r, c, dtype=dtype, scale=r**-0.5).t() if strided else
             _rand(c, r, dtype=dtype, scale=r**-0.5),
             up_bias=_rand(c, dtype=dtype, scale=0.1) if biases else None,
             ln_weight=_rand(c, dtype=dtype, scale=0.1, shift=1.0) if ln else None,
             ln_bias=_rand(c, dtype=dtype, scale=0.1) if ln and ln_bias else None)
    residual = _rand(t, c, dtype=dtype) if parallel else None
    return p, residual


def _torch(p, residual, grad_out, activation, dtype):
    """(out, z, mean, rstd, grads by name) of adapter_bottleneck_ref under autograd in `dtype`.

    An absent bias is a zero leaf here, so its gradient is what the kernels return for it (they
    always compute grad_down_bias, grad_up_bias and, with LN, grad_ln_bias); adding 0 is exact.
    """
    c, r = p["up_weight"].shape
    zeros = {"down_bias": r, "up_bias": c, "ln_bias": c if p["ln_weight"] is not None else None}
    leaves = {}
    for k, v in p.items():
        if v is None and zeros.get(k) is not None:
            v = torch.zeros(zeros[k], device=DEVICE)
        leaves[k] = None if v is None else v.detach().to(dtype).requires_grad_()
    res = None if residual is None else residual.to(dtype)
    out = adapter_bottleneck_ref(**leaves, scale=SCALE, activation=activation, eps=EPS, residual=res)
    x = leaves["x"].detach()
    xs = x if dtype == torch.float64 else x.float()  # PyTorch keeps LayerNorm statistics in fp32
    mean, rstd = xs.mean(-1), torch.rsqrt(xs.var(-1, unbiased=False) + EPS)
    h = x if p["ln_weight"] is None else \
        torch.nn.functional.layer_norm(x, (x.shape[-1],), leaves["ln_weight"], leaves["ln_bias"], EPS)
    z = torch.nn.functional.linear(h, leaves["down_weight"], leaves["down_bias"]).detach()
    live = {k: v for k, v in leaves.items() if v is not None}
    grads = dict(zip(live, torch.autograd.grad(out, list(live.values()), grad_out.to(dtype))))
    return out.detach(), z, mean, rstd, grads


def _code(activation):
    return ACTIVATIONS.index(activation) + 1


def _run(p, residual, grad_out, activation):
    x, dw, db, uw, ub, lw, lb = (p[k] for k in NAMES)
    act = _code(activation)
    out, z, mean, rstd = K.adapter_bottleneck_fwd(x, dw, db, uw, ub, SCALE, act, lw, lb, EPS, residual)
    grads = K.adapter_bottleneck_bwd(grad_out, x, dw, db, uw, SCALE, act, lw, lb, z, mean, rstd, residual is None)
    return out, z, mean, rstd, grads


def _check(t, c, r, dtype, activation, *, ln, parallel, **kw):
    p, residual = _inputs(t, c, r, dtype, ln=ln, parallel=parallel, **kw)
    grad_out = _rand(t, c, dtype=dtype)
    out, z, mean, rstd, got = _run(p, residual, grad_out, activation)
    assert out.dtype == dtype and out.shape == (t, c)
    assert z.dtype == mean.dtype == rstd.dtype == torch.float32 and z.shape == (t, r)
    assert mean.shape == rstd.shape == ((t,) if ln else (0,))
    shapes = dict(x=(t, c), down_weight=(r, c), down_bias=(r,), up_weight=(c, r), up_bias=(c,),
                  ln_weight=(c,) if ln else (0,), ln_bias=(c,) if ln else (0,))
    for g, name in zip(got, NAMES):
        assert g.dtype == dtype and tuple(g.shape) == shapes[name] and g.is_contiguous(), \
            (name, g.dtype, g.shape)

    ref = _torch(p, residual, grad_out, activation, torch.float64)
    base = _torch(p, residual, grad_out, activation, dtype)
    assert_close_to_ref(out, ref[0], base[0], name="out")
    assert_close_to_ref(z, ref[1], base[1], name="z")
    if ln:
        assert_close_to_ref(mean, ref[2], base[2], name="mean")
        assert_close_to_ref(rstd, ref[3], base[3], name="rstd")
    for g, name in zip(got, NAMES):
        if name in ref[4]:
            assert_close_to_ref(g, ref[4][name], base[4][name], grad=True, name=f"grad_{name}")


# ---------------------------------------------------------------------------------------- fwd + bwd
# Every dtype × activation; activation i takes form i of (series, no LN), (parallel, LN),
# (series, LN), (parallel, no LN), so each dtype meets every form.
FORMS = [(False, False), (True, True), (True, False), (False, True)]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fwd_bwd(dtype, activation):
    ln, parallel = FORMS[ACTS.index(activation)]
    _check(97, 100, 7, dtype, activation, ln=ln, parallel=parallel)


# Odd and edge shapes: C = 1025 (33 channel tiles, T split in wgrad), R = 1 and 64, R = 200 (BLOCK_R
# 256, several rank chunks in up/ln_bwd), T = 1, C = 128 with 16-aligned pointers (the 64-wide
# variants), LN without bias, no biases at all, strided weight views.
SHAPES = [
    (torch.bfloat16, 97, 1025, 64, "gelu", dict(ln=True, parallel=False)),
    (torch.float32, 97, 1025, 1, "silu", dict(ln=True, parallel=True)),
    (torch.float16, 1, 100, 64, "gelu_tanh", dict(ln=False, parallel=False)),
    (torch.float32, 40, 100, 200, "relu", dict(ln=True, parallel=False)),
    (torch.bfloat16, 97, 128, 16, "silu", dict(ln=True, parallel=True)),
    (torch.float16, 97, 128, 7, "gelu", dict(ln=False, parallel=False, biases=False)),
    (torch.bfloat16, 97, 100, 7, "relu", dict(ln=True, parallel=False, ln_bias=False, biases=False)),
    (torch.float32, 97, 100, 7, "gelu", dict(ln=True, parallel=True, strided=True)),
    (torch.float16, 97, 100, 7, "silu", dict(ln=False, parallel=True, strided=True)),
]


@pytest.mark.parametrize("dtype,t,c,r,activation,kw", SHAPES,
                         ids=[f"{str(d)[6:]}-{t}x{c}-r{r}-{a}-" + "-".join(k for k, v in kw.items() if v)
                              for d, t, c, r, a, kw in SHAPES])
def test_shapes(dtype, t, c, r, activation, kw):
    _check(t, c, r, dtype, activation, **kw)


def test_wgrad_split_is_deterministic():
    """T = 300 splits the weight-gradient rows over 10 programs (fp32 partials summed by torch):
    two runs agree bit for bit."""
    p, _ = _inputs(300, 100, 16, torch.bfloat16, ln=True, parallel=False)
    grad_out = _rand(300, 100, dtype=torch.bfloat16)
    first = _run(p, None, grad_out, "gelu")[4]
    for a, b in zip(first, _run(p, None, grad_out, "gelu")[4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ln", [False, True], ids=["no_ln", "ln"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_t(dtype, ln):
    p, residual = _inputs(0, 100, 7, dtype, ln=ln, parallel=True)
    grad_out = _rand(0, 100, dtype=dtype)
    out, z, mean, rstd, grads = _run(p, residual, grad_out, "silu")
    assert out.shape == (0, 100) and z.shape == (0, 7) and mean.shape == rstd.shape == ((0,) if ln else (0,))
    assert [tuple(g.shape) for g in grads] == [(0, 100), (7, 100), (7,), (100, 7), (100,)] + \
        [(100,) if ln else (0,)] * 2
    assert all(g.dtype == dtype and not g.any() for g in grads)


# ------------------------------------------------------------------------------------- activations
@triton.jit
def _act_kernel(z_ptr, a_ptr, g_ptr, n, act, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    z = tl.load(z_ptr + offs, mask=offs < n, other=0.0)
    tl.store(a_ptr + offs, K._adapter_bottleneck_act(z, act), mask=offs < n)
    tl.store(g_ptr + offs, K._adapter_bottleneck_act_grad(z, act), mask=offs < n)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, at z = ±100
@pytest.mark.parametrize("activation", ACTS)
def test_activation_and_derivative(activation):
    """act and act' in fp32 over [-12, 12] plus ±30, ±100 (exp overflow in sigmoid) against fp64
    torch; PyTorch's error is its own fp32 F.<act> and autograd."""
    z = torch.cat([torch.linspace(-12, 12, 1001), torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])]).to(DEVICE)
    a, g = torch.empty_like(z), torch.empty_like(z)
    _act_kernel[(1,)](z, a, g, z.numel(), _code(activation), BLOCK=triton.next_power_of_2(z.numel()))
    from llmkern.ops.adapter_bottleneck import _act

    def torch_act(dt):
        zz = z.to(dt).requires_grad_()
        out = _act(zz, activation)
        return out.detach(), torch.autograd.grad(out.sum(), zz)[0]

    (ra, rg), (ba, bg) = torch_act(torch.float64), torch_act(torch.float32)
    assert_close_to_ref(a, ra, ba, name=activation)
    assert_close_to_ref(g, rg, bg, grad=True, name=f"{activation}'")
    assert g[z == 0.0].item() == (0.0 if activation == "relu" else 0.5)  # relu'(0) = 0, as torch


# ------------------------------------------------------------------------------------------ checks
@pytest.mark.skipif("triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", ""))
def test_input_checks():
    """The dispatcher ops check what csrc/ops/adapter_bottleneck.h checks, before any launch."""
    t, c, r = 8, 32, 4
    p, _ = _inputs(t, c, r, torch.float32, ln=True, parallel=False)
    names = ["x", "down_weight", "down_bias", "up_weight", "up_bias", "scale", "activation", "ln_weight",
             "ln_bias", "eps", "residual"]
    args = [p["x"], p["down_weight"], p["down_bias"], p["up_weight"], p["up_bias"], SCALE, "relu",
            p["ln_weight"], p["ln_bias"], EPS, None]

    def fwd(**over):
        a = list(args)
        for k, v in over.items():
            a[names.index(k)] = v
        return torch.ops.llmkern_triton.adapter_bottleneck(*a)

    bad = [
        (dict(x=p["x"][None]), r"x must be \(T, C\) here"),
        (dict(down_weight=p["down_weight"][:, :16]), r"down_weight must be \(R, 32\)"),
        (dict(up_weight=p["up_weight"][:, :2]), r"up_weight must be \(C, R\) = \(32, 4\)"),
        (dict(up_weight=p["up_weight"].half()), r"x and up_weight must have the same dtype"),
        (dict(down_bias=torch.randn(5)), r"down_bias must be \(4,\)"),
        (dict(ln_weight=p["ln_weight"].bfloat16()), r"x and ln_weight must have the same dtype"),
        (dict(ln_weight=None), r"ln_bias is given without ln_weight"),
        (dict(residual=torch.randn(t, c + 1)), r"residual must have x's shape \(8, 32\)"),
        (dict(activation="tanh"), r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'silu'\)"),
        (dict(x=torch.randn(t, 0), down_weight=torch.randn(r, 0), up_weight=torch.randn(0, r), down_bias=None,
              up_bias=None, ln_weight=None, ln_bias=None), r"C >= 1"),
        # what only the Triton kernels limit
        (dict(down_weight=torch.randn(257, c), up_weight=torch.randn(c, 257), down_bias=None),
         r"rank R=257 is outside \[1, 256\]"),
        ({k: v.double() for k, v in p.items() if v is not None}, r"x must be contiguous fp32, fp16 or bf16"),
    ]
    for over, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            fwd(**over)

    out, z, mean, rstd = fwd(x=p["x"].t().contiguous().t())  # strided rows are made contiguous
    g = torch.randn(t, c, device=DEVICE)
    bwd_args = [g, p["x"], p["down_weight"], p["down_bias"], p["up_weight"], SCALE, "relu", p["ln_weight"],
                p["ln_bias"], z, mean, rstd, True]
    for i, v, msg in [(0, g.half(), r"grad_out has shape \(8, 32\), dtype torch.float16"),
                      (9, z.half(), r"z has shape \(8, 4\), dtype torch.float16 on cpu; expected \(8, 4\), "
                                    r"torch.float32"),
                      (9, z[:, :2], r"z has shape \(8, 2\)"),
                      (10, mean[:0], r"mean has shape \(0,\)"),
                      (11, rstd[:0], r"rstd has shape \(0,\)"),
                      (6, "tanh", r"activation must be one of")]:
        a = list(bwd_args)
        a[i] = v
        with pytest.raises(ValueError, match=msg):
            torch.ops.llmkern_triton._adapter_bottleneck_backward(*a)


def test_launcher_limits():
    """What the launchers check themselves: the kernels' own limits, whoever calls them."""
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"activation code must be in \[1, 4\], got 5"):
        K.adapter_bottleneck_fwd(x, torch.randn(2, 16), None, torch.randn(16, 2), None, 1.0, 5, None, None, EPS, None)
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        K.adapter_bottleneck_fwd(x.t().contiguous().t(), torch.randn(2, 16), None, torch.randn(16, 2), None, 1.0, 1,
                                 None, None, EPS, None)


# -------------------------------------------------------------------------------------- AOT configs
def test_aot_configs_cover_launcher_choices():
    """Every variant a launcher can pick (any R in 1..256, LN or not, aligned or not) is in AOT_CONFIGS,
    so tests/static/test_triton_aot.py compiles it for sm_80 and sm_90."""
    shipped = {(c.kernel.__name__, c.name) for c in K.AOT_CONFIGS}
    for kernel in K._KERNEL_FNS:
        for dtype in DTYPES:
            for r in range(1, K._MAX_R + 1):
                for aligned in (False, True):
                    for has_ln in (False, True):
                        c = K._aot_config(kernel, dtype, r, aligned, has_ln)
                        assert (c.kernel.__name__, c.name) in shipped, c.name


@pytest.mark.parametrize("ln", [False, True], ids=["no_ln", "ln"])
def test_outputs_own_their_storage(ln):
    """No output shares storage with another or with an input (what a registered op must guarantee);
    fp32 is the dtype where a .to(dtype) of an fp32 partial would be a view."""
    p, _ = _inputs(5, 40, 3, torch.float32, ln=ln, parallel=False)
    outs = _run(p, None, _rand(5, 40, dtype=torch.float32), "relu")
    tensors = [*outs[:4], *outs[4]] + [v for v in p.values() if v is not None]
    ptrs = [t.untyped_storage().data_ptr() for t in tensors if t.numel()]
    assert len(ptrs) == len(set(ptrs))
