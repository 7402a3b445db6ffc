"""adapter_bottleneck on every backend this machine runs, against adapter_bottleneck_ref in fp64.

Error rule (llmkern.testing.assert_close_to_ref): our error against the fp64 reference is at most
2x the error plain PyTorch makes in the same dtype (3x for gradients). The emulated CUDA kernels
(backend "emu") run under the forward, reverse and random block schedules of csrc/emu.
"""
import pytest
import torch

from llmkern.ops import _backends
from llmkern.ops.adapter_bottleneck import ACTIVATIONS, UNAVAILABLE, adapter_bottleneck, adapter_bottleneck_ref
from llmkern.testing import assert_close_to_ref

from conditions import adapter_bottleneck_condition

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEDULES = ("forward", "reverse", "random:7")
NAMES = ("x", "down_weight", "down_bias", "up_weight", "up_bias", "ln_weight", "ln_bias", "residual")


def backend_params(only=None):
    """cpu always; emu (CUDA kernels on the CPU) when built; triton when its kernels import; cuda on a GPU."""
    out = [pytest.param("cpu", id="cpu")]
    for b in ("emu", "triton"):
        out.append(pytest.param(b, id=b, marks=pytest.mark.skipif(b in UNAVAILABLE, reason=UNAVAILABLE.get(b, ""))))
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return [p for p in out if only is None or p.id in only]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def make_inputs(lead, c, r, dtype, *, ln=True, parallel=False, bias=True, device="cpu", seed=0):
    """x, D, d, U, u, LN weight/bias, residual as in NAMES (None where absent), drawn in fp64."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    t = [rnd(*lead, c) * 2 + 0.5,  # mean 0.5, std 2: LayerNorm has something to remove
         rnd(r, c, s=c ** -0.5), rnd(r) if bias else None, rnd(c, r, s=r ** -0.5), rnd(c) if bias else None,
         1 + 0.1 * rnd(c) if ln else None, 0.1 * rnd(c) if ln and bias else None,
         rnd(*lead, c) if parallel else None]
    return [v.to(device=device, dtype=dtype) if v is not None else None for v in t]


def run(fn, inputs, scale, act, gy, **kw):
    """Output and the gradient of every present input (x, parameters, residual)."""
    ins = [v.detach().requires_grad_() if v is not None else None for v in inputs]
    x, dw, db, uw, ub, lw, lb, res = ins
    out = fn(x, dw, db, uw, ub, scale, act, lw, lb, 1e-5, res, **kw)
    present = [v for v in ins if v is not None]
    grads = torch.autograd.grad(out, present, gy)
    it = iter(grads)
    return out.detach(), [next(it) if v is not None else None for v in ins]


def check_against_ref(backend, lead, c, r, dtype, act, *, ln=True, parallel=False, bias=True, noncontig=False):
    dev = device_of(backend)
    inputs = make_inputs(lead, c, r, dtype, ln=ln, parallel=parallel, bias=bias, device=dev)
    if noncontig:  # strided views: every other column of a wider tensor
        inputs[0] = torch.cat([inputs[0], inputs[0]], dim=-1)[..., ::2]
        inputs[3] = torch.cat([inputs[3], inputs[3]], dim=-1)[:, ::2]
        assert not inputs[0].is_contiguous() and not inputs[3].is_contiguous()
    gy = torch.randn(*lead, c, dtype=torch.float64).to(dev, dtype)
    scale = 1.7
    ours = run(adapter_bottleneck, inputs, scale, act, gy, backend=backend)
    base = run(adapter_bottleneck_ref, inputs, scale, act, gy)
    ref = run(adapter_bottleneck_ref, [v.double() if v is not None else None for v in inputs], scale, act,
              gy.double())
    # Used where a result is few draws, e.g. a (1,) down_bias gradient (llmkern/testing/tolerances.py).
    cond = adapter_bottleneck_condition(inputs, scale, act, gy)
    assert ours[0].dtype == dtype and ours[0].shape == (*lead, c)
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} out", cond=cond[0])
    for name, o, rf, bs, cd in zip(NAMES, ours[1], ref[1], base[1], cond[1:]):
        assert (o is None) == (rf is None), name
        if o is not None:
            assert o.dtype == dtype and o.shape == rf.shape, name
            assert_close_to_ref(o, rf, bs, grad=True, name=f"{backend} grad {name}", cond=cd)


# The full grid on the C++ CPU backend: dtypes x {series, parallel} x {LN, no LN} x activations,
# T = 97 rows over 8-row blocks (one partial block), C = 515 over 512-column chunks (one partial);
# C = 1025 runs in test_shapes.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cpu_grid(dtype, parallel, ln, act):
    check_against_ref("cpu", (97,), 515, 16, dtype, act, ln=ln, parallel=parallel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_weight_grad_chunks(dtype):
    """T = 1030: the CPU backward's weight-gradient GEMMs run over 512-row chunks (the last one of 6
    rows, not a multiple of the 8-row block)."""
    check_against_ref("cpu", (2, 515), 40, 3, dtype, "silu", ln=True)


@pytest.mark.parametrize("backend", backend_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,c,r", [((3, 33), 100, 1), ((97,), 100, 64), ((2, 5), 1025, 7)])
def test_shapes(backend, dtype, lead, c, r):
    check_against_ref(backend, lead, c, r, dtype, "gelu", ln=True, parallel=r == 64)


# The emulated CUDA kernels: every dtype, form, LN choice and activation on 9 rows (one row block
# of the column reductions), then every schedule on 70 rows, which the column reductions split into
# 2 row blocks of 35 (bit-identity across schedules is checked separately). The emulator runs each
# row's 256 threads as fibers, so runtime grows with T: the grid stays small.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.skipif("emu" in UNAVAILABLE, reason=UNAVAILABLE.get("emu", ""))
def test_emu(dtype, parallel, ln, act, monkeypatch):
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", "forward")
    check_against_ref(backend="emu", lead=(9,), c=100, r=9, dtype=dtype, act=act, ln=ln, parallel=parallel)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("parallel,ln,act", [(False, True, "gelu"), (True, True, "silu"), (False, False, "relu"),
                                             (True, False, "gelu_tanh")])
@pytest.mark.skipif("emu" in UNAVAILABLE, reason=UNAVAILABLE.get("emu", ""))
def test_emu_schedules(schedule, parallel, ln, act, monkeypatch):
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)
    check_against_ref(backend="emu", lead=(70,), c=100, r=9, dtype=torch.float32, act=act, ln=ln,
                      parallel=parallel)


@pytest.mark.parametrize("backend", backend_params(("emu",)))
@pytest.mark.parametrize("lead,c,r", [((5,), 257, 64), ((1,), 33, 1)])
def test_emu_shapes(backend, lead, c, r):
    check_against_ref(backend, lead, c, r, torch.bfloat16, "silu", ln=True)


@pytest.mark.parametrize("backend", backend_params())
def test_noncontiguous_and_no_bias(backend):
    check_against_ref(backend, (5, 7), 33, 4, torch.float32, "relu", ln=True, bias=False, noncontig=True)
    check_against_ref(backend, (5, 7), 33, 4, torch.float32, "gelu_tanh", ln=False, parallel=True, noncontig=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
def test_empty_batch(backend, ln):
    inputs = make_inputs((0,), 16, 4, torch.float32, ln=ln, device=device_of(backend))
    ins = [v.requires_grad_() if v is not None else None for v in inputs]
    out = adapter_bottleneck(*ins[:5], 2.0, "silu", ins[5], ins[6], 1e-5, ins[7], backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert ins[0].grad.shape == (0, 16)
    for v in ins[1:7]:
        if v is not None:
            assert torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("backend", backend_params(("cpu", "emu")))
def test_long_row_accumulates_in_fp32(backend):
    """C = 4096: an fp16 accumulator would stop at 2048 (2048 + 1 == 2048 in fp16); the dot is 1024."""
    c = 4096
    x = torch.ones(1, c, dtype=torch.float16)
    dw = torch.full((1, c), 0.25, dtype=torch.float16)
    uw = torch.ones(c, 1, dtype=torch.float16)
    out = adapter_bottleneck(x, dw, None, uw, None, 1.0, "relu", backend=backend)
    assert torch.all(out == 1025.0)


@pytest.mark.parametrize("backend", backend_params(("cpu", "emu")))
def test_schedules_agree(backend, monkeypatch):
    """No atomics anywhere: forward, reverse and random schedules give bit-identical results (and
    the CPU backend ignores the knob)."""
    inputs = make_inputs((3, 11), 70, 5, torch.float32, ln=True)
    gy = torch.randn(3, 11, 70)
    outs = []
    for sched in SCHEDULES:
        monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", sched)
        out, grads = run(adapter_bottleneck, inputs, 0.5, "gelu", gy, backend=backend)
        outs.append([out] + [g for g in grads if g is not None])
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
def test_saves_only_z_and_row_stats(parallel, ln):
    """Autograd keeps x, z (T, R) fp32 and, with LN, mean/rstd (T) fp32: nothing of size (T, C)
    besides x, and never act(z) or LN(x). Eager PyTorch saves several times more."""
    t, c, r = 64, 96, 8
    inputs = make_inputs((t,), c, r, torch.float32, ln=ln, parallel=parallel)
    ins = [v.requires_grad_() if v is not None else None for v in inputs]
    params = {v.data_ptr() for v in ins[1:7] if v is not None}

    def saved(fn, **kw):
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: got.append(v) or v, lambda v: v):
            fn(*ins[:5], 1.5, "gelu", ins[5], ins[6], 1e-5, ins[7], **kw)
        # Empty tensors (mean/rstd without LN) hold no bytes and share the null storage pointer.
        return {v.untyped_storage().data_ptr(): v for v in got if v.numel() and v.data_ptr() not in params}

    ours = saved(adapter_bottleneck, backend="cpu")
    want = sorted([(t, c), (t, r)] + ([(t,), (t,)] if ln else []))
    assert sorted(tuple(v.shape) for v in ours.values()) == want
    nbytes = sum(v.untyped_storage().nbytes() for v in ours.values())
    assert nbytes == t * c * 4 + t * r * 4 + (2 * t * 4 if ln else 0)
    eager = sum(v.untyped_storage().nbytes() for v in saved(adapter_bottleneck_ref).values())
    assert eager >= nbytes + t * r * 4  # eager keeps at least z and act(z)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif(
    "emu" in UNAVAILABLE, reason="emulated build missing")), pytest.param("llmkern_triton", marks=pytest.mark.skipif(
        "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
@pytest.mark.parametrize("ln,parallel", [(True, False), (False, True)])
def test_opcheck(ns, ln, parallel):
    x, dw, db, uw, ub, lw, lb, res = make_inputs((9,), 12, 4, torch.float32, ln=ln, parallel=parallel)
    op = getattr(torch.ops, ns)
    grads = [v.detach().requires_grad_() if v is not None else None for v in (x, dw, db, uw, ub, lw, lb, res)]
    x_, dw_, db_, uw_, ub_, lw_, lb_, res_ = grads
    torch.library.opcheck(op.adapter_bottleneck, (x_, dw_, db_, uw_, ub_, 1.5, "silu", lw_, lb_, 1e-5, res_))
    torch.library.opcheck(op.adapter_bottleneck, (x, dw, None, uw, None, 0.5, "relu", lw, None, 1e-3, res))
    out, z, mean, rstd = op.adapter_bottleneck(x, dw, db, uw, ub, 1.5, "silu", lw, lb, 1e-5, res)
    torch.library.opcheck(op._adapter_bottleneck_backward,
                          (torch.randn_like(out), x, dw, db, uw, 1.5, "silu", lw, lb, z, mean, rstd, res is None))


@pytest.mark.parametrize("ln", [False, True], ids=["noln", "ln"])
def test_torch_compile_fullgraph(ln):
    x, dw, db, uw, ub, lw, lb, _ = make_inputs((4, 33), 48, 8, torch.float32, ln=ln)
    dw.requires_grad_()

    def f(x, dw):
        return adapter_bottleneck(x, dw, db, uw, ub, 2.0, "gelu", lw, lb).square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, dw)
    torch.testing.assert_close(compiled(x, dw), eager)
    (g1,) = torch.autograd.grad(eager, dw)
    (g2,) = torch.autograd.grad(compiled(x, dw), dw)
    torch.testing.assert_close(g1, g2)


def test_torch_compile_inductor():
    x, dw, db, uw, ub, lw, lb, res = make_inputs((3, 5), 16, 4, torch.float32, parallel=True)
    fn = lambda x: adapter_bottleneck(x, dw, db, uw, ub, 1.0, "silu", lw, lb, 1e-5, res) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


# ---- bad input: every message names what was expected ----
def _bad(i, f):
    return lambda ins: [f(v) if j == i else v for j, v in enumerate(ins)]


BAD = {
    "down C": (_bad(1, lambda v: v[:, :-1]), ValueError, r"down_weight must be \(R, 12\)"),
    "up shape": (_bad(3, lambda v: v.T), ValueError, r"up_weight must be \(C, R\) = \(12, 4\)"),
    "up_bias": (_bad(4, lambda v: v[:-1]), ValueError, r"up_bias must be \(12,\)"),
    "ln_weight": (_bad(5, lambda v: v[:-1]), ValueError, r"ln_weight must be \(12,\)"),
    "residual": (_bad(7, lambda v: v[:1]), ValueError, r"residual must have x's shape"),
    "dtype": (_bad(1, lambda v: v.half()), TypeError, r"x and down_weight must have the same dtype"),
    "int dtype": (lambda ins: [v.long() if v is not None else None for v in ins], TypeError, r"dtype must be one of"),
    "device": (_bad(3, lambda v: v.to("meta")), ValueError, r"same device"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, exc, msg = BAD[case]
    ins = make(make_inputs((2, 3), 12, 4, torch.float32, parallel=True))
    with pytest.raises(exc, match=msg):
        adapter_bottleneck(*ins[:5], 1.0, "relu", ins[5], ins[6], 1e-5, ins[7])
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'tanh'"):
        adapter_bottleneck(*make_inputs((2,), 8, 2, torch.float32)[:5], 1.0, "tanh")


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif(
    "emu" in UNAVAILABLE, reason="emulated build missing"))])
def test_cpp_op_checks_too(ns):
    """The dispatcher op validates on its own (a caller may skip the Python wrapper)."""
    op = getattr(torch.ops, ns)
    x, dw, db, uw, ub, lw, lb, _ = make_inputs((5,), 12, 4, torch.float32)
    with pytest.raises(RuntimeError, match=r"up_weight has shape \[12, 3\]; expected \(C, R\) = \(12, 4\)"):
        op.adapter_bottleneck(x, dw, db, uw[:, :3], ub, 1.0, "relu", lw, lb, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"activation must be one of relu, gelu, gelu_tanh, silu; got 'elu'"):
        op.adapter_bottleneck(x, dw, db, uw, ub, 1.0, "elu", lw, lb, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"x must be 2-D with shape \(T, C\)"):
        op.adapter_bottleneck(x[None], dw, db, uw, ub, 1.0, "relu", lw, lb, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16, got Double"):
        op.adapter_bottleneck(*(v.double() for v in (x, dw, db, uw, ub)), 1.0, "relu", None, None, 1e-5, None)
    out, z, mean, rstd = op.adapter_bottleneck(x, dw, db, uw, ub, 1.0, "relu", lw, lb, 1e-5, None)
    with pytest.raises(RuntimeError, match=r"mean has shape \[0\] and dtype Float; expected \(5\) and float32"):
        op._adapter_bottleneck_backward(out, x, dw, db, uw, 1.0, "relu", lw, lb, z, mean[:0], rstd, True)
    with pytest.raises(RuntimeError, match=r"z has shape \[5, 4\] and dtype Half; expected \(T, R\) = \(5, 4\)"):
        op._adapter_bottleneck_backward(out, x, dw, db, uw, 1.0, "relu", lw, lb, z.half(), mean, rstd, True)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif(
    "emu" in UNAVAILABLE, reason="emulated build missing"))])
def test_activation_names_agree_with_cpp(ns):
    """Python spells the activations once (Activation); C++ keeps its own list in activation.h
    (kActNames, in Act's order). Both lists, in order, are the ones the C++ op names when it refuses one."""
    x, dw, db, uw, ub, lw, lb, _ = make_inputs((5,), 12, 4, torch.float32)
    with pytest.raises(RuntimeError, match="activation must be one of") as e:
        getattr(torch.ops, ns).adapter_bottleneck(x, dw, db, uw, ub, 1.0, "elu", lw, lb, 1e-5, None)
    listed = str(e.value).split("activation must be one of ")[1].split(";")[0].split(", ")
    assert tuple(listed) == ACTIVATIONS


def test_refused_backend_says_why():
    ins = make_inputs((2,), 8, 2, torch.float32)
    with pytest.raises(_backends.BackendRefused, match=r"backend 'cuda' refused: needs CUDA tensors, got cpu"):
        adapter_bottleneck(*ins[:5], backend="cuda")
    with pytest.raises(_backends.BackendRefused, match=r"backend 'cpu' refused: dtype torch.float64"):
        adapter_bottleneck(*(v.double() for v in ins[:5]), backend="cpu")
    if "triton" in UNAVAILABLE:  # until triton_kernels/adapter_bottleneck.py exists: a reason, not a crash
        with pytest.raises(_backends.BackendRefused, match=r"backend 'triton' refused: its kernels are unavailable"):
            adapter_bottleneck(*ins[:5], backend="triton")


def test_fp64_runs_on_ref_with_a_warning(monkeypatch):
    monkeypatch.setattr(_backends, "_warned", set())  # the warning is given once per process
    ins = [v.double() if v is not None else None for v in make_inputs((3,), 8, 2, torch.float32)]
    with pytest.warns(RuntimeWarning, match=r"using the 'ref' backend because cpu refused \(dtype torch.float64"):
        out = adapter_bottleneck(*ins[:5], 1.0, "gelu", ins[5], ins[6])
    torch.testing.assert_close(out, adapter_bottleneck_ref(*ins[:5], 1.0, "gelu", ins[5], ins[6]))


def test_env_override(monkeypatch):
    ins = make_inputs((2,), 8, 2, torch.float32)
    monkeypatch.setenv("LLMKERN_BACKEND", "ref")
    torch.testing.assert_close(adapter_bottleneck(*ins[:5], 1.0, "relu", ins[5], ins[6]),
                               adapter_bottleneck_ref(*ins[:5], 1.0, "relu", ins[5], ins[6]))
    monkeypatch.setenv("LLMKERN_BACKEND", "cuda")
    with pytest.raises(_backends.BackendRefused):
        adapter_bottleneck(*ins[:5])


@pytest.mark.parametrize("backend", backend_params() + [pytest.param("ref", id="ref")])
@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
@pytest.mark.parametrize("ln", [True, False], ids=["ln", "noln"])
def test_bad_eps_refused_by_every_backend(backend, eps, ln):
    """eps < 0 (or NaN) is refused the same way everywhere; ref returned NaN and Triton finite values."""
    inputs = make_inputs((3,), 8, 2, torch.float32, ln=ln, device=device_of(backend))
    x, dw, db, uw, ub, lw, lb, res = inputs
    with pytest.raises((ValueError, RuntimeError), match=rf"adapter_bottleneck: eps must be >= 0, got {eps}"):
        adapter_bottleneck(x, dw, db, uw, ub, 1.0, "relu", lw, lb, eps, res, backend=backend)
