"""llmkern.ops.fused_adamw_ on every backend this machine runs, against the fp64 reference: dtype
combinations, odd / non-contiguous / empty shapes, the overflow skip, the grad coefficient, opcheck,
torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

from llmkern.ops import fused_adamw as F
from llmkern.ops._backends import BackendRefused
from llmkern.testing import assert_close_to_ref

HP = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
# (param, grad, state, model copy): fp32 training, fp16/bf16 mixed precision with fp32 masters,
# pure 16-bit params, and bf16 moments.
COMBOS = [
    (torch.float32, torch.float32, torch.float32, None),
    (torch.float32, torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32, None),
    (torch.float16, torch.float16, torch.float32, None),
    (torch.float32, torch.float32, torch.bfloat16, None),
]
# odd sizes, a transposed (dense, non-contiguous) matrix, an empty tensor, a scalar
SHAPES = [(97,), (1025, 3), "t(33, 17)", (0,), ()]


def _tensor(shape, dtype, gen, scale=1.0):
    if isinstance(shape, str):  # "t(a, b)": a transposed (b, a) tensor
        a, b = eval(shape[1:])
        return (torch.randn(b, a, generator=gen) * scale).to(dtype).t()
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def make_case(combo, shapes=SHAPES, seed=0, amsgrad=False):
    pd, gd, sd, cd = combo
    gen = torch.Generator().manual_seed(seed)
    params = [_tensor(s, pd, gen) for s in shapes]
    grads = [_tensor(s, gd, gen, 0.5) for s in shapes]
    # moments as after a few steps: m ~ g, v ~ g^2 (positive)
    exp_avgs = [_tensor(s, sd, gen, 0.05) for s in shapes]
    exp_avg_sqs = [(_tensor(s, torch.float32, gen, 0.05) ** 2).to(sd) for s in shapes]
    # AMSGrad's max: above v for some elements, below for others
    vmax = [(v.float() * (0.5 + torch.rand(v.shape, generator=gen))).to(sd) for v in exp_avg_sqs] if amsgrad else []
    copies = [p.to(cd) for p in params] if cd is not None else []
    return [params, grads, exp_avgs, exp_avg_sqs, vmax, copies]


def scalars(step=3.0, found_inf=0.0, coef=1.0):
    return (torch.tensor([step]), torch.tensor([found_inf]), torch.tensor([coef]))


def clone(case, dtype=None):
    return [[t.clone() if dtype is None else t.to(dtype) for t in lst] for lst in case]


def flat(lst):
    return torch.cat([t.reshape(-1).double() for t in lst]).to(lst[0].dtype) if lst else torch.zeros(0)


def run(backend, case, steps=3, coef=0.5, decoupled=True):
    for t in range(1, steps + 1):
        F.fused_adamw_(*case, *scalars(float(t), 0.0, coef), **HP, decoupled_weight_decay=decoupled,
                       backend=backend)
    return case


NAMESPACES = ["llmkern", pytest.param("llmkern_emu", marks=pytest.mark.skipif("emu" in F.UNAVAILABLE, reason=F.UNAVAILABLE.get("emu", ""))),
              pytest.param("llmkern_triton", marks=pytest.mark.skipif("triton" in F.UNAVAILABLE,
                                                                      reason=F.UNAVAILABLE.get("triton", "")))]


def namespace(ns, request):
    """torch.ops.<ns>; the Triton op runs its kernels in the interpreter on CPU tensors."""
    if ns == "llmkern_triton":
        request.getfixturevalue("triton_interpret")
    return getattr(torch.ops, ns)


def backends():
    out = ["cpu", "ref"]
    out.append(pytest.param("emu", marks=pytest.mark.skipif("emu" in F.UNAVAILABLE,
                                                             reason=F.UNAVAILABLE.get("emu", ""))))
    out.append("triton")
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("decoupled,amsgrad", [(True, False), (False, False), (True, True)],
                         ids=["adamw", "adam", "adamw-amsgrad"])
def test_matches_fp64_reference(backend, combo, decoupled, amsgrad, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(combo, amsgrad=amsgrad)
    ref = run("ref", clone(case, torch.float64), decoupled=decoupled)       # the oracle
    base = run("ref", clone(case), decoupled=decoupled)                     # plain PyTorch, same dtypes
    out = run(backend, clone(case), decoupled=decoupled)
    for k, name in enumerate(["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "model_copies"]):
        for a, r, b in zip(out[k], ref[k], base[k]):
            assert a.dtype == b.dtype and a.stride() == b.stride()
        # One multi-tensor op, one output per list: the error rule is applied over all its elements
        # (a 1-element tensor alone would make "2x PyTorch's max error" a coin toss).
        if out[k]:
            assert_close_to_ref(flat(out[k]), flat(ref[k]), flat(base[k]), name=f"{backend} {name}")


def test_fp32_matches_torch_fused_adamw_elementwise():
    """Several tensors, sizes that are not multiples of the SIMD width or of the 64Ki span."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(70001,), (1025, 3), (7,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        F.fused_adamw_(params, grads, m, v, [], [], *scalars(float(t)), lr=1e-2, weight_decay=0.1, backend="cpu")
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("combo", COMBOS[:3] + COMBOS[5:], ids=["fp32", "fp16-master", "bf16-master", "bf16-states"])
def test_overflow_step_changes_nothing(backend, combo, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(combo, amsgrad=True)
    case[1][0][3] = float("inf")
    before = clone(case)
    F.fused_adamw_(*case, *scalars(5.0, found_inf=1.0), **HP, state_rounding="stochastic" if combo[2] ==
                   torch.bfloat16 else "nearest", backend=backend)
    for lb, la in zip(before, case):
        for b, a in zip(lb, la):
            assert torch.equal(b.reshape(-1).view(torch.uint8), a.reshape(-1).view(torch.uint8))  # bits


def test_grad_coef_is_unscale_times_clip():
    """grad_coef multiplies every gradient: scaled grads with coef 1/S give the unscaled update."""
    case = make_case(COMBOS[0])
    scaled = clone(case)
    scaled[1] = [g * 1024.0 for g in scaled[1]]
    F.fused_adamw_(*case, *scalars(2.0, 0.0, 0.25), **HP, backend="cpu")
    F.fused_adamw_(*scaled, *scalars(2.0, 0.0, 0.25 / 1024.0), **HP, backend="cpu")
    for a, b in zip(case[0], scaled[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck(ns, request):
    case = make_case(COMBOS[1], shapes=[(97,), "t(33, 17)"], amsgrad=True)
    args = (*case, *scalars(2.0), 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    torch.library.opcheck(namespace(ns, request).fused_adamw_.default, args)


@pytest.mark.parametrize("ns", ["llmkern", NAMESPACES[2]])
def test_torch_compile_fullgraph(ns, request):
    case = make_case(COMBOS[1], shapes=[(97,), (33, 5)])
    expect = clone(case)
    op = namespace(ns, request).fused_adamw_
    F.fused_adamw_(*expect, *scalars(), **HP, backend="cpu" if ns == "llmkern" else "triton")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, m, v, vmax, copies, s, fi, c):
        op(params, grads, m, v, vmax, copies, s, fi, c, 3e-2, 0.9, 0.99, 1e-8, 0.1, True)

    step(*case, *scalars())
    for la, lb in zip(case, expect):
        for a, b in zip(la, lb):
            assert torch.equal(a, b)


def test_bad_input_errors():
    case = make_case(COMBOS[0], shapes=[(5,)])
    with pytest.raises(ValueError, match="lr must be"):
        F.fused_adamw_(*clone(case), *scalars(), **{**HP, "lr": -1.0})
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        F.fused_adamw_(*clone(case), *scalars(), **{**HP, "beta1": 1.0})
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        F.fused_adamw_(*clone(case), *scalars(), **{**HP, "beta2": -0.1})
    bad = clone(case)
    bad[1][0] = bad[1][0].to("meta")
    with pytest.raises(ValueError, match="on meta but step is on cpu"):
        F.fused_adamw_(*bad, *scalars(), **HP)
    bad = clone(case)
    bad[3][0] = bad[3][0].bfloat16()
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        F.fused_adamw_(*bad, *scalars(), **HP, backend="cpu")
    bad = clone(case)
    bad[1][0] = bad[1][0].double()
    with pytest.raises(BackendRefused, match="dtype torch.float64"):
        F.fused_adamw_(*bad, *scalars(), **HP, backend="cpu")
    bad = clone(case)
    bad[2] = []
    with pytest.raises(RuntimeError, match="exp_avgs has 0 tensors but params has 1"):
        F.fused_adamw_(*bad, *scalars(), **HP, backend="cpu")
    bad = clone(case)
    bad[1][0] = torch.randn(10)[::2]
    with pytest.raises(RuntimeError, match="must be dense with the same strides"):
        F.fused_adamw_(*bad, *scalars(), **HP, backend="cpu")


@pytest.mark.skipif("emu" in F.UNAVAILABLE, reason=F.UNAVAILABLE.get("emu", ""))
@pytest.mark.parametrize("combo,rounding", [(COMBOS[0], "nearest"), (COMBOS[1], "nearest"),
                                            ((torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                             "stochastic")], ids=["fp32", "fp16-master", "bf16-states-stochastic"])
def test_emulated_kernel_schedules_agree(combo, rounding, monkeypatch):
    """The CUDA kernel under the emulator's forward, reverse and random thread schedules: the three
    runs are bit-identical (no thread-order dependence, also of the stochastic rounding's draws)."""
    outs = []
    for sched in ("forward", "reverse", "random:11"):
        monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", sched)
        outs.append(run_sr("emu", clone(make_case(combo, shapes=SR_SHAPES)), HP, rounding=rounding))
    for out in outs[1:]:
        for lst0, lst in zip(outs[0], out):
            assert all(torch.equal(a, b) for a, b in zip(lst0, lst))


# ---- stochastic rounding of bf16 moments ----------------------------------------------------------
# beta1 = 0.5, beta2 = 0.75, grad_coef = 0.5 and bf16 gradients make every product of the moment
# updates exact in fp32 (8-bit mantissas times 1-3-bit constants), so each new m and v is one
# rounded sum on every backend, FMA or not: the fp32 values entering the rounding are bit-identical,
# and any difference in the stored bf16 bits can only come from the rounding itself.
EXACT_HP = dict(lr=1e-2, beta1=0.5, beta2=0.75, eps=1e-8, weight_decay=0.1)
SR_SHAPES = [(97,), (1025, 3), "t(33, 17)", (0,), (), (70001,)]  # the last spans two 64Ki CPU spans / CUDA chunks


def run_sr(backend, case, hp, steps=3, seed=1234, coef=0.5, rounding="stochastic"):
    for t in range(1, steps + 1):
        F.fused_adamw_(*case, *scalars(float(t), 0.0, coef), **hp, state_rounding=rounding, rounding_seed=seed,
                       backend=backend)
    return case


def bits(lst):
    return torch.cat([t.reshape(-1).view(torch.int16) for t in lst]) if lst else torch.zeros(0, dtype=torch.int16)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_stochastic_rounding_is_bit_identical_across_backends(backend, amsgrad, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case((torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16), shapes=SR_SHAPES, amsgrad=amsgrad)
    ref = run_sr("ref", clone(case), EXACT_HP)
    out = run_sr(backend, clone(case), EXACT_HP)
    for k in (2, 3, 4):  # exp_avgs, exp_avg_sqs, max_exp_avg_sqs: every bit
        assert torch.equal(bits(out[k]), bits(ref[k])), f"list {k}: {(bits(out[k]) != bits(ref[k])).sum()} differ"
    # the test has power: stochastic and nearest rounding disagree on a large share of the elements,
    # and another seed draws other bits
    nearest = run_sr("ref", clone(case), EXACT_HP, rounding="nearest")
    assert (bits(nearest[3]) != bits(ref[3])).float().mean() > 0.2
    other = run_sr("ref", clone(case), EXACT_HP, seed=1235)
    assert (bits(other[3]) != bits(ref[3])).float().mean() > 0.2
    if amsgrad:  # v's draws for the max too: the stored max is never below the stored v
        assert all(bool((x.float() >= v.float()).all()) for x, v in zip(out[4], out[3]))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_stochastic_rounding_with_any_hyperparameters(backend, decoupled, request):
    """With general hyper-parameters the fp32 moments may differ by an ulp between backends (FMA
    contraction), which flips a stochastic rounding with probability ~2^-16 per ulp: the stored bits
    match the reference's except in a tiny fraction of elements (3 of 73735 measured), each by about
    one bf16 ulp."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    case = make_case((torch.float32, torch.float16, torch.bfloat16, torch.float16), shapes=SR_SHAPES)
    steps = 3
    ref, out = clone(case), clone(case)
    for t in range(1, steps + 1):
        for b, c in (("ref", ref), (backend, out)):
            F.fused_adamw_(*c, *scalars(float(t), 0.0, 0.5), **hp, decoupled_weight_decay=decoupled,
                           state_rounding="stochastic", rounding_seed=99, backend=b)
    for k in (2, 3):
        a, r = torch.cat([t.reshape(-1) for t in out[k]]), torch.cat([t.reshape(-1) for t in ref[k]])
        differ = a.view(torch.int16) != r.view(torch.int16)
        assert differ.float().mean() <= 1e-3, f"list {k}: {int(differ.sum())} of {a.numel()} differ"
        # one bf16 ulp, plus fp32's error where m or v came from cancellation (tiny results of large
        # terms, e.g. m = 9.4e-10 from terms of ~0.1, whose fp32 values differ by several ulps)
        a, r = a.float(), r.float()
        allowed = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), r.abs()) + 1e-6 * r.abs().max()
        assert ((a - r).abs() <= allowed).all()


@pytest.mark.parametrize("backend", backends())
def test_stochastic_rounding_is_unbiased(backend, request):
    """64 fp32 values, each the moment of 4096 elements (beta1 = beta2 = 0: m = g and v = g², one
    rounding each): each element draws its own bits, so the mean of the 4096 stored bf16 values
    estimates E[round(x)]. Unbiased rounding puts it within 6 standard errors of x
    (std <= ulp / (2 sqrt(4096)) = ulp/128, so 6 sigma = 0.047 ulp); round-to-nearest is off by up
    to half an ulp, and does fail this bound (checked below)."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    k, n = 64, 4096
    gen = torch.Generator().manual_seed(7)
    values = torch.randn(k, generator=gen) * 3.0
    g = values.repeat_interleave(n)
    case = [[torch.zeros(k * n)], [g], [torch.zeros(k * n, dtype=torch.bfloat16)],
            [torch.zeros(k * n, dtype=torch.bfloat16)], [], []]
    hp = dict(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0)

    def error_in_ulps(stored, exact):
        mean = stored.float().double().reshape(k, n).mean(1)
        ulp = torch.ldexp(torch.ones(k, dtype=torch.float64), torch.frexp(exact.double()).exponent - 8)  # bf16 spacing at x
        return ((mean - exact.double()) / ulp).abs()

    out = run_sr(backend, clone(case), hp, steps=1, coef=1.0)
    m_err = error_in_ulps(out[2][0], values)
    v_err = error_in_ulps(out[3][0], values * values)
    assert m_err.max() <= 0.047 and v_err.max() <= 0.047, (m_err.max(), v_err.max())
    nearest = run_sr(backend, clone(case), hp, steps=1, coef=1.0, rounding="nearest")
    assert error_in_ulps(nearest[2][0], values).max() > 0.1  # the bound separates the two


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck_stochastic_rounding(ns, request):
    case = make_case((torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16), shapes=[(97,), "t(33, 17)"],
                     amsgrad=True)
    args = (*case, *scalars(2.0), 1e-2, 0.9, 0.999, 1e-8, 0.01, True, True, -5)
    torch.library.opcheck(namespace(ns, request).fused_adamw_.default, args)


def test_state_rounding_bad_input():
    case = make_case(COMBOS[5], shapes=[(5,)])
    with pytest.raises(ValueError, match="state_rounding must be 'nearest' or 'stochastic'"):
        F.fused_adamw_(*case, *scalars(), **HP, state_rounding="up")
    with pytest.raises(ValueError, match="rounding_seed must be an int64"):
        F.fused_adamw_(*case, *scalars(), **HP, state_rounding="stochastic", rounding_seed=1 << 64)


BAD = [  # (what, list k, tensor j, the error every compiled backend gives)
    ("strided grad", 1, 2, "must be dense with the same strides"),
    ("shape", 3, 1, "has shape"),
    ("float64 grad", 1, 1, "must be float32, float16 or bfloat16"),
    ("mixed state dtypes", 3, 1, "must both be float32 or both bfloat16"),
    ("fp32 model copy", 5, 1, "must be the float32 master"),
    ("short list", 2, None, "exp_avgs has 2 tensors but params has 3"),
    ("broadcastable grad", 1, 0, r"grads\[0\] has shape [\[(]1,?[\])] but params\[0\] has shape [\[(]97,?[\])]"),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("what,k,j,message", BAD, ids=[b[0] for b in BAD])
def test_bad_tensor_is_refused_before_anything_is_written(backend, what, k, j, message, request):
    """A bad tensor behind good ones: the same clear error on every backend, the reference included
    (it broadcast a (1,) gradient over a (97,) parameter), and no tensor of the call is half-updated."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case(COMBOS[1], shapes=[(97,), (1025, 3), "t(33, 17)"])
    if what == "strided grad":
        case[k][j] = torch.randn(33 * 17 * 2).half()[::2].reshape(33, 17)
    elif what == "shape":
        case[k][j] = torch.zeros(3076)
    elif what == "float64 grad":
        case[k][j] = case[k][j].double()
    elif what == "mixed state dtypes":
        case[k][j] = case[k][j].bfloat16()
    elif what == "fp32 model copy":
        case[k][j] = case[k][j].float()
    elif what == "broadcastable grad":
        case[k][j] = torch.ones(1, dtype=case[k][j].dtype)
    else:
        case[k] = case[k][:2]
    before = clone(case)
    with pytest.raises(RuntimeError, match=message):
        F.fused_adamw_(*case, *scalars(), **HP, backend=backend)
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))


# ---- validation at every boundary, the same on every backend --------------------------------------
BAD_HP = [("lr", -1.0, r"lr must be in \[0, inf\), got -1"), ("lr", float("nan"), r"lr must be in \[0, inf\), got nan"),
          ("lr", float("inf"), r"lr must be in \[0, inf\), got inf"), ("beta1", 1.0, r"beta1 must be in \[0, 1\), got 1"),
          ("beta2", -0.1, r"beta2 must be in \[0, 1\), got -0.1"), ("eps", 0.0, r"eps must be in \(0, inf\), got 0"),
          ("weight_decay", -1e-3, r"weight_decay must be in \[0, inf\), got -0.001")]


def _hp_args(case, **over):
    hp = {**HP, **over}
    return (*case, *scalars(), hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], True)


@pytest.mark.parametrize("name,value,message", BAD_HP, ids=[f"{n}={v}" for n, v, _ in BAD_HP])
def test_bad_hyperparameter_same_error_on_every_boundary(name, value, message, request):
    """The op (every backend behind it), check_hyperparameters (which the optimizers call at
    construction) and each dispatcher op on its own raise the same ValueError, before any write."""
    case = make_case(COMBOS[1], shapes=[(97,), (5, 3)])
    before = clone(case)
    with pytest.raises(ValueError, match=message):
        F.check_hyperparameters(**{k: v for k, v in {**HP, name: value}.items()})
    for b in ("cpu", "ref"):
        with pytest.raises(ValueError, match=message):
            F.fused_adamw_(*case, *scalars(), **{**HP, name: value}, backend=b)
    for ns in NAMESPACES:
        ns = ns.values[0] if hasattr(ns, "values") else ns
        if ns[len("llmkern_"):] in F.UNAVAILABLE:
            continue
        with pytest.raises(ValueError, match=message):
            namespace(ns, request).fused_adamw_(*_hp_args(case, **{name: value}))
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))


def test_hyperparameter_of_the_wrong_type():
    with pytest.raises(TypeError, match="beta1 must be a number, got tuple"):
        F.check_hyperparameters(1e-3, (0.9, 0.99), 0.999, 1e-8, 0.0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_step_zero_is_refused_before_any_write(backend, rounding, request):
    """step = 0 would divide by 1 - beta^0 = 0: every backend refuses it with the same ValueError and
    writes nothing (the CUDA kernel under emulation and Triton wrote NaN into the parameters). With
    found_inf set (a first step that overflowed: the optimizer has not counted it) nothing happens."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    case = make_case((torch.float32, torch.float16, torch.bfloat16, torch.float16), shapes=[(97,), (1025, 3)])
    before = clone(case)
    with pytest.raises(ValueError, match=r"step must be >= 1 \(the 1-based number of this update\) when found_inf "
                                         r"is 0, got 0"):
        F.fused_adamw_(*case, *scalars(0.0), **HP, state_rounding=rounding, backend=backend)
    F.fused_adamw_(*case, *scalars(0.0, found_inf=1.0), **HP, state_rounding=rounding, backend=backend)
    for lb, la in zip(before, case):
        assert all(torch.equal(b, a) for b, a in zip(lb, la))
    ns = {"cpu": "llmkern", "emu": "llmkern_emu", "triton": "llmkern_triton"}.get(backend)
    if ns is not None:  # the dispatcher op on its own
        with pytest.raises(ValueError, match="step must be >= 1"):
            getattr(torch.ops, ns).fused_adamw_(*case, *scalars(0.0), 1e-2, 0.9, 0.99, 1e-8, 0.0, True)


SHARD_N = 1025 * 3 + 7  # odd: the shards are not multiples of any vector width or block


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_shards_draw_the_bits_of_the_whole_tensor(backend, amsgrad, request):
    """A flat fp32 master stepped whole, and the same tensor stepped as 3 shards (each its own call,
    element_offset = its start, as ZeRO steps its 1-D shards), store the same bits in every list,
    bf16 moments stochastically rounded included, over 3 steps."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    whole = make_case((torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16), shapes=[(SHARD_N,)],
                      amsgrad=amsgrad)
    shards = clone(whole)
    cuts = [0, 1031, 2049, SHARD_N]  # uneven shard lengths
    views = [[[t[a:b] for t in lst] for lst in shards] for a, b in zip(cuts, cuts[1:])]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    for t in range(1, 4):
        F.fused_adamw_(*whole, *scalars(float(t), 0.0, 0.5), **hp, state_rounding="stochastic", rounding_seed=77,
                       backend=backend)
        for (a, _), view in zip(zip(cuts, cuts[1:]), views):
            F.fused_adamw_(*view, *scalars(float(t), 0.0, 0.5), **hp, state_rounding="stochastic",
                           rounding_seed=77, element_offset=a, backend=backend)
    for k in range(6):
        for x, y in zip(whole[k], shards[k]):
            assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                               y.view(torch.int16) if y.dtype == torch.bfloat16 else y), k
    # the test has power: without the offsets the shards draw other bits
    unshifted = clone(whole)
    for a, b in zip(cuts, cuts[1:]):
        F.fused_adamw_(*[[t[a:b] for t in lst] for lst in unshifted], *scalars(4.0, 0.0, 0.5), **hp,
                       state_rounding="stochastic", rounding_seed=77, backend=backend)
    F.fused_adamw_(*whole, *scalars(4.0, 0.0, 0.5), **hp, state_rounding="stochastic", rounding_seed=77,
                   backend=backend)
    assert not torch.equal(unshifted[3][0].view(torch.int16), whole[3][0].view(torch.int16))


def test_element_offset_bad_input():
    case = make_case(COMBOS[5], shapes=[(5,)])
    with pytest.raises(ValueError, match="element_offset must be an int64 >= 0, got -1"):
        F.fused_adamw_(*case, *scalars(), **HP, element_offset=-1)
    with pytest.raises(ValueError, match="element_offset must be >= 0, got -1"):
        torch.ops.llmkern.fused_adamw_(*case, *scalars(), 1e-2, 0.9, 0.99, 1e-8, 0.0, True, True, 0, -1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_step_zero_on_cuda_is_a_device_side_assert(backend):
    """On CUDA the step is not read on the host (that would sync): the kernels write nothing and
    _assert_async reports it. A device-side assert ends the CUDA context, so it runs in a subprocess."""
    import subprocess
    import sys
    code = f"""
import torch
from llmkern.ops import fused_adamw_
p = [torch.ones(97, device="cuda")]
g = [torch.ones(97, device="cuda")]
m, v = [torch.zeros(97, device="cuda")], [torch.zeros(97, device="cuda")]
s = lambda x: torch.tensor([x], device="cuda")
fused_adamw_(p, g, m, v, [], [], s(0.0), s(1.0), s(1.0), lr=0.1, backend="{backend}")  # overflow: fine
torch.cuda.synchronize()
assert bool((p[0] == 1).all())
fused_adamw_(p, g, m, v, [], [], s(0.0), s(0.0), s(1.0), lr=0.1, backend="{backend}")
torch.cuda.synchronize()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "step must be >= 1" in proc.stderr, proc.stderr[-2000:]
