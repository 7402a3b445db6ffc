"""fused_linear_cross_entropy on every backend this machine runs, against lm_head + F.cross_entropy in
fp64 (2x/3x rule), over several chunks of tokens; its peak extra memory is O(chunk·V), not O(T·V)."""
import pytest
import torch

from llmkern.ops.fused_linear_cross_entropy import (UNAVAILABLE, chunk_size_for, fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_ref)
from llmkern.testing import assert_close_to_ref
from llmkern.testing.memory import peak_bytes

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def make_inputs(lead, c, v, dtype, device="cpu", ignore_every=4, seed=0):
    """hidden ~ N(0, 1), a head with std 2/sqrt(C) (logits of std ~2), labels with some ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, c, generator=g, dtype=torch.float64).to(device, dtype)
    weight = (torch.randn(v, c, generator=g, dtype=torch.float64) * 2 / c ** 0.5).to(device, dtype)
    labels = torch.randint(0, v, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = IGNORE
    return hidden, weight, labels.to(device)


def run(fn, hidden, weight, labels, gy, train_weight=True, **kw):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(train_weight)
    loss = fn(h, w, labels, ignore_index=IGNORE, **kw)
    ins = [h, w] if train_weight else [h]
    grads = list(torch.autograd.grad(loss, ins, gy))
    return loss.detach(), grads + ([] if train_weight else [None])


def check(backend, lead, c, v, dtype, reduction="mean", chunk_size=None, train_weight=True, smoothing=0.0, z=0.0,
          noncontig=False):
    dev = "cuda" if backend == "cuda" else "cpu"
    hidden, weight, labels = make_inputs(lead, c, v, dtype, dev)
    if noncontig:
        hidden = torch.cat([hidden, hidden], -1)[..., ::2]
        assert not hidden.is_contiguous()
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z)
    gy = torch.randn(lead, dtype=torch.float64).to(dev) if reduction == "none" else torch.tensor(0.75, device=dev)
    ours = run(fused_linear_cross_entropy, hidden, weight, labels, gy.float(), train_weight,
               backend=None if backend == "cuda" else backend, chunk_size=chunk_size, **kw)
    base = run(fused_linear_cross_entropy_ref, hidden, weight, labels, gy.float(), train_weight, **kw)
    ref = run(fused_linear_cross_entropy_ref, hidden.double(), weight.double(), labels, gy.double(), train_weight,
              **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref[0].shape
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} loss")
    assert_close_to_ref(ours[1], ref[1], base[1], grad=True, name=f"{backend} grads (hidden, weight)")


# CPU: T = 1, 97, 1025 tokens; chunks of 32 (4 and 33 chunks: grad_weight accumulates across them, a
# 16-bit one without and with its compensation term),
# C not a multiple of 16; V = 1, 97, 32003.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,c,v,chunk", [((1,), 40, 1, None), ((97,), 100, 97, 32), ((1025,), 24, 97, 32),
                                            ((2, 3), 40, 32003, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_grid(dtype, lead, c, v, chunk, reduction):
    check("cpu", lead, c, v, dtype, reduction, chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_frozen_head_smoothing_z_loss(dtype):
    """A frozen head (LoRA) gets no gradient and costs none; label smoothing and z-loss pass through."""
    check("cpu", (97,), 100, 300, dtype, "mean", 20, train_weight=False, smoothing=0.1, z=1e-4)
    check("cpu", (5, 7), 100, 300, dtype, "none", 8, smoothing=0.1, z=1e-4)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton", "ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends(backend, dtype):
    check(backend, (2, 3), 40, 32003, dtype, "mean", 4)
    check(backend, (33,), 100, 97, dtype, "none", 8, smoothing=0.1, z=1e-4)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_noncontiguous(backend):
    check(backend, (4, 9), 48, 300, torch.float32, "mean", 16, noncontig=True)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_every_label_ignored_and_empty(backend):
    b = None if backend == "cuda" else backend
    hidden, weight, labels = make_inputs((6,), 16, 20, torch.float32)
    labels[:] = IGNORE
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, backend=b)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    h0 = torch.zeros(0, 16, requires_grad=True)
    loss = fused_linear_cross_entropy(h0, w, torch.zeros(0, dtype=torch.long), reduction="sum", backend=b)
    loss.backward()
    assert loss.item() == 0.0 and h0.grad.shape == (0, 16)


def test_chunk_size_for():
    assert chunk_size_for(2048, 128256, 2, 128 << 20) == 512  # 128 MiB of bf16 logits
    assert chunk_size_for(2048, 32000, 2, 128 << 20) == 2048  # everything fits: one chunk
    assert chunk_size_for(1000, 1000, 4, 4000 * 300) == 250  # 300 rows fit: 4 equal chunks, not 300+300+300+100
    assert chunk_size_for(10, 10 ** 9, 2, 1) == 1
    # A trained head: at most C / 4 tokens (4 chunks at T = C = 2048), at least 256.
    assert chunk_size_for(2048, 32000, 2, 128 << 20, trained_head_c=2048) == 512
    assert chunk_size_for(2048, 128256, 4, 128 << 20, trained_head_c=2048) == 256  # the buffer's cap is lower
    assert chunk_size_for(1000, 50, 4, 128 << 20, trained_head_c=64) == 250  # 256 rows: 4 equal chunks


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("cpu", "triton")))
def test_peak_memory_is_chunk_times_v(backend):
    """T = 256, V = 2048, C = 32, fp32, head frozen: the (T, V) logits are 2 MiB. The fused op holds one
    (chunk, V) buffer (chunk = 32: 256 KiB) plus O(T·C): its peak stays near chunk·V, and doubling T
    leaves it unchanged, while the unfused path grows with T·V."""
    t, c, v, chunk = 256, 32, 2048, 32

    def fused(tokens):
        hidden, weight, labels = make_inputs((tokens,), c, v, torch.float32)
        h = hidden.requires_grad_()
        return lambda: fused_linear_cross_entropy(h, weight, labels, chunk_size=chunk, backend=backend).backward()

    def eager(tokens):
        hidden, weight, labels = make_inputs((tokens,), c, v, torch.float32)
        h = hidden.requires_grad_()
        return lambda: fused_linear_cross_entropy_ref(h, weight, labels).backward()

    ours, ours2 = peak_bytes(fused(t)), peak_bytes(fused(2 * t))
    theirs = peak_bytes(eager(t))
    chunk_bytes, logits_bytes = chunk * v * 4, t * v * 4
    assert ours <= 2 * chunk_bytes + 8 * t * c * 4 + 64 * 1024, (ours, chunk_bytes)
    assert ours2 <= ours + 2 * t * c * 4 + 64 * 1024, (ours, ours2)  # grows with T·C, not T·V
    assert theirs >= 2 * logits_bytes, theirs

    # A trained head: the gradients the forward forms are the backward's, scaled in place, and no zero
    # gradient is materialized for them: the peak is grad_weight + grad_hidden + the buffer (+ 16 KiB of
    # small tensors), where the out-of-place scale and the zeros held grad_weight three times.
    hidden, weight, labels = make_inputs((t,), c, v, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    trained = peak_bytes(
        lambda: fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, backend=backend).backward())
    assert trained <= v * c * 4 + t * c * 4 + chunk_bytes + 16 * 1024, trained


def test_scaling_is_fp32():
    """The backward scales the bf16 gradients formed in the forward by the fp32 incoming gradient in fp32
    (a bf16 copy of 1/3 is 0.3340, 0.2% off on every element)."""
    hidden, weight, labels = make_inputs((64,), 32, 50, torch.bfloat16)
    third = torch.tensor(1 / 3)
    got = run(fused_linear_cross_entropy, hidden, weight, labels, third, backend="cpu", reduction="sum")[1]
    one = run(fused_linear_cross_entropy, hidden, weight, labels, torch.tensor(1.0), backend="cpu", reduction="sum")[1]
    for g, o in zip(got, one):
        assert torch.equal(g, (o.float() * third).to(torch.bfloat16))
        assert not torch.equal(g, o * third.to(torch.bfloat16))


def test_backward_twice():
    """retain_graph: a second backward through the same forward gives the same gradients (the first
    scaled a copy; the second, which frees the graph, scales the forward's gradients in place)."""
    hidden, weight, labels = make_inputs((8,), 16, 20, torch.float32)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, backend="cpu") * 3
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h, w))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_input():
    hidden, weight, labels = make_inputs((4,), 16, 10, torch.float32, ignore_every=0)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, C\) = \(V, 16\)"):
        fused_linear_cross_entropy(hidden, weight[:, :-1], labels)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_cross_entropy(hidden, weight.half(), labels)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 10 is outside"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 10, 1, 1]), backend="cpu")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
def test_opcheck(ns):
    hidden, weight, labels = make_inputs((9,), 16, 33, torch.float32)
    op = getattr(torch.ops, ns)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(op.fused_linear_cross_entropy, (h, w, labels, IGNORE, 0.1, 1e-4, "sum", 4, True, True))
    torch.library.opcheck(op.fused_linear_cross_entropy, (h, w, labels, IGNORE, 0.0, 0.0, "none", 4, False, False))
    torch.library.opcheck(op._fused_linear_cross_entropy_backward,
                          (torch.randn(9), hidden.detach(), weight.detach(), labels, IGNORE, 0.0, 0.0, 4, True, True))
    torch.library.opcheck(op._fused_linear_cross_entropy_scale,
                          (torch.randn(9, 16), torch.randn(33, 16), torch.tensor(0.5)))
    torch.library.opcheck(op._fused_linear_cross_entropy_scale_,
                          (torch.randn(9, 16), torch.randn(33, 16), torch.tensor(0.5)))


def test_torch_compile_fullgraph():
    hidden, weight, labels = make_inputs((4, 9), 16, 50, torch.float32)
    w = weight.requires_grad_()

    def f(w):
        return fused_linear_cross_entropy(hidden, w, labels, chunk_size=8) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(w), f(w))
    torch.testing.assert_close(torch.autograd.grad(compiled(w), w)[0], torch.autograd.grad(f(w), w)[0])
    fn = lambda h: fused_linear_cross_entropy(h, weight.detach(), labels, reduction="none") + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(hidden), fn(hidden))


def test_two_threads():
    torch.set_num_threads(2)
    check("cpu", (257,), 64, 1031, torch.float32, "mean", 64)
    check("cpu", (257,), 64, 1031, torch.bfloat16, "none", 64)
