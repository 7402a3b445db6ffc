"""llmkern.ops.fused_sgd_ on the CPU kernel, the emulated CUDA kernel and the reference, against the
fp64 reference; the overflow skip; opcheck; bad input."""
from __future__ import annotations

import pytest
import torch

from llmkern.ops import fused_sgd as S
from llmkern.testing import assert_close_to_ref

SHAPES = [(97,), (1025, 3), (0,), ()]
COMBOS = [  # (param, grad, momentum buffer, model copy)
    (torch.float32, torch.float32, torch.float32, None),
    (torch.float32, torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32, None),
]
HPS = [dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
       dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
       dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False)]


def make_case(combo, momentum, seed=0):
    pd, gd, bd, cd = combo
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(pd) for s in SHAPES]
    grads = [(torch.randn(s, generator=g) * 0.5).to(gd) for s in SHAPES]
    bufs = [torch.zeros(s, dtype=bd) for s in SHAPES] if momentum > 0 else []
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


BACKENDS = ["cpu", "ref", pytest.param("emu", marks=pytest.mark.skipif("emu" in S.UNAVAILABLE,
                                                                         reason=S.UNAVAILABLE.get("emu", "")))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("hp", HPS, ids=["momentum", "nesterov", "plain"])
def test_matches_fp64_reference(backend, combo, hp):
    case = make_case(combo, hp["momentum"])
    ref = run("ref", [[t.double() for t in lst] for lst in case], hp)
    base = run("ref", [[t.clone() for t in lst] for lst in case], hp)
    out = run(backend, [[t.clone() for t in lst] for lst in case], hp)
    for k in range(4):
        if out[k]:
            assert_close_to_ref(flat(out[k]), flat(ref[k]), flat(base[k]), name=f"{backend} list {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_step_changes_nothing(backend):
    case = make_case(COMBOS[1], 0.9)
    run(backend, case, HPS[0], steps=2)
    before = [[t.clone() for t in lst] for lst in case]
    S.fused_sgd_(*case, *scalars(3, found_inf=1.0), **HPS[0], backend=backend)
    for lb, la in zip(before, case):
        for b, a in zip(lb, la):
            assert torch.equal(b, a)


def test_opcheck():
    case = make_case(COMBOS[1], 0.9)
    torch.library.opcheck(torch.ops.llmkern.fused_sgd_.default, (*case, *scalars(2), 0.05, 0.9, 0.1, 0.01, False))


def test_bad_input():
    case = make_case(COMBOS[0], 0.9)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening == 0"):
        S.fused_sgd_(*case, *scalars(1), lr=0.1, momentum=0.9, dampening=0.5, nesterov=True)
    with pytest.raises(ValueError, match="lr must be"):
        S.fused_sgd_(*case, *scalars(1), lr=-0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="momentum_buffers must be given exactly when momentum > 0"):
        S.fused_sgd_(case[0], case[1], [], case[3], *scalars(1), lr=0.1, momentum=0.9, backend="cpu")


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
