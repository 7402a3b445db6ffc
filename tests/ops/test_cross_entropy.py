"""cross_entropy on every backend this machine runs, against F.cross_entropy (plus z·lse²) in fp64
(2x/3x rule): ignore_index, label smoothing, z-loss, the three reductions, V = 1, 97, 32003."""
import pytest
import torch
import torch.nn.functional as F

from llmkern.ops.cross_entropy import UNAVAILABLE, cross_entropy, cross_entropy_ref
from llmkern.testing import assert_close_to_ref

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def make_inputs(lead, v, dtype, device="cpu", ignore_every=5, seed=0):
    """Logits with a spread like an LM's (std 3), labels with every ignore_every-th one ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, v, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    labels = torch.randint(0, v, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = IGNORE
    return logits, labels.to(device)


def run(fn, logits, labels, gy, **kw):
    x = logits.detach().requires_grad_()
    loss = fn(x, labels, ignore_index=IGNORE, **kw)
    (g,) = torch.autograd.grad(loss, x, gy)
    return loss.detach(), g


def check(backend, lead, v, dtype, reduction="mean", smoothing=0.0, z=0.0, noncontig=False, ignore_every=5):
    dev = "cuda" if backend == "cuda" else "cpu"
    logits, labels = make_inputs(lead, v, dtype, dev, ignore_every)
    if noncontig:  # rows of a wider (…, V + 3) buffer
        logits = torch.cat([logits, logits[..., :3]], -1)[..., :v]
        assert not logits.is_contiguous()
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z)
    gy = torch.randn(lead, dtype=torch.float64).to(dev) if reduction == "none" else torch.tensor(1.7, device=dev)
    ours = run(cross_entropy, logits, labels, gy.float(), backend=None if backend == "cuda" else backend, **kw)
    base = run(cross_entropy_ref, logits, labels, gy.float(), **kw)
    ref = run(cross_entropy_ref, logits.double(), labels, gy.double(), **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref[0].shape
    assert ours[1].dtype == dtype
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} loss")
    assert_close_to_ref(ours[1], ref[1], base[1], grad=True, name=f"{backend} grad logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,v", [((1,), 1), ((97,), 97), ((1025,), 97), ((2, 5), 32003)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_grid(dtype, lead, v, reduction):
    check("cpu", lead, v, dtype, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smoothing,z", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
def test_cpu_smoothing_and_z_loss(dtype, smoothing, z):
    check("cpu", (97,), 1031, dtype, "mean", smoothing, z)
    check("cpu", (3,), 32003, dtype, "none", smoothing, z)


# Triton under the interpreter: a row is a loop over V in 2048-wide chunks, so keep the rows few.
@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton", "ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends(backend, dtype):
    check(backend, (2, 3), 32003, dtype, "mean", 0.1, 1e-4)
    check(backend, (97,), 97, dtype, "none")
    check(backend, (1,), 1, dtype, "sum")


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_noncontiguous(backend):
    check(backend, (4, 9), 300, torch.float32, noncontig=True)
    check(backend, (4, 9), 300, torch.bfloat16, "none", noncontig=True)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_every_label_ignored(backend):
    """As torch: mean over no valid label is NaN with a zero gradient; sum is 0."""
    logits, labels = make_inputs((6,), 40, torch.float32, ignore_every=1)
    b = None if backend == "cuda" else backend
    x = logits.requires_grad_()
    loss = cross_entropy(x, labels, backend=b)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert cross_entropy(logits, labels, reduction="sum", backend=b).item() == 0.0
    torch.testing.assert_close(cross_entropy(logits, labels, reduction="none", backend=b), torch.zeros(6))


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_empty_batch(backend):
    x = torch.zeros(0, 7, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    b = None if backend == "cuda" else backend
    assert torch.isnan(cross_entropy(x, y, backend=b)) == torch.isnan(F.cross_entropy(x, y))
    loss = cross_entropy(x, y, reduction="sum", backend=b)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 7)


def test_saves_no_softmax():
    """Autograd keeps the logits themselves (the caller's tensor: no new memory), the labels and lse (T)
    fp32; eager keeps fp32 log-probabilities, a new (T, V) tensor of 4 bytes per logit."""
    logits, labels = make_inputs((64,), 1000, torch.bfloat16)
    x = logits.requires_grad_()

    def saved(fn, **kw):
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: got.append(v) or v, lambda v: v):
            fn(x, labels, **kw)
        return {v.untyped_storage().data_ptr(): v for v in got if v.untyped_storage().data_ptr() !=
                x.untyped_storage().data_ptr()}

    ours = saved(cross_entropy, backend="cpu")
    # lse (T) fp32, the labels (T) and the mean's count (a 0-d int64), besides the logits themselves
    assert sum(v.untyped_storage().nbytes() for v in ours.values()) <= 64 * 4 + 64 * 8 + 8
    eager = saved(cross_entropy_ref)
    assert any(v.dtype == torch.float32 and v.shape == (64, 1000) for v in eager.values())


def test_bad_input():
    logits, labels = make_inputs((4,), 10, torch.float32, ignore_every=0)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 10 is outside \[0, V\) = \[0, 10\)"):
        cross_entropy(logits, torch.tensor([1, 2, 10, 3]), backend="cpu")
    with pytest.raises(ValueError, match="labels must have shape"):
        cross_entropy(logits, labels[:3])
    with pytest.raises(TypeError, match="labels must be int64"):
        cross_entropy(logits, labels.int())
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, labels, reduction="avg")


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton",)))
def test_bad_label_triton(backend):
    logits, _ = make_inputs((4,), 10, torch.float32, ignore_every=0)
    with pytest.raises(ValueError, match=r"labels\[0\] = -1 is outside"):
        cross_entropy(logits, torch.tensor([-1, 2, 3, 3]), backend=backend)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
def test_opcheck(ns):
    logits, labels = make_inputs((9,), 33, torch.float32)
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.cross_entropy, (logits.requires_grad_(), labels, IGNORE, 0.1, 1e-4))
    _, lse = op.cross_entropy(logits.detach(), labels, IGNORE, 0.0, 0.0)
    torch.library.opcheck(op._cross_entropy_backward, (torch.randn(9), logits.detach(), labels, lse, IGNORE, 0.1, 0.0))


def test_torch_compile_fullgraph():
    logits, labels = make_inputs((4, 9), 50, torch.float32)
    x = logits.requires_grad_()

    def f(x):
        return cross_entropy(x, labels, label_smoothing=0.1) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])
    fn = lambda x: cross_entropy(x, labels, reduction="none") + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x.detach()), fn(x.detach()))


def test_two_threads():
    torch.set_num_threads(2)
    check("cpu", (97,), 1031, torch.float32, "mean", 0.1, 1e-4)
    check("cpu", (33,), 32003, torch.bfloat16, "none")
