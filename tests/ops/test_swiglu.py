"""swiglu and geglu on every backend this machine runs, against their refs in fp64 (2x/3x rule)."""
import pytest
import torch

from llmkern.ops.swiglu import UNAVAILABLE, geglu, geglu_ref, swiglu, swiglu_ref
from llmkern.testing import assert_close_to_ref

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (name, op, ref, extra args)
ACTS = {"swiglu": (swiglu, swiglu_ref, ()), "geglu_tanh": (geglu, geglu_ref, ("tanh",)),
        "geglu_erf": (geglu, geglu_ref, ("none",))}


def make_inputs(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # gate spans the activation's curved part and both tails (|gate| up to ~12)
    gate = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    up = torch.randn(*shape, generator=g, dtype=torch.float64)
    gy = torch.randn(*shape, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (gate, up, gy)]


def run(fn, gate, up, gy, extra, **kw):
    ins = [t.detach().requires_grad_() for t in (gate, up)]
    out = fn(*ins, *extra, **kw)
    return out.detach(), list(torch.autograd.grad(out, ins, gy))


def check(backend, act, shape, dtype, noncontig=False):
    fn, ref_fn, extra = ACTS[act]
    dev = "cuda" if backend == "cuda" else "cpu"
    gate, up, gy = make_inputs(shape, dtype, dev)
    if noncontig:  # the two halves of one fused gate_up projection, as some models store them
        both = torch.cat([gate, up], -1)
        gate, up = both[..., : shape[-1]], both[..., shape[-1]:]
        assert not gate.is_contiguous()
    ours = run(fn, gate, up, gy, extra, backend=None if backend == "cuda" else backend)
    base = run(ref_fn, gate, up, gy, extra)
    ref = run(ref_fn, gate.double(), up.double(), gy.double(), extra)
    assert ours[0].dtype == dtype and ours[0].shape == gate.shape
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} {act} out")
    assert_close_to_ref(ours[1], ref[1], base[1], grad=True, name=f"{backend} {act} grads")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(1, 100), (97, 1031), (1025, 100)], ids=str)
def test_cpu_grid(dtype, act, shape):
    check("cpu", act, shape, dtype)


# The interpreter's numpy exp overflows to inf (and warns) in sigmoid's tail, which is then exactly 0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton", "ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_backends(backend, dtype, act):
    check(backend, act, (3, 33, 100), dtype)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_noncontiguous(backend):
    check(backend, "swiglu", (5, 7, 48), torch.float32, noncontig=True)
    check(backend, "geglu_tanh", (5, 7, 48), torch.bfloat16, noncontig=True)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_empty(backend):
    gate, up = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    out = swiglu(gate, up, backend=None if backend == "cuda" else backend)
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8)


def test_saves_gate_and_up_only():
    """Autograd keeps gate and up for the backward, never act(gate); eager also keeps silu(gate)."""
    gate, up = (t.requires_grad_() for t in make_inputs((64, 96), torch.float32)[:2])

    def saved(fn, **kw):
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: got.append(v) or v, lambda v: v):
            fn(gate, up, **kw)
        return {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in got}

    ours = saved(swiglu, backend="cpu")
    assert set(ours) == {gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()}
    assert sum(saved(swiglu_ref).values()) >= sum(ours.values()) + 64 * 96 * 4


def test_bad_input():
    gate, up, _ = make_inputs((3, 16), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :-1])
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(gate, up.half())
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        geglu(gate, up, "sigmoid")


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
def test_opcheck(ns):
    gate, up, gy = make_inputs((9, 24), torch.float32)
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.swiglu, (gate.requires_grad_(), up.requires_grad_()))
    torch.library.opcheck(op.geglu, (gate, up, "tanh"))
    torch.library.opcheck(op._swiglu_backward, (gy, gate.detach(), up.detach()))
    torch.library.opcheck(op._geglu_backward, (gy, gate.detach(), up.detach(), "none"))


def test_torch_compile_fullgraph():
    gate, up, _ = make_inputs((4, 33, 48), torch.float32)
    up.requires_grad_()

    def f(gate, up):
        return (swiglu(gate, up) + geglu(gate, up, "none")).square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(gate, up), f(gate, up))
    torch.testing.assert_close(torch.autograd.grad(compiled(gate, up), up)[0], torch.autograd.grad(f(gate, up), up)[0])
    fn = lambda g: geglu(g, up.detach()) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(gate), fn(gate))


def test_two_threads():
    torch.set_num_threads(2)
    check("cpu", "swiglu", (1025, 100), torch.float32)
    check("cpu", "geglu_erf", (513, 300), torch.bfloat16)
