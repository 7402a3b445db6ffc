"""llmkern.ops.fused_sgd_ on the CPU kernel, the emulated CUDA kernel, the Triton kernel (interpreter)
and the reference, against the fp64 reference; the overflow skip; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

from llmkern.ops import fused_sgd as S
from llmkern.testing import assert_close_to_ref

SHAPES = [(97,), (1025, 3), "t(33, 17)", (0,), ()]  # odd sizes, a transposed matrix, empty, a scalar
COMBOS = [  # (param, grad, momentum buffer, model copy)
    (torch.float32, torch.float32, torch.float32, None),
    (torch.float32, torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32, None),
]
HPS = [dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
       dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
       dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False)]


def _tensor(shape, dtype, gen, scale=1.0):
    if isinstance(shape, str):  # "t(a, b)": a transposed (b, a) tensor, dense but not contiguous
        a, b = eval(shape[1:])
        return (torch.randn(b, a, generator=gen) * scale).to(dtype).t()
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def make_case(combo, momentum, seed=0):
    pd, gd, bd, cd = combo
    g = torch.Generator().manual_seed(seed)
    params = [_tensor(s, pd, g) for s in SHAPES]
    grads = [_tensor(s, gd, g, 0.5) for s in SHAPES]
    bufs = [torch.zeros_like(p, dtype=bd) for p in params] if momentum > 0 else []
    copies = [p.to(cd) for p in params] if cd is not None else []
    return [params, grads, bufs, copies]


def scalars(step, found_inf=0.0, coef=0.5):
    return torch.tensor([float(step)]), torch.tensor([found_inf]), torch.tensor([coef])


def run(backend, case, hp, steps=3):
    for t in range(1, steps + 1):
        S.fused_sgd_(*case, *scalars(t), **hp, backend=backend)
    return case


def flat(lst):
    return torch.cat([t.reshape(-1).double() for t in lst]).to(lst[0].dtype) if lst else torch.zeros(0)


NAMESPACES = ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif("emu" in S.UNAVAILABLE, reason=S.UNAVAILABLE.get("emu", ""))),
              pytest.param("llmkern_triton", marks=pytest.mark.skipif("triton" in S.UNAVAILABLE,
                                                                      reason=S.UNAVAILABLE.get("triton", "")))]


def namespace(ns, request):
    """torch.ops.<ns>; the Triton op runs its kernels in the interpreter on CPU tensors."""
    if ns == "llmkern_triton":
        request.getfixturevalue("triton_interpret")
    return getattr(torch.ops, ns)


BACKENDS = ["cpu", "ref", "triton", pytest.param("emu", marks=pytest.mark.skipif("emu" in S.UNAVAILABLE,
                                                                                   reason=S.UNAVAILABLE.get("emu", "")))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("hp", HPS, ids=["momentum", "nesterov", "plain"])
def test_matches_fp64_reference(backend, combo, hp, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(combo, hp["momentum"])
    ref = run("ref", [[t.double() for t in lst] for lst in case], hp)
    base = run("ref", [[t.clone() for t in lst] for lst in case], hp)
    out = run(backend, [[t.clone() for t in lst] for lst in case], hp)
    for k in range(4):
        if out[k]:
            assert_close_to_ref(flat(out[k]), flat(ref[k]), flat(base[k]), name=f"{backend} list {k}")
            assert all(a.stride() == b.stride() for a, b in zip(out[k], base[k]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_step_changes_nothing(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(COMBOS[1], 0.9)
    run(backend, case, HPS[0], steps=2)
    before = [[t.clone() for t in lst] for lst in case]
    S.fused_sgd_(*case, *scalars(3, found_inf=1.0), **HPS[0], backend=backend)
    for lb, la in zip(before, case):
        for b, a in zip(lb, la):
            assert torch.equal(b, a)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck(ns, request):
    case = make_case(COMBOS[1], 0.9)
    torch.library.opcheck(namespace(ns, request).fused_sgd_.default, (*case, *scalars(2), 0.05, 0.9, 0.1, 0.01, False))


@pytest.mark.parametrize("ns", ["llmkern", NAMESPACES[2]])
def test_torch_compile_fullgraph(ns, request):
    case = make_case(COMBOS[1], 0.9)
    expect = [[t.clone() for t in lst] for lst in case]
    op = namespace(ns, request).fused_sgd_
    S.fused_sgd_(*expect, *scalars(2), **HPS[0], backend="cpu" if ns == "llmkern" else "triton")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, bufs, copies, st, fi, c):
        op(params, grads, bufs, copies, st, fi, c, 0.05, 0.9, 0.1, 0.01, False)

    step(*case, *scalars(2))
    for la, lb in zip(case, expect):
        assert all(torch.equal(a, b) for a, b in zip(la, lb))


def test_bad_input():
    case = make_case(COMBOS[0], 0.9)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening == 0"):
        S.fused_sgd_(*case, *scalars(1), lr=0.1, momentum=0.9, dampening=0.5, nesterov=True)
    with pytest.raises(ValueError, match="lr must be"):
        S.fused_sgd_(*case, *scalars(1), lr=-0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="momentum_buffers must be given exactly when momentum > 0"):
        S.fused_sgd_(case[0], case[1], [], case[3], *scalars(1), lr=0.1, momentum=0.9, backend="cpu")


BAD = [  # (what to break in list k, tensor j, the error it must give)
    ("strided", 1, 2, "must be dense with the same strides"),
    ("shape", 2, 1, "has shape"),
    ("dtype", 1, 1, "must be float32, float16 or bfloat16"),
    ("fp32 copy", 3, 1, "must be the float32 master"),
    ("broadcastable grad", 1, 0, r"grads\[0\] has shape [\[(]1,?[\])] but params\[0\] has shape [\[(]97,?[\])]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what,k,j,message", BAD, ids=[b[0] for b in BAD])
def test_bad_tensor_is_refused_before_anything_is_written(backend, what, k, j, message, request):
    """A bad tensor behind good ones: the same clear error on every backend, the reference included,
    and no tensor of the call is half-updated."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(COMBOS[1], 0.9)
    if what == "strided":
        case[k][j] = torch.randn(case[0][j].numel() * 2).to(case[k][j].dtype)[::2].reshape(case[0][j].shape)
    elif what == "shape":
        case[k][j] = torch.zeros(case[0][j].numel() + 1, dtype=case[k][j].dtype)
    elif what == "dtype":
        case[k][j] = case[k][j].double()
    elif what == "broadcastable grad":
        case[k][j] = torch.ones(1, dtype=case[k][j].dtype)
    else:
        case[k][j] = case[k][j].float()
    before = [[t.clone() for t in lst] for lst in case]
    with pytest.raises(RuntimeError, match=message):
        S.fused_sgd_(*case, *scalars(1), **HPS[0], backend=backend)
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))


@pytest.mark.skipif("emu" in S.UNAVAILABLE, reason=S.UNAVAILABLE.get("emu", ""))
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:5"])
def test_emulated_kernel_under_each_schedule(schedule, monkeypatch):
    """The CUDA kernel under each of the emulator's thread schedules, against the fp64 reference."""
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)
    hp = HPS[1]
    case = make_case(COMBOS[1], hp["momentum"])
    ref = run("ref", [[t.double() for t in lst] for lst in case], hp)
    base = run("ref", [[t.clone() for t in lst] for lst in case], hp)
    out = run("emu", [[t.clone() for t in lst] for lst in case], hp)
    for k in range(4):
        if out[k]:
            assert_close_to_ref(flat(out[k]), flat(ref[k]), flat(base[k]), name=f"emu {schedule} list {k}")


BAD_HP = [(dict(lr=-0.1), r"lr must be in \[0, inf\), got -0.1"),
          (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1"),
          (dict(dampening=1.5), r"dampening must be in \[0, 1\], got 1.5"),
          (dict(weight_decay=float("nan")), r"weight_decay must be in \[0, inf\), got nan"),
          (dict(dampening=0.5, nesterov=True), r"nesterov needs momentum > 0 and dampening == 0, got momentum 0.9, "
                                               r"dampening 0.5")]


@pytest.mark.parametrize("over,message", BAD_HP, ids=[next(iter(o)) for o, _ in BAD_HP])
def test_bad_hyperparameter_same_error_on_every_boundary(over, message, request):
    """The op (every backend behind it), check_hyperparameters and each dispatcher op on its own raise
    the same ValueError, before any write."""
    hp = {**HPS[0], **over}
    case = make_case(COMBOS[1], 0.9)
    before = [[t.clone() for t in lst] for lst in case]
    with pytest.raises(ValueError, match=message):
        S.check_hyperparameters(hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"], hp["nesterov"])
    for b in ("cpu", "ref"):
        with pytest.raises(ValueError, match=message):
            S.fused_sgd_(*case, *scalars(1), **hp, backend=b)
    for ns in NAMESPACES:
        ns = ns.values[0] if hasattr(ns, "values") else ns
        if ns[len("llmkern_"):] in S.UNAVAILABLE:
            continue
        with pytest.raises(ValueError, match=message):
            namespace(ns, request).fused_sgd_(*case, *scalars(1), hp["lr"], hp["momentum"], hp["dampening"],
                                              hp["weight_decay"], hp["nesterov"])
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_zero_is_refused_before_any_write(backend, request):
    """The same rule as fused_adamw_: an update (found_inf 0) needs step >= 1, on every backend."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(COMBOS[1], 0.9)
    before = [[t.clone() for t in lst] for lst in case]
    with pytest.raises(ValueError, match=r"step must be >= 1 \(the 1-based number of this update\) when found_inf "
                                         r"is 0, got 0"):
        S.fused_sgd_(*case, *scalars(0), **HPS[0], backend=backend)
    S.fused_sgd_(*case, *scalars(0, found_inf=1.0), **HPS[0], backend=backend)
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))
