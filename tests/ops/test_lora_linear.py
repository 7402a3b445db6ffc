"""lora_linear on every backend this machine runs, against lora_linear_ref in fp64.

Error rule (llmkern.testing.assert_close_to_ref): our error against the fp64 reference is at most
2x the error plain PyTorch makes in the same dtype (3x for gradients).
"""
import pytest
import torch

from llmkern import _rng
from llmkern.ops import _backends
from llmkern.ops.lora_linear import UNAVAILABLE, lora_linear, lora_linear_ref
from llmkern.testing import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params():
    """cpu always; emu (CUDA kernels on the CPU) when built; triton under the interpreter; cuda on a GPU."""
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("emu", id="emu", marks=pytest.mark.skipif("emu" in UNAVAILABLE,
                                                                      reason=UNAVAILABLE.get("emu", ""))))
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", ""))))
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return out


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def make_inputs(lead, c_in, c_out, r, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c_in, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, generator=g, dtype=torch.float64) / c_in ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, c_in, generator=g, dtype=torch.float64) / c_in ** 0.5
    bb = torch.randn(c_out, r, generator=g, dtype=torch.float64) / r ** 0.5
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, b, a, bb)]


def run(fn, x, w, b, a, bb, scale, p, seed, gy, offset=0, **kw):
    """Forward and the gradients of x, A and B."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = fn(x, w, b, a, bb, scale, p, seed, offset, **kw)
    gx, ga, gb = torch.autograd.grad(y, (x, a, bb), gy)
    return y.detach(), gx, ga, gb


def check_against_ref(backend, lead, c_in, c_out, r, p, dtype, bias=True, noncontig=False, offset=0):
    dev = device_of(backend)
    x, w, b, a, bb = make_inputs(lead, c_in, c_out, r, dtype, dev, bias)
    if noncontig:  # a strided view: every other column of a wider tensor
        x = torch.cat([x, x], dim=-1)[..., ::2]
        assert not x.is_contiguous()
    gy = torch.randn(*lead, c_out, dtype=torch.float64).to(dev, dtype)
    scale, seed = 1.7, 1234
    ours = run(lora_linear, x, w, b, a, bb, scale, p, seed, gy, offset, backend=backend)
    base = run(lora_linear_ref, x, w, b, a, bb, scale, p, seed, gy, offset)
    d64 = [t.double() if t is not None else None for t in (x, w, b, a, bb)]
    ref = run(lora_linear_ref, *d64, scale, p, seed, gy.double(), offset)
    # The op is products and sums, so the oracle on |inputs| is each result's sum of |terms|, the
    # condition that bounds PyTorch's error below where its max is over few draws: small results,
    # and with one token every result (its elements share the token's dot products: grad_b is u·gy).
    cond = run(lora_linear_ref, *[t.abs() if t is not None else None for t in d64], scale, p, seed,
               gy.double().abs(), offset)
    shared = x.numel() == c_in
    assert ours[0].dtype == dtype and ours[0].shape == (*lead, c_out)
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} y", cond=cond[0], shared=shared)
    for name, o, rf, bs, c in zip(("grad_x", "grad_a", "grad_b"), ours[1:], ref[1:], base[1:], cond[1:]):
        assert_close_to_ref(o, rf, bs, grad=True, name=f"{backend} {name}", cond=c, shared=shared)


# The full grid on the C++ CPU backend: dtypes x odd shapes x ranks x dropout.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,c_in,c_out", [((97,), 123, 1025), ((2, 97), 1025, 123), ((1,), 64, 48)])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cpu_grid(dtype, lead, c_in, c_out, r, p):
    check_against_ref("cpu", lead, c_in, c_out, r, p, dtype)


# Every backend on a smaller grid (the emulator and the Triton interpreter are ~1000x slower).
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r,p", [(1, 0.0), (16, 0.1)])
def test_backends(backend, dtype, r, p):
    check_against_ref(backend, (2, 37), 123, 45, r, p, dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_noncontiguous_x_and_no_bias(backend):
    check_against_ref(backend, (5, 7), 33, 19, 4, 0.1, torch.float32, bias=False, noncontig=True)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_batch(backend):
    dev = device_of(backend)
    x, w, b, a, bb = make_inputs((0,), 16, 8, 4, torch.float32, dev)
    x.requires_grad_()
    a.requires_grad_()
    y = lora_linear(x, w, b, a, bb, 2.0, 0.1, 1, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend", backend_params())
def test_large_offset_uses_high_counter_bits(backend):
    """The 64-bit counter: an offset past 2^32 gives another mask, and every backend agrees with _rng."""
    check_against_ref(backend, (3,), 40, 24, 8, 0.5, torch.float32, offset=2**32 + 7)
    m_lo = _rng.dropout_keep_mask(5, 7, 0.5, 3, 40)
    m_hi = _rng.dropout_keep_mask(5, 2**32 + 7, 0.5, 3, 40)
    assert not torch.equal(m_lo, m_hi)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id in ("cpu", "emu", "cuda")])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fp64(backend, p):
    dev = device_of(backend)
    x, w, b, a, bb = make_inputs((3, 5), 7, 6, 3, torch.float64, dev)
    for t in (x, w, b, a, bb):
        t.requires_grad_()
    # W and b included: their gradients are formed only when they require grad.
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.9, p, 42, backend=backend), (x, w, b, a, bb))


def test_same_seed_same_mask_and_rate():
    x, w, b, a, bb = make_inputs((64,), 256, 32, 8, torch.float32)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.25, 99)
    y2 = lora_linear(x, w, b, a, bb, 1.0, 0.25, 99)
    y3 = lora_linear(x, w, b, a, bb, 1.0, 0.25, 100)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    keep = _rng.dropout_keep_mask(99, 0, 0.25, 64, 256)
    # 16384 Bernoulli(0.75) draws: the standard deviation of the rate is 0.0034, so 0.02 is ~6 sigma.
    assert abs(keep.float().mean().item() - 0.75) < 0.02


def test_saves_only_x_and_small_product():
    """With dropout, autograd keeps x and the (..., R) product; never dropout(x) or a mask."""
    x, w, b, a, bb = make_inputs((256,), 512, 64, 8, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, w, b, a, bb, 2.0, 0.1, 3, backend="cpu")
    activations = [t for t in saved if t.data_ptr() not in {p.data_ptr() for p in (w, a, bb)}]
    # Besides x and the product, the 8-byte seed tensor (0-d int64) from which backward regenerates the mask.
    assert sorted(tuple(t.shape) for t in activations) == [(), (256, 8), (256, 512)]
    assert sum(t.numel() * t.element_size() for t in activations) == 256 * 512 * 4 + 256 * 8 * 4 + 8


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif(
    "emu" in UNAVAILABLE, reason="emulated build missing"))])
def test_opcheck(ns):
    x, w, b, a, bb = make_inputs((2, 9), 12, 10, 4, torch.float32)
    for t in (x, a, bb):
        t.requires_grad_()
    op = getattr(torch.ops, ns)
    seed = torch.tensor(7)
    torch.library.opcheck(op.lora_linear, (x, w, b, a, bb, 1.5, 0.2, seed, 0, 0, 12))
    torch.library.opcheck(op.lora_linear, (x.detach(), w, None, a.detach(), bb.detach(), 1.5, 0.0, seed, 0, 0, 12))
    # A column shard's counters: columns 3..15 of 20-wide rows.
    torch.library.opcheck(op.lora_linear, (x, w, b, a, bb, 1.5, 0.2, seed, 5, 3, 20))
    y, xa = op.lora_linear(x.detach(), w, b, a.detach(), bb.detach(), 1.5, 0.2, seed, 0, 0, 12)
    torch.library.opcheck(op._lora_linear_backward,
                          (torch.randn_like(y), x.detach(), w, a.detach(), bb.detach(), xa, 1.5, 0.2, seed, 0, 0, 12))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    x, w, b, a, bb = make_inputs((4, 33), 48, 40, 8, torch.float32)
    a.requires_grad_()

    def f(x, a):
        return lora_linear(x, w, b, a, bb, 2.0, p, 11).square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, a)
    out = compiled(x, a)
    torch.testing.assert_close(out, eager)
    (g1,) = torch.autograd.grad(eager, a)
    (g2,) = torch.autograd.grad(compiled(x, a), a)
    torch.testing.assert_close(g1, g2)


def test_torch_compile_inductor():
    x, w, b, a, bb = make_inputs((3, 5), 16, 12, 4, torch.float32)
    compiled = torch.compile(lambda x: lora_linear(x, w, b, a, bb, 1.0, 0.1, 5) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), lora_linear(x, w, b, a, bb, 1.0, 0.1, 5) * 2)


# ---- bad input: every message names what was expected ----
BAD = {
    "weight C_in": (lambda x, w, b, a, bb: (x, w[:, :-1], b, a, bb), ValueError, r"expected \(C_out, 12\)"),
    "lora_a C_in": (lambda x, w, b, a, bb: (x, w, b, a[:, :-1], bb), ValueError, r"expected \(R, 12\)"),
    "lora_b shape": (lambda x, w, b, a, bb: (x, w, b, a, bb[:, :-1]), ValueError, r"expected \(C_out, R\) = \(10, 4\)"),
    "bias shape": (lambda x, w, b, a, bb: (x, w, b[:-1], a, bb), ValueError, r"bias has shape \(9,\); expected \(10,\)"),
    "rank 0": (lambda x, w, b, a, bb: (x, w, b, a[:0], bb[:, :0]), ValueError, r"rank R must be >= 1"),
    "dtype": (lambda x, w, b, a, bb: (x, w.half(), b, a, bb), TypeError, r"x and weight must have the same dtype"),
    "int dtype": (lambda x, w, b, a, bb: tuple(t.long() for t in (x, w, b, a, bb)), TypeError, r"dtype must be one of"),
    "device": (lambda x, w, b, a, bb: (x, w, b, a.to("meta"), bb), ValueError, r"same device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, exc, msg = BAD[case]
    args = make(*make_inputs((2, 3), 12, 10, 4, torch.float32))
    with pytest.raises(exc, match=msg):
        lora_linear(*args, 1.0, 0.0, 0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(*make_inputs((2,), 8, 8, 2, torch.float32), 1.0, p, 0)


def test_cpp_op_checks_too():
    """The dispatcher op validates on its own (a caller may skip the Python wrapper)."""
    x, w, b, a, bb = make_inputs((2,), 12, 10, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"lora_b has shape \[10, 3\]; expected \(C_out, R\) = \(10, 4\)"):
        torch.ops.llmkern.lora_linear(x, w, b, a, bb[:, :3], 1.0, 0.0, torch.tensor(0), 0, 0, 12)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        torch.ops.llmkern.lora_linear(x, w, b, a, bb, 1.0, 1.0, torch.tensor(0), 0, 0, 12)


def test_refused_backend_says_why():
    args = make_inputs((2,), 8, 8, 2, torch.float32)
    with pytest.raises(_backends.BackendRefused, match=r"backend 'cuda' refused: needs CUDA tensors, got cpu"):
        lora_linear(*args, 1.0, 0.0, 0, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        lora_linear(*args, 1.0, 0.0, 0, backend="nope")


def test_env_override(monkeypatch):
    args = make_inputs((2,), 8, 8, 2, torch.float32)
    monkeypatch.setenv("LLMKERN_BACKEND", "ref")
    torch.testing.assert_close(lora_linear(*args, 1.0, 0.0, 0), lora_linear_ref(*args, 1.0, 0.0, 0))
    monkeypatch.setenv("LLMKERN_BACKEND", "cuda")
    with pytest.raises(_backends.BackendRefused):
        lora_linear(*args, 1.0, 0.0, 0)


def test_fp16_long_reduction_accumulates_in_fp32():
    """C_in = 4096 ones: an fp16 accumulator would saturate its 11-bit mantissa (2048 + 1 == 2048)."""
    c = 4096
    x = torch.ones(1, c, dtype=torch.float16)
    w = torch.zeros(1, c, dtype=torch.float16)
    a = torch.full((1, c), 0.25, dtype=torch.float16)
    bb = torch.ones(1, 1, dtype=torch.float16)
    for backend in ["cpu"] + ([] if "emu" in UNAVAILABLE else ["emu"]):
        assert lora_linear(x, w, None, a, bb, 1.0, 0.0, 0, backend=backend).item() == 1024.0


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id in ("cpu", "emu")])
def test_schedules_agree(backend, monkeypatch):
    """The emulator's forward, reverse and random thread schedules give the same answer (and the
    CPU backend is unaffected by the knob)."""
    outs = []
    for sched in ("forward", "reverse", "random:7"):
        monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", sched)
        outs.append(run(lora_linear, *make_inputs((3, 11), 70, 33, 5, torch.float32), 1.0, 0.1, 9,
                        torch.ones(3, 11, 33), backend=backend))
    # Blocks run one after another, so even wgrad's atomics add in the same order: bit-identical.
    for o in outs[1:]:
        assert all(torch.equal(t0, t1) for t0, t1 in zip(outs[0], o))



# ---- the dropout counter of a tensor-parallel column shard: col_offset and row_stride ----
def with_ref(params):
    return params + [pytest.param("ref", id="ref")]


def dropout_probe(backend, x, p, seed, offset, **kw):
    """dropout(x) and the gradient of x for grad_y = 1, through the op with W = 0 and A = B = identity
    (scale 1): y = mask·x/(1-p) and grad_x = mask/(1-p), so their nonzeros are the mask."""
    c = x.shape[-1]
    eye = torch.eye(c, device=x.device)
    x = x.detach().requires_grad_()
    y = lora_linear(x, torch.zeros(c, c, device=x.device), None, eye, eye, 1.0, p, seed, offset, backend=backend,
                    **kw)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), gx


@pytest.mark.parametrize("backend", with_ref(backend_params()))
def test_column_shard_draws_the_slice_of_the_full_mask(backend):
    """Local element (n, k) of columns [a, b) with col_offset=a, row_stride=C_in draws the bit of (n, a + k)
    of the single-device call, in forward and backward (rows are the flattened leading dims)."""
    dev = device_of(backend)
    full, a, b, p, seed, offset = 40, 13, 31, 0.5, 2**40 + 3, 7
    x = torch.rand(2, 5, full, device=dev) + 0.5  # no zeros: a zero output is a dropped element
    y_full, g_full = dropout_probe(backend, x, p, seed, offset)
    keep = _rng.dropout_keep_mask(seed, offset, p, 10, full).reshape(2, 5, full).to(dev)
    assert torch.equal(y_full != 0, keep) and torch.equal(g_full != 0, keep)
    y_s, g_s = dropout_probe(backend, x[..., a:b], p, seed, offset, col_offset=a, row_stride=full)
    assert torch.equal(y_s != 0, keep[..., a:b]) and torch.equal(g_s != 0, keep[..., a:b])
    torch.testing.assert_close(y_s, y_full[..., a:b], rtol=0, atol=0)  # the same products, one term each
    torch.testing.assert_close(g_s, g_full[..., a:b], rtol=0, atol=0)


@pytest.mark.parametrize("col_offset,row_stride", [(-1, 20), (3, 14), (0, 11)])
def test_bad_counter_layout(col_offset, row_stride):
    args = make_inputs((2,), 12, 8, 2, torch.float32)
    with pytest.raises(ValueError, match=rf"col_offset \+ C_in <= row_stride, got col_offset={col_offset}, C_in=12"):
        lora_linear(*args, 1.0, 0.1, 0, col_offset=col_offset, row_stride=row_stride)
    with pytest.raises(RuntimeError, match=rf"col_offset \+ C_in <= row_stride, got col_offset={col_offset}, C_in=12"):
        torch.ops.llmkern.lora_linear(*args, 1.0, 0.1, torch.tensor(0), 0, col_offset, row_stride)


# ---- the seed ----
def test_seed_takes_the_full_uint64_range():
    """A seed is its 64 bits: 2^64 - 1 and -1 draw the same mask (rng.h reads the seed as uint64)."""
    args = make_inputs((6,), 16, 8, 2, torch.float32)
    y_big = lora_linear(*args, 1.0, 0.5, 2**64 - 1)
    assert torch.equal(y_big, lora_linear(*args, 1.0, 0.5, -1))
    assert torch.equal(y_big, lora_linear(*args, 1.0, 0.5, torch.tensor(-1)))
    assert not torch.equal(y_big, lora_linear(*args, 1.0, 0.5, 2**63 - 1))
    torch.testing.assert_close(y_big, lora_linear_ref(*args, 1.0, 0.5, 2**64 - 1))
    with pytest.raises(ValueError, match=r"seed must be in \[-2\^63, 2\^64\).*got 18446744073709551616"):
        lora_linear(*args, 1.0, 0.5, 2**64)
    with pytest.raises(ValueError, match=r"seed must be an int or an int64 CPU tensor with one element, got a "
                                         r"torch.int32 tensor"):
        lora_linear(*args, 1.0, 0.5, torch.tensor(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"seed must be an int64 CPU tensor with one element, got a Float"):
        torch.ops.llmkern.lora_linear(*args, 1.0, 0.5, torch.tensor(3.0), 0, 0, 16)


@pytest.mark.parametrize("backend", with_ref(backend_params()))
def test_tensor_seed_equals_int_seed(backend):
    args = make_inputs((3, 4), 24, 8, 2, torch.float32, device_of(backend))
    assert torch.equal(lora_linear(*args, 1.0, 0.3, 12345, backend=backend),
                       lora_linear(*args, 1.0, 0.3, torch.tensor(12345), backend=backend))


# ---- validation and NaN on every backend ----
@pytest.mark.parametrize("ns", _backends.namespaces("lora_linear"))
@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_every_dispatcher_op_refuses_dropout_out_of_range(ns, p):
    """One range, [0, 1), on every backend's op, forward and backward (Triton accepted p = 1)."""
    x, w, b, a, bb = make_inputs((2,), 8, 8, 2, torch.float32)
    op, seed = getattr(torch.ops, ns), torch.tensor(0)
    with pytest.raises((RuntimeError, ValueError), match=r"dropout_p must be in \[0, 1\)"):
        op.lora_linear(x, w, b, a, bb, 1.0, p, seed, 0, 0, 8)
    y, xa = op.lora_linear(x, w, b, a, bb, 1.0, 0.1, seed, 0, 0, 8)
    with pytest.raises((RuntimeError, ValueError), match=r"dropout_p must be in \[0, 1\)"):
        op._lora_linear_backward(torch.ones_like(y), x, w, a, bb, xa, 1.0, p, seed, 0, 0, 8)


@pytest.mark.parametrize("case", ["bias shape", "lora_b shape", "dtype", "rank 0"])
@pytest.mark.skipif("triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", ""))
def test_triton_op_validates_as_cpp_does(case):
    """torch.ops.llmkern_triton.lora_linear checks its inputs with the messages of the C++ op."""
    make, exc, msg = BAD[case]
    args = make(*make_inputs((2, 3), 12, 10, 4, torch.float32))
    with pytest.raises(exc, match=msg):
        torch.ops.llmkern_triton.lora_linear(*args, 1.0, 0.0, torch.tensor(0), 0, 0, 12)
    with pytest.raises(ValueError, match=r"col_offset \+ C_in <= row_stride"):
        torch.ops.llmkern_triton.lora_linear(*make_inputs((2, 3), 12, 10, 4, torch.float32), 1.0, 0.0,
                                             torch.tensor(0), 0, 1, 12)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_propagates_through_dropped_elements(backend):
    """Dropout multiplies by a 0/1 mask, and 0·NaN = NaN in PyTorch's unfused x * mask: a dropped NaN
    or inf still poisons its row of xa (so y) and its column of grad_a, on every backend as in ref."""
    dev = device_of(backend)
    x, w, b, a, bb = make_inputs((4,), 8, 6, 2, torch.float32, dev)
    keep = _rng.dropout_keep_mask(3, 0, 0.5, 4, 8)
    dropped, kept = (~keep).nonzero()[0].tolist(), keep.nonzero()[-1].tolist()
    assert dropped[0] != kept[0]
    x[tuple(dropped)] = float("nan")
    x[tuple(kept)] = float("inf")
    gy = torch.ones(4, 6, device=dev)
    ours = run(lora_linear, x, w, b, a, bb, 1.0, 0.5, 3, gy, backend=backend)
    ref = run(lora_linear_ref, x, w, b, a, bb, 1.0, 0.5, 3, gy)
    for name, o, r in zip(("y", "grad_x", "grad_a", "grad_b"), ours, ref):
        assert torch.equal(o.isnan().cpu(), r.isnan().cpu()), name
    assert ref[0][dropped[0]].isnan().all()  # the dropped NaN reached y: the case the test is about


@pytest.mark.parametrize("backend", with_ref(backend_params()))
@pytest.mark.parametrize("c_in,c_out", [(0, 8), (8, 0)], ids=["c_in=0", "c_out=0"])
def test_zero_features(backend, c_in, c_out):
    """C_in = 0 gives y = bias and zero gradients; C_out = 0 an empty y; both of the right shapes."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(3, 2, c_in, generator=g).to(dev), torch.randn(2, c_in, generator=g).to(dev)
    w, b = torch.randn(c_out, c_in, generator=g).to(dev), torch.randn(c_out, generator=g).to(dev)
    bb = torch.randn(c_out, 2, generator=g).to(dev)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    y = lora_linear(x, w, b, a, bb, 1.0, 0.1, 1, backend=backend)
    assert y.shape == (3, 2, c_out)
    if c_in == 0:
        torch.testing.assert_close(y, b.expand(3, 2, c_out).detach(), rtol=0, atol=0)
    gx, ga, gb = torch.autograd.grad(y, (x, a, bb), torch.ones_like(y), allow_unused=True)
    assert gx.shape == x.shape and ga.shape == a.shape and gb.shape == bb.shape
    assert not (gx.any() or ga.any() or gb.any())
