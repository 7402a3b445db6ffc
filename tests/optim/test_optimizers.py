"""FusedAdamW / FusedAdam / FusedSGD / CPUAdam against torch.optim on the CPU: 50-step element-wise
parity in fp32, fp32 masters for fp16/bf16 models (same-dtype rule), skip semantics, clipping,
state_dict round trips in both directions with torch.optim.AdamW, the lr scheduler on skipped
steps, bf16 moments, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch

from llmkern.optim import CPUAdam, DynamicLossScaler, FusedAdam, FusedAdamW, FusedSGD, LossScalerConfig
from llmkern.testing import assert_close_to_ref

SHAPES = [(97,), (33, 17), (1025,), (5, 3, 2)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


PAIRS = [
    (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    (FusedAdam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (FusedSGD, torch.optim.SGD, dict(lr=1e-2)),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,hp", PAIRS, ids=["adamw", "adam", "adamw-amsgrad", "sgd-momentum", "sgd-nesterov",
                                                              "sgd-plain"])
def test_fp32_parity_50_steps(ours_cls, theirs_cls, hp):
    ours, theirs = _params(), _params()
    # two param groups with different lr, and a scheduler, as real training has
    o = ours_cls([{"params": ours[:2]}, {"params": ours[2:], "lr": hp["lr"] / 3}], **hp)
    t = theirs_cls([{"params": theirs[:2]}, {"params": theirs[2:], "lr": hp["lr"] / 3}], **hp)
    so = torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5)
    st = torch.optim.lr_scheduler.StepLR(t, step_size=10, gamma=0.5)
    for step in range(50):
        for ps in (ours, theirs):
            for p, g in zip(ps, _grads(step)):
                p.grad = g.clone()
        o.step(lr_scheduler=so)
        t.step()
        st.step()
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_master_weights_same_dtype_rule(dtype):
    """fp16/bf16 model, fp32 masters: the 16-bit weights may be at most 2x as far from the fp64
    oracle as plain PyTorch's (fp32 AdamW on masters + copy_), and the masters match it at 1e-6."""
    model = _params(dtype)
    opt = FusedAdamW(model, lr=1e-2, weight_decay=0.1)
    masters = [torch.nn.Parameter(p.detach().float()) for p in model]
    plain = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    oracle = [torch.nn.Parameter(p.detach().double()) for p in model]
    oracle_opt = torch.optim.AdamW(oracle, lr=1e-2, weight_decay=0.1)
    for step in range(20):
        grads = _grads(step, dtype)
        for p, g in zip(model, grads):
            p.grad = g
        for p, g in zip(masters, grads):
            p.grad = g.float()
        for p, g in zip(oracle, grads):
            p.grad = g.double()
        opt.step()
        plain.step()
        oracle_opt.step()
    base = [p.detach().to(dtype) for p in masters]
    assert_close_to_ref([p.detach() for p in model], [p.detach() for p in oracle], base)
    for p, m in zip(model, masters):
        assert opt.master_param(p).dtype == torch.float32
        assert _rel(opt.master_param(p), m) <= 1e-6


@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_overflow_skips_and_leaves_state_bit_identical(backend):
    model = _params(torch.float16)
    opt = FusedAdamW(model, lr=1e-2, backend=backend)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=1024.0))
    for step in range(3):
        for p, g in zip(model, _grads(step, torch.float16)):
            p.grad = g * 8
        assert not bool(scaler.step(opt))
        scaler.update()
    before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model])
    for p, g in zip(model, _grads(9, torch.float16)):
        p.grad = g
    model[2].grad[5] = float("nan")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert bool(scaler.step(opt, lr_scheduler=sched))
    scaler.update()
    assert scaler.get_scale() == 512.0 and scaler.last_step_skipped
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 1e-2   # the schedule did not advance
    after = opt.state_dict()
    for pid, st in before[0]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]), k
            assert v.dtype == after["state"][pid][k].dtype
    for a, b in zip(before[1], model):
        assert torch.equal(a, b.detach())


def test_clip_grad_norm_matches_torch():
    ours, theirs = _params(), _params()
    o = FusedAdamW(ours, lr=1e-2)
    t = torch.optim.AdamW(theirs, lr=1e-2)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=64.0))
    for step in range(10):
        grads = _grads(step)
        for p, g in zip(ours, grads):
            p.grad = g * 64.0                      # as if the loss was scaled by 64
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        norm = o.clip_grad_norm_(1.0, loss_scaler=scaler)
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        scaler.step(o)
        scaler.update()
        t.step()
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= 1e-6


def _train(opt_factory, steps, params):
    opt = opt_factory(params)
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt


def test_state_dict_round_trip_and_resume():
    full = _params()
    _train(lambda ps: FusedAdamW(ps, lr=1e-2), 10, full)
    half = _params()
    opt = _train(lambda ps: FusedAdamW(ps, lr=1e-2), 4, half)
    sd = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt2 = FusedAdamW(resumed, lr=1e-2)
    opt2.load_state_dict(sd)
    for step in range(4, 10):
        for p, g in zip(resumed, _grads(step)):
            p.grad = g
        opt2.step()
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)


def test_state_dict_loads_to_and_from_torch_adamw():
    # ours -> torch
    a, b = _params(), _params()
    ours = _train(lambda ps: FusedAdamW(ps, lr=1e-2), 3, a)
    theirs_ref = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2), 3, b)
    t = torch.optim.AdamW(a, lr=1e-2)
    t.load_state_dict(copy.deepcopy(ours.state_dict()))
    # torch -> ours
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    o = FusedAdamW(c, lr=1e-2)
    o.load_state_dict(copy.deepcopy(theirs_ref.state_dict()))
    for step in range(3, 8):
        for ps in (a, b, c):
            for p, g in zip(ps, _grads(step)):
                p.grad = g.clone()
        t.step()
        theirs_ref.step()
        o.step()
    for x, y, z in zip(a, b, c):
        assert _rel(x, y) <= 1e-6 and _rel(z, y) <= 1e-6


def test_state_dict_keeps_fp32_masters_and_bf16_moments():
    model = _params(torch.float16)
    opt = _train(lambda ps: FusedAdamW(ps, lr=1e-2, state_dtype=torch.bfloat16), 3, model)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = FusedAdamW(model, lr=1e-2, state_dtype=torch.bfloat16)
    opt2.load_state_dict(sd)
    for p in model:
        st, st2 = opt.state[p], opt2.state[p]
        assert st2["master_param"].dtype == torch.float32 and torch.equal(st2["master_param"], st["master_param"])
        assert st2["exp_avg"].dtype == torch.bfloat16 and torch.equal(st2["exp_avg"], st["exp_avg"])
        assert float(st2["step"]) == 3.0


def test_cpu_adam_writes_16bit_copies_in_the_same_pass():
    params = _params()
    ref = _params()
    opt = CPUAdam(params, lr=1e-2, copy_dtype=torch.bfloat16)
    t = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    for step in range(5):
        for ps in (params, ref):
            for p, g in zip(ps, _grads(step)):
                p.grad = g.clone()
        opt.step()
        t.step()
    for p, r in zip(params, ref):
        assert _rel(p, r) <= 1e-6
        assert torch.equal(opt.model_copy(p), p.detach().bfloat16())
    with pytest.raises(ValueError, match="CPU float32"):
        CPUAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])


def test_bf16_moments_converge_like_fp32():
    """A small regression trained 150 steps: bf16 moments reach the fp32-moment loss within 10 %."""
    def train(state_dtype):
        torch.manual_seed(0)
        x = torch.randn(256, 16)
        y = torch.sin(x @ torch.randn(16, 1))
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        opt = FusedAdamW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
        for _ in range(150):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()
    l32, l16 = train(torch.float32), train(torch.bfloat16)
    assert l16 <= 1.1 * l32 + 1e-3, (l16, l32)


def test_bad_input():
    with pytest.raises(ValueError, match="lr must be"):
        FusedAdamW(_params(), lr=-1.0)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        FusedAdamW(_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="momentum must be in"):
        FusedSGD(_params(), lr=0.1, momentum=1.5)
