"""rms_norm on every backend this machine runs, against rms_norm_ref in fp64 (the 2x/3x rule of
llmkern.testing.assert_close_to_ref), in both conventions, with and without the fused residual add."""
import pytest
import torch

from llmkern.ops.rms_norm import UNAVAILABLE, rms_norm, rms_norm_ref
from llmkern.testing import assert_close_to_ref

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def op_backend(backend):
    """The backend= argument (the cuda case runs the automatic choice, Triton, on CUDA tensors)."""
    return None if backend == "cuda" else backend


def make_inputs(lead, c, dtype, convention, residual, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c, generator=g, dtype=torch.float64) * 2 + 0.3
    w = torch.randn(c, generator=g, dtype=torch.float64) * 0.2 + (1.0 if convention == "llama" else 0.0)
    r = torch.randn(*lead, c, generator=g, dtype=torch.float64) if residual else None
    return [t.to(device, dtype) if t is not None else None for t in (x, w, r)]


def run(fn, x, w, r, gy, gr, convention, **kw):
    """(y, new residual or None) and the gradients of x, w, residual."""
    ins = [t.detach().requires_grad_() if t is not None else None for t in (x, w, r)]
    out = fn(ins[0], ins[1], 1e-6, residual=ins[2], convention=convention, **kw)
    outs = (out, None) if r is None else out
    loss = (outs[0] * gy).sum() + ((outs[1] * gr).sum() if r is not None else 0)
    present = [t for t in ins if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return [o.detach() if o is not None else None for o in outs], [next(grads) if t is not None else None for t in ins]


def check(backend, lead, c, dtype, convention, residual, noncontig=False):
    dev = "cuda" if backend == "cuda" else "cpu"
    x, w, r = make_inputs(lead, c, dtype, convention, residual, dev)
    if noncontig:  # every other column of a wider tensor
        x = torch.cat([x, x], -1)[..., ::2]
        assert not x.is_contiguous()
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(*lead, c, generator=g, dtype=torch.float64).to(dev, dtype)
    gr = torch.randn(*lead, c, generator=g, dtype=torch.float64).to(dev, dtype)
    ours = run(rms_norm, x, w, r, gy, gr, convention, backend=op_backend(backend))
    base = run(rms_norm_ref, x, w, r, gy, gr, convention)
    ref = run(rms_norm_ref, *(t.double() if t is not None else None for t in (x, w, r, gy, gr)), convention)
    assert ours[0][0].dtype == dtype and ours[0][0].shape == x.shape
    for name, o, rf, b in zip(("y", "new residual"), ours[0], ref[0], base[0]):
        assert_close_to_ref(o, rf, b, name=f"{backend} {name}")
    for name, o, rf, b in zip(("x", "weight", "residual"), ours[1], ref[1], base[1]):
        assert_close_to_ref(o, rf, b, grad=True, name=f"{backend} grad {name}")


# The C++ CPU backend on the whole grid: T = 1, 97, 1025 rows; C = 100 and 1031 (not multiples of 16).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("convention", ["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("t,c", [(1, 100), (97, 1031), (1025, 100)])
def test_cpu_grid(dtype, convention, residual, t, c):
    check("cpu", (t,), c, dtype, convention, residual)


# ref and cuda: every dtype, convention and residual on fewer rows.
@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("convention", ["llama", "gemma"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_backends(backend, dtype, convention, residual):
    check(backend, (3, 33), 100, dtype, convention, residual)


# Triton under the interpreter: a case costs 4-8 s on the shared machine whether it has 33 or 99 rows
# (the interpreter's per-launch setup dominates), so it runs a pairwise cover of dtype x convention x
# residual: every pair of values in some case, 6 cases instead of 12.
PAIRWISE = [(torch.float32, "llama", False), (torch.float32, "gemma", True), (torch.float16, "llama", True),
            (torch.float16, "gemma", False), (torch.bfloat16, "llama", True), (torch.bfloat16, "gemma", False)]


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton",)))
@pytest.mark.parametrize("dtype,convention,residual", PAIRWISE,
                         ids=[f"{d}-{c}-{'residual' if r else 'plain'}" for d, c, r in PAIRWISE])
def test_triton(backend, dtype, convention, residual):
    check(backend, (3, 33), 100, dtype, convention, residual)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("cpu", "triton", "cuda")))
def test_long_and_odd_rows(backend):
    """T = 1025 rows and C = 1031 (a 2048 block). The interpreter runs one program per row at a few ms
    each, so Triton gets T = 300 (the backward's programs then take 2 rows each) and C = 1031 apart."""
    if backend == "cpu":
        check(backend, (1025,), 1031, torch.bfloat16, "llama", True)
    else:
        check(backend, (300,), 40, torch.bfloat16, "llama", True)
        check(backend, (5,), 1031, torch.bfloat16, "llama", True)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_noncontiguous(backend):
    check(backend, (5, 7), 48, torch.float32, "llama", True, noncontig=True)
    check(backend, (5, 7), 48, torch.bfloat16, "gemma", False, noncontig=True)
    check(backend, (9,), 48, torch.bfloat16, "llama", True, noncontig=True)  # 2-D: passed to the op unreshaped


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_empty_batch(backend):
    x, w, r = (t.requires_grad_() for t in make_inputs((0,), 16, torch.float32, "llama", True))
    y, s = rms_norm(x, w, residual=r, backend=op_backend(backend))
    assert y.shape == s.shape == (0, 16)
    (y.sum() + s.sum()).backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("cpu", "triton")))
def test_matches_transformers_modules(backend):
    """The HF modules themselves, in bf16: LlamaRMSNorm (cast before the weight) and GemmaRMSNorm ((1 + w)
    in fp32); the llama convention reproduces LlamaRMSNorm bit for bit but for the last bit of rstd."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for cls, convention in ((LlamaRMSNorm, "llama"), (GemmaRMSNorm, "gemma")):
        m = cls(96, eps=1e-5).to(torch.bfloat16)
        torch.nn.init.normal_(m.weight, 0.5, 0.2)
        x = torch.randn(4, 9, 96).to(torch.bfloat16)
        ours = rms_norm(x, m.weight, 1e-5, convention=convention, backend=backend)
        ref = rms_norm_ref(x.double(), m.weight.double(), 1e-5, convention=convention)
        assert_close_to_ref(ours, ref, m(x), name=cls.__name__)
    del transformers


def test_rstd_and_saved_tensors():
    """Autograd keeps s (x, or the new residual that the caller holds anyway) and rstd (T) fp32 only."""
    x, w, r = (t.requires_grad_() for t in make_inputs((64,), 96, torch.float32, "llama", True))
    got = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: got.append(v) or v, lambda v: v):
        y, s = rms_norm(x, w, residual=r, backend="cpu")
    shapes = sorted(tuple(v.shape) for v in got if v.data_ptr() != w.data_ptr())
    assert shapes == [(64,), (64, 96)]
    assert any(v.data_ptr() == s.data_ptr() for v in got)


BAD = [
    (lambda x, w, r: (x, w[:-1], r), ValueError, r"weight must have shape \(C,\) = \(16,\)"),
    (lambda x, w, r: (x, w.double(), r), TypeError, "same dtype"),
    (lambda x, w, r: (x, w, r[:, :-1]), ValueError, "residual must have x's shape"),
    (lambda x, w, r: (x.int(), w.int(), r), TypeError, "float32, float16, bfloat16"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    f, exc, msg = BAD[case]
    x, w, r = f(*make_inputs((3,), 16, torch.float32, "llama", True))
    with pytest.raises(exc, match=msg):
        rms_norm(x, w, residual=r)
    with pytest.raises(ValueError, match="convention must be one of"):
        rms_norm(*make_inputs((3,), 16, torch.float32, "llama", False)[:2], convention="t5")


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(ns, residual):
    x, w, r = (t.requires_grad_() if t is not None else None
               for t in make_inputs((9,), 24, torch.float32, "gemma", residual))
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.rms_norm, (x, w, 1e-6, "gemma", r))
    with torch.no_grad():
        y, s, rstd = op.rms_norm(x, w, 1e-6, "llama", r)
    xs = s if residual else x.detach()
    torch.library.opcheck(op._rms_norm_backward, (torch.randn_like(y), torch.randn_like(y) if residual else None, xs,
                                                  w.detach(), rstd, "llama"))


def test_torch_compile_fullgraph():
    x, w, r = make_inputs((4, 33), 48, torch.float32, "llama", True)
    w.requires_grad_()

    def f(x, w):
        y, s = rms_norm(x, w, 1e-6, residual=r)
        return (y * s).mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), f(x, w))
    torch.testing.assert_close(torch.autograd.grad(compiled(x, w), w)[0], torch.autograd.grad(f(x, w), w)[0])
    fn = lambda x: rms_norm(x, w.detach(), convention="gemma") * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


def test_two_threads():
    """The CPU kernels split rows across threads (per-thread dw partials) above 64K elements."""
    torch.set_num_threads(2)
    check("cpu", (1025,), 100, torch.float32, "llama", True)
    check("cpu", (513,), 300, torch.bfloat16, "gemma", False)
