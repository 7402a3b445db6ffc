"""The ops under torch.autocast: the "lower" policy of llmkern/ops/_backends.py.

Under autocast a user expects lora_linear and adapter_bottleneck to behave as the nn.Linear math they
replace: fp32 parameters and activations are cast to the autocast dtype, the GEMMs accumulate in
fp32, the result comes back in the autocast dtype and the gradients of the fp32 leaves in fp32.
Each backend is checked against the fp64 oracle on the cast inputs with the error rule
(llmkern.testing.assert_close_to_ref), the baseline being the unpatched math under autocast; the
dispatcher's autocast kernels are checked directly (torch.ops, every namespace) and under tracing.
"""
import pytest
import torch

from llmkern.ops import _backends
from llmkern.ops.adapter_bottleneck import adapter_bottleneck, adapter_bottleneck_ref
from llmkern.ops.lora_linear import lora_linear, lora_linear_ref
from llmkern.testing import assert_close_to_ref

import test_adapter_bottleneck as ta
import test_lora_linear as tl

AMP_DTYPES = [torch.bfloat16, torch.float16]


def grid(backends):
    """backend x autocast dtype: both dtypes on cpu and ref, bf16 on the slow emulator and Triton
    interpreter (their fp16 path is the same code, tested in their own suites)."""
    return [pytest.param(b.values[0], d, id=f"{b.id}-{str(d)[6:]}", marks=b.marks)
            for b in backends for d in AMP_DTYPES if d == torch.bfloat16 or b.id in ("cpu", "ref", "cuda")]


def grads_of(fn, leaves, gy, dtype, device):
    """fn's output and the gradients of `leaves` (fp32 tensors or None), run under autocast."""
    ins = [v.detach().requires_grad_() if v is not None else None for v in leaves]
    with torch.autocast(device, dtype=dtype):
        out = fn(*ins)
    present = [v for v in ins if v is not None]
    it = iter(torch.autograd.grad(out, present, gy.to(out.dtype)))
    return out.detach(), [next(it) if v is not None else None for v in ins]


@pytest.mark.parametrize("backend,dtype", grid(tl.backend_params() + [pytest.param("ref", id="ref")]))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_under_autocast(backend, dtype, p):
    dev = tl.device_of(backend)
    # fp32 master weights and activations, as HF Trainer(bf16=True) holds them.
    x, w, b, a, bb = tl.make_inputs((3, 37), 123, 45, 8, torch.float32, dev)
    gy = torch.randn(3, 37, 45, dtype=torch.float64).to(dev, dtype)
    scale, seed = 1.7, 1234
    ours = grads_of(lambda *t: lora_linear(*t, scale, p, seed, backend=backend), (x, w, b, a, bb), gy, dtype, dev)
    # The unpatched math (nn.Linear + PEFT's LoRA) under the same autocast.
    base = grads_of(lambda *t: lora_linear_ref(*t, scale, p, seed), (x, w, b, a, bb), gy, dtype, dev)
    # The oracle: fp64 on the inputs as autocast hands them to the GEMMs.
    d64 = [t.to(dtype).double() for t in (x, w, b, a, bb)]
    ref = tl.run(lora_linear_ref, *d64, scale, p, seed, gy.double())
    cond = tl.run(lora_linear_ref, *[t.abs() for t in d64], scale, p, seed, gy.double().abs())
    assert ours[0].dtype == dtype and base[0].dtype == dtype
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} y", cond=cond[0])
    for i, name in ((0, "grad_x"), (3, "grad_a"), (4, "grad_b")):
        assert ours[1][i].dtype == torch.float32, name  # the gradient of an fp32 leaf
        # The gradients were formed in `dtype` and cast up exactly: judge them in `dtype`.
        assert_close_to_ref(ours[1][i].to(dtype), ref[{0: 1, 3: 2, 4: 3}[i]], base[1][i].to(dtype), grad=True,
                            name=f"{backend} {name}", cond=cond[{0: 1, 3: 2, 4: 3}[i]])


@pytest.mark.parametrize("backend,dtype", grid(ta.backend_params() + [pytest.param("ref", id="ref")]))
@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
def test_adapter_bottleneck_under_autocast(backend, dtype, parallel):
    dev = ta.device_of(backend)
    inputs = ta.make_inputs((2, 19), 70, 8, torch.float32, parallel=parallel, device=dev)
    gy = torch.randn(2, 19, 70, dtype=torch.float64).to(dev, dtype)
    ours = grads_of(lambda *t: adapter_bottleneck(*t[:5], 1.3, "gelu", t[5], t[6], 1e-5, t[7], backend=backend),
                    inputs, gy, dtype, dev)
    # The baseline is plain PyTorch on the cast inputs: the unpatched module under autocast would run
    # its LayerNorm and residual add in fp32 (torch's autocast lists), which is no same-dtype baseline.
    cast = [v.to(dtype) if v is not None else None for v in inputs]
    base = ta.run(adapter_bottleneck_ref, cast, 1.3, "gelu", gy)
    ref = ta.run(adapter_bottleneck_ref, [v.double() if v is not None else None for v in cast], 1.3, "gelu",
                 gy.double())
    cond = ta.adapter_bottleneck_condition(cast, 1.3, "gelu", gy)
    assert ours[0].dtype == dtype
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} out", cond=cond[0])
    for name, o, rf, bs, cd in zip(ta.NAMES, ours[1], ref[1], base[1], cond[1:]):
        if o is not None:
            assert o.dtype == torch.float32, name
            assert_close_to_ref(o.to(dtype), rf, bs, grad=True, name=f"{backend} grad {name}", cond=cd)


def _lora_args(dtype):
    x, w, b, a, bb = tl.make_inputs((5, 33), 40, 24, 4, dtype)
    return (x, w, b, a, bb, 0.5, 0.2, torch.tensor(7), 0, 0, 40)


@pytest.mark.parametrize("ns", _backends.namespaces("lora_linear"))
def test_dispatcher_autocast_kernel_lora(ns):
    """torch.ops.<ns>.lora_linear under autocast casts its fp32 inputs (mixed with bf16 ones, as a
    bf16 activation meets fp32 weights) and equals the op on bf16 inputs; fp64 is left alone."""
    op = getattr(torch.ops, ns).lora_linear
    args = _lora_args(torch.float32)
    low = [t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
    want = op(*low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op(low[0], *args[1:])
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if ns != "llmkern_triton":  # Triton has no fp64
        d = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert op(*d)[0].dtype == torch.float64


@pytest.mark.parametrize("ns", _backends.namespaces("adapter_bottleneck"))
def test_dispatcher_autocast_kernel_adapter(ns):
    op = getattr(torch.ops, ns).adapter_bottleneck
    x, dw, db, uw, ub, lw, lb, _ = ta.make_inputs((9,), 33, 4, torch.float32)
    args = (x, dw, db, uw, ub, 1.0, "relu", lw, lb, 1e-5, None)
    low = [t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t for t in args]
    want = op(*low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = op(*args)
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_traced_autocast_fullgraph():
    """Under torch.compile(fullgraph=True) the autocast kernel is traced too: compiled equals eager."""
    x, w, b, a, bb = tl.make_inputs((5, 33), 40, 24, 4, torch.float32)

    def f(x, w, b, a, bb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lora_linear(x, w, b, a, bb, 0.5)

    want = f(x, w, b, a, bb)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, a, bb)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_register_op_rejects_unknown_policy():
    with pytest.raises(ValueError, match="autocast must be 'lower', 'fp32' or 'promote'"):
        _backends.register_op("no_such_op", fake=lambda *a: None, autocast="fp16")


def test_promote_policy_casts_to_the_widest():
    x16 = torch.ones(2, dtype=torch.bfloat16)
    x32 = torch.ones(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in _backends._cast_args("promote", "cpu", (x16, x32, 3))[:2]] == [torch.float32] * 2
        assert _backends._cast_args("promote", "cpu", (x16, x16))[0].dtype == torch.bfloat16
        assert _backends._cast_args("fp32", "cpu", (x16,))[0].dtype == torch.float32
    assert _backends._cast_args("fp32", "cpu", (x16,))[0].dtype == torch.bfloat16  # autocast off: unchanged
