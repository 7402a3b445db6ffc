"""layer_norm on every backend this machine runs, against F.layer_norm in fp64 (2x/3x rule), with and
without weight and bias."""
import pytest
import torch

from llmkern.ops.layer_norm import UNAVAILABLE, layer_norm, layer_norm_ref
from llmkern.testing import assert_close_to_ref

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINE = {"affine": (True, True), "nobias": (True, False), "none": (False, False)}


def make_inputs(lead, c, dtype, affine, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    has_w, has_b = AFFINE[affine]
    x = torch.randn(*lead, c, generator=g, dtype=torch.float64) * 2 + 0.5  # a mean for LayerNorm to remove
    w = 1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64) if has_w else None
    b = 0.1 * torch.randn(c, generator=g, dtype=torch.float64) if has_b else None
    return [t.to(device, dtype) if t is not None else None for t in (x, w, b)]


def run(fn, x, w, b, gy, **kw):
    ins = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(ins[0], ins[1], ins[2], 1e-5, **kw)
    present = [t for t in ins if t is not None]
    grads = iter(torch.autograd.grad(y, present, gy))
    return y.detach(), [next(grads) if t is not None else None for t in ins]


def check(backend, lead, c, dtype, affine, noncontig=False):
    dev = "cuda" if backend == "cuda" else "cpu"
    x, w, b = make_inputs(lead, c, dtype, affine, dev)
    if noncontig:
        x = torch.cat([x, x], -1)[..., 1::2]
        assert not x.is_contiguous()
    gy = torch.randn(*lead, c, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev, dtype)
    ours = run(layer_norm, x, w, b, gy, backend=None if backend == "cuda" else backend)
    base = run(layer_norm_ref, x, w, b, gy)
    ref = run(layer_norm_ref, *(t.double() if t is not None else None for t in (x, w, b, gy)))
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} y")
    for name, o, rf, bs in zip(("x", "weight", "bias"), ours[1], ref[1], base[1]):
        assert_close_to_ref(o, rf, bs, grad=True, name=f"{backend} grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("t,c", [(1, 100), (97, 1031), (1025, 100)])
def test_cpu_grid(dtype, affine, t, c):
    check("cpu", (t,), c, dtype, affine)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", list(AFFINE))
def test_backends(backend, dtype, affine):
    check(backend, (3, 33), 100, dtype, affine)


# Triton under the interpreter: a case costs 6-8 s on the shared machine whether it has 33 or 99 rows
# (the interpreter's per-launch setup dominates), so every dtype runs with weight and bias, and the
# two other affine modes (branches on constexprs, independent of the dtype's loads and stores) in bf16.
TRITON_CASES = [(torch.float32, "affine"), (torch.float16, "affine"), (torch.bfloat16, "affine"),
                (torch.bfloat16, "nobias"), (torch.bfloat16, "none")]


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton",)))
@pytest.mark.parametrize("dtype,affine", TRITON_CASES, ids=[f"{d}-{a}" for d, a in TRITON_CASES])
def test_triton(backend, dtype, affine):
    check(backend, (3, 33), 100, dtype, affine)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("cpu", "triton", "cuda")))
def test_long_and_odd_rows(backend):
    """T = 1025 rows and C = 1031 (a 2048 block). The interpreter runs one program per row at a few ms
    each, so Triton gets T = 300 (the backward's programs then take 2 rows each) and C = 1031 apart."""
    if backend == "cpu":
        check(backend, (1025,), 1031, torch.bfloat16, "affine")
    else:
        check(backend, (300,), 40, torch.bfloat16, "affine")
        check(backend, (5,), 1031, torch.bfloat16, "affine")


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_noncontiguous(backend):
    check(backend, (5, 7), 48, torch.float32, "affine", noncontig=True)
    check(backend, (5, 7), 48, torch.float16, "nobias", noncontig=True)
    check(backend, (9,), 48, torch.bfloat16, "affine", noncontig=True)  # 2-D: passed to the op unreshaped


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_empty_batch(backend):
    x, w, b = (t.requires_grad_() for t in make_inputs((0,), 16, torch.float32, "affine"))
    y = layer_norm(x, w, b, backend=None if backend == "cuda" else backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_gpt2_layer_norm_module():
    """nn.LayerNorm as GPT-2 uses it (eps 1e-5, fp32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        m = torch.nn.LayerNorm(64).to(dtype)
        torch.nn.init.normal_(m.weight, 1.0, 0.1)
        torch.nn.init.normal_(m.bias, 0.0, 0.1)
        x = torch.randn(3, 11, 64).to(dtype)
        ref = layer_norm_ref(x.double(), m.weight.double(), m.bias.double(), m.eps)
        assert_close_to_ref(layer_norm(x, m.weight, m.bias, m.eps, backend="cpu"), ref, m(x).detach())


def test_bad_input():
    x, w, b = make_inputs((3,), 16, torch.float32, "affine")
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(16,\)"):
        layer_norm(x, w[:-1], b)
    with pytest.raises(ValueError, match="a bias needs a weight"):
        layer_norm(x, None, b)
    with pytest.raises(TypeError, match="same dtype"):
        layer_norm(x, w.half(), b)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
@pytest.mark.parametrize("affine", list(AFFINE))
def test_opcheck(ns, affine):
    x, w, b = (t.requires_grad_() if t is not None else None for t in make_inputs((9,), 24, torch.float32, affine))
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.layer_norm, (x, w, b, 1e-5))
    with torch.no_grad():
        y, mean, rstd = op.layer_norm(x, w, b, 1e-5)
    wd = w.detach() if w is not None else None
    torch.library.opcheck(op._layer_norm_backward, (torch.randn_like(y), x.detach(), wd, mean, rstd, b is not None))


def test_torch_compile_fullgraph():
    x, w, b = make_inputs((4, 33), 48, torch.float32, "affine")
    w.requires_grad_()

    def f(x, w):
        return layer_norm(x, w, b).square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), f(x, w))
    torch.testing.assert_close(torch.autograd.grad(compiled(x, w), w)[0], torch.autograd.grad(f(x, w), w)[0])
    fn = lambda x: layer_norm(x, w.detach(), b) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


def test_two_threads():
    """The CPU kernels split rows across threads (per-thread dw/db partials) above 64K elements."""
    torch.set_num_threads(2)
    check("cpu", (1025,), 100, torch.float32, "affine")
    check("cpu", (513,), 300, torch.bfloat16, "nobias")
