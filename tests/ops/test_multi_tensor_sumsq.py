"""llmkern.ops.multi_tensor_sumsq on every backend this machine runs (cpu, the CUDA kernel under the
emulator, the Triton kernel in the interpreter, ref) against an fp64 oracle: dtypes, odd / transposed /
empty / scalar shapes, several 64Ki chunks and more tensors than one launch table holds, inf/nan
detection, determinism under the emulator's schedules, opcheck, torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

from llmkern.ops.multi_tensor_sumsq import UNAVAILABLE, multi_tensor_sumsq
from llmkern.ops._backends import BackendRefused
from llmkern.testing import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _emu():
    return pytest.param("emu", marks=pytest.mark.skipif("emu" in UNAVAILABLE, reason=UNAVAILABLE.get("emu", "")))


NAMESPACES = ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif("emu" in UNAVAILABLE, reason=UNAVAILABLE.get("emu", ""))),
              pytest.param("llmkern_triton", marks=pytest.mark.skipif("triton" in UNAVAILABLE,
                                                                      reason=UNAVAILABLE.get("triton", "")))]


def namespace(ns, request):
    """torch.ops.<ns>; the Triton op runs its kernels in the interpreter on CPU tensors."""
    if ns == "llmkern_triton":
        request.getfixturevalue("triton_interpret")
    return getattr(torch.ops, ns)


BACKENDS = ["cpu", "triton", "ref", _emu()]


@pytest.fixture
def backend_ready(request):
    """Turns the Triton interpreter on for the triton backend."""
    if request.node.callspec.params.get("backend") == "triton":
        request.getfixturevalue("triton_interpret")


def make_tensors(dtype, seed=0, scale=30.0):
    """70001 elements: two 64Ki chunks, the second partial; a transposed matrix; empty; a scalar.
    scale 30 puts fp16 squares up to ~1e5, past fp16's 65504, so an fp16 accumulator would fail."""
    g = torch.Generator().manual_seed(seed)
    ts = [(torch.randn(s, generator=g) * scale).to(dtype) for s in [(70001,), (33, 17), (0,), ()]]
    return ts + [(torch.randn(9, 4, generator=g) * scale).to(dtype).t()]


def oracle(ts):
    return sum(t.double().pow(2).sum() for t in ts).reshape(1)


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_fp64_oracle(backend, dtype):
    ts = make_tensors(dtype)
    out = multi_tensor_sumsq(ts, backend=backend)
    assert out.dtype == torch.float64 and out.shape == (1,) and out.device == ts[0].device
    # baseline: plain PyTorch in fp32 (the squares of the 16-bit values are exact in fp32)
    base = sum(t.float().pow(2).sum() for t in ts).reshape(1)
    assert_close_to_ref(out, oracle(ts), base, name=f"{backend} {dtype}")


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_span_several_launch_tables(backend):
    """300 tensors of mixed dtypes: more than one CUDA launch table holds (96 per dtype bucket), so
    partials of several launches and dtype buckets land in their own slots."""
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(1 + (7 * j) % 131, generator=g).to(DTYPES[j % 3]) for j in range(300)]
    out = multi_tensor_sumsq(ts, backend=backend)
    base = sum(t.float().pow(2).sum() for t in ts).reshape(1)
    assert_close_to_ref(out, oracle(ts), base, name=backend)


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad,where", [("inf", (0, 0)), ("-inf", (0, 65536)), ("nan", (0, 70000)), ("nan", (1, 40)),
                                       ("-inf", (3, None)), ("nan", (3, None))], ids=str)
def test_non_finite_element_gives_non_finite_sum(backend, dtype, bad, where):
    """At the first element, the first of the second chunk, the last, inside the transposed matrix
    and as the scalar: inf gives inf, nan gives nan."""
    ts = make_tensors(dtype)
    j, i = where
    if i is None:
        ts[j].fill_(float(bad))
    else:
        ts[j].view(-1)[i] = float(bad)
    out = multi_tensor_sumsq(ts, backend=backend)
    if bad == "nan":
        assert torch.isnan(out).all(), out
    else:
        assert torch.isposinf(out).all(), out


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_fp16_values_stay_finite(backend):
    """65504^2 = 4.3e9 per element: finite in the fp32 accumulator (the fp16 norm would be inf)."""
    ts = [torch.full((4097,), 65504.0, dtype=torch.float16)]
    out = multi_tensor_sumsq(ts, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), oracle(ts), rtol=1e-6, atol=0)


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [2e19, 1e36], ids=["2e19", "1e36"])
def test_large_finite_values_give_a_finite_sum(backend, dtype, scale):
    """Finite fp32/bf16 gradients whose squares pass fp32's 3.4e38 (|x| > 1.8e19): the float64 result is
    finite, and as accurate as plain PyTorch's fp32 sum of squares of the values scaled into range by
    2^-96 (exact in binary). An fp32 result was inf, and the optimizers skipped such steps as overflows."""
    g = torch.Generator().manual_seed(5)
    ts = [(torch.randn(s, generator=g) * scale).to(dtype) for s in [(1025,), (97,), (0,)]]
    ts.append((torch.randn(9, 4, generator=g) * scale).to(dtype).t())
    out = multi_tensor_sumsq(ts, backend=backend)
    assert out.dtype == torch.float64 and torch.isfinite(out).all(), out
    base = sum((t.float() * 2.0 ** -96).pow(2).sum() for t in ts).double().reshape(1) * 2.0 ** 192
    assert torch.isfinite(base).all()
    assert_close_to_ref(out, oracle(ts), base, name=backend)


@pytest.mark.skipif("emu" in UNAVAILABLE, reason=UNAVAILABLE.get("emu", ""))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernel_is_schedule_independent(dtype, monkeypatch):
    """The block reduction (warp shuffles, shared memory, __syncthreads) under the forward, reverse
    and random thread schedules: each result is within the error rule and all are bit-identical."""
    ts = make_tensors(dtype, seed=5)
    base = sum(t.float().pow(2).sum() for t in ts).reshape(1)
    outs = []
    for schedule in ("forward", "reverse", "random:7"):
        monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)
        outs.append(multi_tensor_sumsq(ts, backend="emu"))
        assert_close_to_ref(outs[-1], oracle(ts), base, name=f"emu {schedule}")
    assert all(torch.equal(outs[0], o) for o in outs[1:]), outs


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck(ns, request):
    finite = [torch.randn(97).half(), torch.randn(33, 17).bfloat16(), torch.randn(9, 4).t()]
    torch.library.opcheck(namespace(ns, request).multi_tensor_sumsq.default, (finite,))


@pytest.mark.parametrize("ns", ["llmkern", NAMESPACES[2]])
def test_torch_compile_fullgraph(ns, request):
    ts = [torch.randn(97), torch.randn(33, 17).half()]
    op = namespace(ns, request).multi_tensor_sumsq

    @torch.compile(fullgraph=True, backend="aot_eager")
    def norm(xs):
        return op(xs).sqrt()

    torch.testing.assert_close(norm(ts), op(ts).sqrt(), rtol=0, atol=0)


def test_empty_list_is_zero():
    out = multi_tensor_sumsq([])
    assert out.shape == (1,) and float(out) == 0.0


@pytest.mark.usefixtures("backend_ready")
@pytest.mark.parametrize("backend", ["cpu", "triton", _emu()])
@pytest.mark.parametrize("what,message", [
    ("strided", "must be dense"),
    ("float64", "must be float32, float16 or bfloat16, got Double|got torch.float64"),
    ("meta", "tensors\\[1\\] is on meta but tensors\\[0\\] is on cpu"),
])
def test_bad_input(backend, what, message):
    ts = [torch.randn(5), torch.randn(10)]
    ts[1] = {"strided": ts[1][::2], "float64": ts[1].double(), "meta": ts[1].to("meta")}[what]
    with pytest.raises(ValueError if what == "meta" else RuntimeError, match=message):
        multi_tensor_sumsq(ts, backend=backend)
    with pytest.raises(BackendRefused, match="dtype torch.float64"):  # the first tensor is probed
        multi_tensor_sumsq([torch.randn(3).double()], backend=backend)
