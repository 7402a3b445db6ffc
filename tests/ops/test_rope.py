"""rope on every backend this machine runs, against transformers' apply_rotary_pos_emb in fp64 (2x/3x
rule); cos/sin from the Llama and Qwen2 rotary modules with every rope type the pinned transformers has."""
import pytest
import torch

from llmkern.ops.rope import UNAVAILABLE, rope, rope_ref
from llmkern.testing import assert_close_to_ref

from fused_cases import backend_params, one_thread  # noqa: F401 (one_thread: autouse)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cos_sin(b, t, d, dtype, device="cpu", base=10000.0):
    """HF's default rotary table: emb = cat(freqs, freqs) for positions 0..T-1 (plus an offset per batch)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(t, dtype=torch.float64)[None] + 3 * torch.arange(b, dtype=torch.float64)[:, None]
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def make_qk(b, hq, hk, t, d, dtype, layout="bhtd", device="cpu", seed=0):
    """q, k as attention makes them: (B, T, H·D) projections viewed (B, T, H, D) and transposed to
    (B, H, T, D) ("bhtd", a strided view), or left as (B, T, H, D) ("bthd", unsqueeze_dim=2)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq * d, generator=g, dtype=torch.float64).to(device, dtype).view(b, t, hq, d)
    k = torch.randn(b, t, hk * d, generator=g, dtype=torch.float64).to(device, dtype).view(b, t, hk, d)
    return (q.transpose(1, 2), k.transpose(1, 2)) if layout == "bhtd" else (q, k)


def run(fn, q, k, cos, sin, gq, gk, unsqueeze_dim=1, **kw):
    ins = [t.detach().requires_grad_() for t in (q, k)]
    qo, ko = fn(ins[0], ins[1], cos, sin, unsqueeze_dim, **kw)
    return [qo.detach(), ko.detach()], list(torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), ins))


def check(backend, b, hq, hk, t, d, dtype, layout="bhtd", cs=None):
    dev = "cuda" if backend == "cuda" else "cpu"
    q, k = make_qk(b, hq, hk, t, d, dtype, layout, dev)
    cos, sin = cs if cs is not None else cos_sin(b, t, d, dtype, dev)
    ud = 1 if layout == "bhtd" else 2
    g = torch.Generator().manual_seed(1)
    gq = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dev, dtype)
    gk = torch.randn(k.shape, generator=g, dtype=torch.float64).to(dev, dtype)
    ours = run(rope, q, k, cos, sin, gq, gk, ud, backend=None if backend == "cuda" else backend)
    base = run(rope_ref, q, k, cos, sin, gq, gk, ud)
    ref = run(rope_ref, *(x.double() for x in (q, k, cos, sin, gq, gk)), ud)
    assert ours[0][0].shape == q.shape and ours[0][0].dtype == dtype
    assert_close_to_ref(ours[0], ref[0], base[0], name=f"{backend} q/k out")
    assert_close_to_ref(ours[1], ref[1], base[1], grad=True, name=f"{backend} q/k grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hq,hk,t,d", [(1, 4, 4, 1, 64), (2, 8, 2, 97, 128), (1, 3, 1, 1025, 32),
                                         (2, 5, 5, 33, 100)])
def test_cpu_grid(dtype, b, hq, hk, t, d):
    """GQA (Hk < Hq), T = 1, 97, 1025, head dims 32-128 and D = 100 (D/2 not a multiple of 16)."""
    check("cpu", b, hq, hk, t, d, dtype)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("triton", "ref", "cuda")))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backends(backend, dtype):
    check(backend, 2, 4, 2, 33, 100, dtype)  # the interpreter runs one program per position: few positions


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_layouts(backend):
    """(B, T, H, D) with unsqueeze_dim=2, contiguous q/k, and cos/sin shared over the batch (1, T, D)."""
    check(backend, 2, 4, 2, 9, 64, torch.float32, layout="bthd")
    q, k = make_qk(2, 4, 2, 9, 64, torch.float32)
    cos, sin = cos_sin(1, 9, 64, torch.float32)
    ours = rope(q.contiguous(), k.contiguous(), cos, sin, backend=backend)
    ref = rope_ref(q.double(), k.double(), cos.double(), sin.double())
    assert_close_to_ref(ours, ref, rope_ref(q, k, cos, sin))


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE, ("cpu", "triton")))
def test_inplace(backend):
    q, k = make_qk(2, 4, 2, 9, 64, torch.bfloat16)
    cos, sin = cos_sin(2, 9, 64, torch.bfloat16)
    want = rope(q, k, cos, sin, backend=backend)
    qi, ki = q.clone(), k.clone()
    with torch.no_grad():
        out = rope(qi, ki, cos, sin, inplace=True, backend=backend)
    assert out[0] is qi and torch.equal(qi, want[0]) and torch.equal(ki, want[1])
    with pytest.raises(ValueError, match="inplace=True needs q and k that autograd does not track"):
        rope(q.requires_grad_(), k, cos, sin, inplace=True)


@pytest.mark.parametrize("backend", backend_params(UNAVAILABLE))
def test_empty(backend):
    q, k = (x.requires_grad_() for x in make_qk(1, 4, 2, 0, 16, torch.float32))
    cos, sin = cos_sin(1, 0, 16, torch.float32)
    qo, ko = rope(q, k, cos, sin, backend=None if backend == "cuda" else backend)
    (qo.sum() + ko.sum()).backward()
    assert qo.shape == q.shape and q.grad.shape == q.shape


ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.5] * 16, "short_factor": [1.1] * 16,
                 "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rotary_modules(model, rope_type):
    """cos/sin from the models' own rotary modules (the scaling is inside them), past the original
    context (positions up to 200 > 32) so that dynamic/YaRN/longrope scale; bf16 as a model runs."""
    transformers = pytest.importorskip("transformers")
    if model == "llama":
        from transformers.models.llama.modeling_llama import LlamaConfig as Config, LlamaRotaryEmbedding as Rotary
    else:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Config as Config, Qwen2RotaryEmbedding as Rotary
    cfg = Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rope_parameters=dict(ROPE_TYPES[rope_type]))
    rot = Rotary(cfg)
    t, d = 50, 32
    pos = torch.arange(t)[None] + torch.tensor([[0], [150]])
    x = torch.zeros(2, t, 128, dtype=torch.bfloat16)
    cos, sin = rot(x, pos)
    assert cos.dtype == torch.bfloat16
    check("cpu", 2, 4, 2, t, d, torch.bfloat16, cs=(cos, sin))
    del transformers


def test_saves_only_cos_sin():
    q, k = (x.requires_grad_() for x in make_qk(2, 8, 2, 64, 64, torch.float32))
    cos, sin = cos_sin(2, 64, 64, torch.float32)
    got = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: got.append(v) or v, lambda v: v):
        rope(q, k, cos, sin, backend="cpu")
    assert sorted(tuple(v.shape) for v in got) == [(2, 64, 64), (2, 64, 64)]


def test_bad_input():
    q, k = make_qk(1, 4, 2, 9, 64, torch.float32)
    cos, sin = cos_sin(1, 9, 64, torch.float32)
    with pytest.raises(ValueError, match="head dim D must be even"):
        rope(q[..., :63], k[..., :63], cos[..., :63], sin[..., :63])
    with pytest.raises(ValueError, match=r"cos has shape \(1, 8, 64\)"):
        rope(q, k, cos[:, :8], sin)
    with pytest.raises(TypeError, match="same dtype"):
        rope(q, k, cos.half(), sin)
    with pytest.raises(ValueError, match="requires grad"):
        rope(q, k, cos.requires_grad_(), sin)


@pytest.mark.parametrize("ns", ["llmkern", pytest.param("llmkern_triton", marks=pytest.mark.skipif(
    "triton" in UNAVAILABLE, reason=UNAVAILABLE.get("triton", "")))])
def test_opcheck(ns):
    q, k = make_qk(2, 4, 2, 5, 32, torch.float32)
    cos, sin = cos_sin(2, 5, 32, torch.float32)
    op = getattr(torch.ops, ns)
    torch.library.opcheck(op.rope, (q.detach().requires_grad_(), k.detach().requires_grad_(), cos, sin))
    torch.library.opcheck(op._rope_backward, (torch.randn_like(q), torch.randn_like(k), cos, sin))
    torch.library.opcheck(op.rope_, (q.clone(), k.clone(), cos, sin))


def test_torch_compile_fullgraph():
    q, k = make_qk(2, 4, 2, 9, 32, torch.float32)
    cos, sin = cos_sin(2, 9, 32, torch.float32)
    q = q.detach().requires_grad_()

    def f(q, k):
        qo, ko = rope(q, k, cos, sin)
        return (qo.square().sum() + ko.sum())

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))
    torch.testing.assert_close(torch.autograd.grad(compiled(q, k), q)[0], torch.autograd.grad(f(q, k), q)[0])
    fn = lambda q: rope(q, k, cos, sin)[0] * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q.detach()), fn(q.detach()))


def test_two_threads():
    torch.set_num_threads(2)
    check("cpu", 2, 8, 2, 513, 64, torch.float32)
