"""Triton LoRA kernels (triton_kernels/lora_linear.py) against fp64 PyTorch, under TRITON_INTERPRET=1.

Error rule (STYLE.md): the kernel's max error against an fp64 reference is at most 2× the error of
the same computation in plain PyTorch in the same dtype (3× for gradients). Shapes are odd (97,
123, 1025) and every launcher runs with N = 0 and N = 1. The dropout mask is checked bit for bit
against llmkern._rng.dropout_keep_mask, across a 2^32 counter boundary.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit (decoration reads it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from llmkern._rng import dropout_key, dropout_keep_mask, dropout_threshold  # noqa: E402
from llmkern.triton_kernels import lora_linear as K  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# tests/conftest.py turns the interpreter on (no GPU) and patches its bf16 tl.dot (triton#11584).
from llmkern.testing import assert_close_to_ref  # noqa: E402


def _drop(x, seed, offset, p):
    """Reference dropout in x's dtype (p = 0: identity)."""
    if p == 0:
        return x
    keep = dropout_keep_mask(seed, offset, p, x.shape[0], x.shape[1], device=x.device)
    return x * keep.to(x.dtype) / (1 - p)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


SEED, OFFSET = 1234567, 2**32 - 5000  # the counters of a 97×123 view cross the 2^32 boundary


# ---------------------------------------------------------------------------------------- RNG mask
@triton.jit
def _mask_kernel(out_ptr, key, threshold, offset, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_lo, row_hi = K._lora_linear_row_counter(offset, rows.to(tl.int64) * COLS)
    keep = K._lora_linear_keep(row_lo[:, None], row_hi[:, None], cols[None, :], key, threshold)
    tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], keep.to(tl.int8))


# OFFSET = 2^32 - 5000: row 39 of a (64, 128) view wraps the low word at column 8 (the carry path).
@pytest.mark.parametrize("seed,offset,p", [(0, 0, 0.1), (SEED, OFFSET, 0.5), (-1, 3 * 2**33 + 7, 0.9),
                                           (2**63 - 1, 2**40 - 1000, 0.999)])
def test_keep_mask_bit_exact(seed, offset, p):
    rows, cols = 64, 128
    _, _, key, threshold = K._dropout_args(p, seed, 1.0)
    out = torch.empty(rows, cols, dtype=torch.int8, device=DEVICE)
    _mask_kernel[(1,)](out, key, threshold, offset, ROWS=rows, COLS=cols)
    assert torch.equal(out.bool(), dropout_keep_mask(seed, offset, p, rows, cols, device=DEVICE))
    assert key & 0xFFFFFFFF == dropout_key(seed) and threshold == dropout_threshold(p)


def test_launchers_mask_layout():
    """Each launcher applies mask element (n, k) with counter offset + n·K + k (p=0.5: 1/(1-p)=2 exactly)."""
    n, k, p = 97, 100, 0.5
    keep = dropout_keep_mask(SEED, OFFSET, p, n, k, device=DEVICE).float()
    eye = torch.eye(k, device=DEVICE)
    u = K.lora_down(torch.ones(n, k, device=DEVICE), eye, scale=0.5, dropout_p=p, seed=SEED, offset=OFFSET)
    assert torch.equal(u, keep)
    out = torch.zeros(n, k, device=DEVICE)
    K.lora_up_add_(out, torch.ones(n, 1, device=DEVICE), torch.ones(k, 1, device=DEVICE), alpha=0.5,
                   dropout_p=p, seed=SEED, offset=OFFSET)
    assert torch.equal(out, keep)
    g = K.lora_wgrad(torch.eye(n, device=DEVICE), torch.ones(n, k, device=DEVICE), alpha=0.5, dropout_p=p,
                     seed=SEED, offset=OFFSET)
    assert torch.equal(g, keep)


# ------------------------------------------------------------------------------------------ launchers
# N=97 × K=123 for every R and p; N=1; 16-aligned rows with R=128 (the 64-wide tiles); one K=1025 case in
# bf16 only (the interpreter takes ~4 s per dtype for it).
CASES = [(d, n, k, r, p) for d in DTYPES
         for n, k, r, p in [(97, 123, r, p) for r in (1, 8, 16, 64) for p in (0.0, 0.1)]
         + [(1, 123, 8, 0.1), (97, 256, 128, 0.1)]]
CASES += [(torch.bfloat16, 97, 1025, 64, 0.1)]
CASE_IDS = [f"{str(d)[6:]}-{n}x{k}-r{r}-p{p}" for d, n, k, r, p in CASES]


@pytest.mark.parametrize("dtype,n,k,r,p", CASES, ids=CASE_IDS)
def test_lora_down(n, k, r, p, dtype):
    x, m = _rand(n, k, dtype=dtype), _rand(r, k, dtype=dtype, scale=k**-0.5)
    u = K.lora_down(x, m, scale=0.7, dropout_p=p, seed=SEED, offset=OFFSET)
    assert u.dtype == torch.float32 and u.shape == (n, r)
    ref = 0.7 * _drop(x.double(), SEED, OFFSET, p) @ m.double().T
    # The condition (sum |terms|: the oracle on |inputs|), used where the result is few draws (tolerances.py).
    cond = 0.7 * _drop(x.double().abs(), SEED, OFFSET, p) @ m.double().abs().T
    assert_close_to_ref(u, ref, 0.7 * _drop(x, SEED, OFFSET, p) @ m.T, cond=cond)


@pytest.mark.parametrize("dtype,n,c,r,p", CASES, ids=CASE_IDS)
def test_lora_up_add(n, c, r, p, dtype):
    out, u = _rand(n, c, dtype=dtype), torch.randn(n, r, device=DEVICE)
    m = _rand(r, c, dtype=dtype, scale=r**-0.5).t()  # strided (C, R), as the backward passes A.t()
    ref = out.double() + 0.3 * _drop(u.double() @ m.double().T, SEED, OFFSET, p)
    cond = out.double().abs() + 0.3 * _drop(u.double().abs() @ m.double().abs().T, SEED, OFFSET, p)
    baseline = out + 0.3 * _drop(u.to(dtype) @ m.T, SEED, OFFSET, p)
    got = K.lora_up_add_(out, u, m, alpha=0.3, dropout_p=p, seed=SEED, offset=OFFSET)
    assert got is out and out.dtype == dtype
    assert_close_to_ref(out, ref, baseline, cond=cond)


@pytest.mark.parametrize("dtype,n,k,r,p", CASES, ids=CASE_IDS)
def test_lora_wgrad(n, k, r, p, dtype):
    u, x = torch.randn(n, r, device=DEVICE), _rand(n, k, dtype=dtype)
    g = K.lora_wgrad(u, x, alpha=0.9, dropout_p=p, seed=SEED, offset=OFFSET)
    assert g.dtype == torch.float32 and g.shape == (r, k)
    ref = 0.9 * u.double().T @ _drop(x.double(), SEED, OFFSET, p)
    cond = 0.9 * u.double().abs().T @ _drop(x.double().abs(), SEED, OFFSET, p)
    assert_close_to_ref(g, ref, 0.9 * u.to(dtype).T @ _drop(x, SEED, OFFSET, p), grad=True, cond=cond)


def test_wgrad_split_is_deterministic():
    """N = 300 → 10 row tiles of 32, split across programs; two runs agree bit for bit."""
    u, x = torch.randn(300, 16, device=DEVICE), _rand(300, 97, dtype=torch.bfloat16)
    g1 = K.lora_wgrad(u, x, dropout_p=0.1, seed=3)
    assert torch.equal(g1, K.lora_wgrad(u, x, dropout_p=0.1, seed=3))
    ref = u.double().T @ _drop(x.double(), 3, 0, 0.1)
    assert_close_to_ref(g1, ref, u.bfloat16().T @ _drop(x, 3, 0, 0.1), grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_n(dtype):
    x = torch.empty(0, 123, dtype=dtype, device=DEVICE)
    u = K.lora_down(x, _rand(8, 123, dtype=dtype), dropout_p=0.1)
    assert u.shape == (0, 8) and u.dtype == torch.float32
    out = torch.empty(0, 97, dtype=dtype, device=DEVICE)
    assert K.lora_up_add_(out, u, _rand(97, 8, dtype=dtype), alpha=2.0) is out
    g = K.lora_wgrad(u, x, dropout_p=0.1)
    assert g.shape == (8, 123) and not g.any()


# ------------------------------------------------------------------------------------- fwd / bwd
def _lora_linear_torch(x, w, b, a, bb, s, p):
    return x @ w.T + b + s * (_drop(x, SEED, OFFSET, p) @ a.T) @ bb.T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c_in,c_out,r,p", [(97, 123, 1025, 16, 0.1), (97, 1025, 123, 8, 0.0),
                                              (1, 123, 97, 1, 0.1), (0, 123, 97, 8, 0.1)])
def test_fwd_bwd(n, c_in, c_out, r, p, dtype):
    s = 2.0
    x, gy = _rand(n, c_in, dtype=dtype), _rand(n, c_out, dtype=dtype)
    w, bias = _rand(c_out, c_in, dtype=dtype, scale=c_in**-0.5), _rand(c_out, dtype=dtype)
    a, b = _rand(r, c_in, dtype=dtype, scale=c_in**-0.5), _rand(c_out, r, dtype=dtype, scale=r**-0.5)

    y, u = K.lora_linear_fwd(x, w, bias, a, b, s, p, SEED, OFFSET)
    gx, ga, gb = K.lora_linear_bwd(gy, x, w, a, b, u, s, p, SEED, OFFSET)
    assert u.dtype == torch.float32 and u.shape == (n, r)
    assert (gx.dtype, ga.dtype, gb.dtype) == (dtype,) * 3 and ga.shape == a.shape and gb.shape == b.shape
    assert gb.is_contiguous() and ga.is_contiguous()

    def run(dt, f=lambda t: t):
        leaves = [f(t.detach().to(dt)).requires_grad_(i in (0, 3, 4))
                  for i, t in enumerate((x, w, bias, a, b))]
        out = _lora_linear_torch(*leaves, s, p)
        grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], f(gy.to(dt))) if n else \
            [torch.zeros_like(leaves[i]) for i in (0, 3, 4)]
        return out.detach(), grads

    y_ref, g_ref = run(torch.float64)
    y_base, g_base = run(dtype)
    y_cond, g_cond = run(torch.float64, torch.abs)  # products and sums: the oracle on |inputs|
    assert_close_to_ref(y, y_ref, y_base, cond=y_cond)
    u_cond = _drop(x.double().abs(), SEED, OFFSET, p) @ a.double().abs().T
    assert_close_to_ref(u, _drop(x.double(), SEED, OFFSET, p) @ a.double().T, _drop(x, SEED, OFFSET, p) @ a.T,
                        cond=u_cond)
    for got, ref, base, cond in zip((gx, ga, gb), g_ref, g_base, g_cond):
        assert_close_to_ref(got, ref, base, grad=True, cond=cond)


# ------------------------------------------------------------------------------------------ checks
def test_input_checks():
    x = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"\bx must be contiguous"):
        K.lora_down(x.t().contiguous().t(), torch.randn(4, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"\bu must be contiguous"):
        K.lora_wgrad(torch.randn(4, 8, device=DEVICE).t(), x)
    with pytest.raises(ValueError, match=r"\bout must be contiguous"):
        K.lora_up_add_(torch.randn(32, 8, device=DEVICE).t(), torch.randn(8, 4, device=DEVICE),
                       torch.randn(32, 4, device=DEVICE), alpha=1.0)
    with pytest.raises(ValueError, match="rank R=129"):
        K.lora_down(x, torch.randn(129, 32, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        K.lora_down(x, torch.randn(4, 32, device=DEVICE), dropout_p=1.5)
    with pytest.raises(ValueError, match="m is torch.float16"):
        K.lora_down(x, torch.randn(4, 32, device=DEVICE).half())
    with pytest.raises(ValueError, match="u must be fp32"):
        K.lora_wgrad(torch.randn(8, 4, device=DEVICE).half(), x)


def test_aot_configs_cover_launcher_choices():
    """Every variant a launcher can pick (any R in 1..128) is in AOT_CONFIGS, so the static check sees it."""
    shipped = {(c.kernel.__name__, c.name) for c in K.AOT_CONFIGS}
    for kernel in ("down", "up_add", "wgrad"):
        for dtype in DTYPES:
            for r in range(1, 129):
                for aligned in (False, True):
                    for dropout in (False, True):
                        c = K._aot_config(kernel, dtype, r, aligned, dropout)
                        assert (c.kernel.__name__, c.name) in shipped, c.name
