"""DynamicLossScaler: the exact state machine (against torch.amp.GradScaler with hysteresis 1),
hysteresis, min/max clamps, state_dict, gradient accumulation, and overflow agreement across gloo
ranks whose gradient shards differ."""
from __future__ import annotations

import warnings

import pytest
import torch

from llmkern.optim import DynamicLossScaler, FusedAdamW, LossScalerConfig
from llmkern.testing import run_distributed

INF = float("inf")


def _script(n=60, seed=0):
    """A scripted overflow pattern: bursts, isolated overflows and clean runs long enough to grow."""
    g = torch.Generator().manual_seed(seed)
    flags = (torch.rand(n, generator=g) < 0.25).tolist()
    flags[10:14] = [True] * 4
    flags[20:40] = [False] * 20
    return flags


def test_matches_grad_scaler_with_hysteresis_1():
    cfg = LossScalerConfig(init_scale=2.0 ** 10, growth_interval=3, min_scale=2.0 ** -30, max_scale=2.0 ** 60)
    ours = DynamicLossScaler(cfg)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    for i, overflow in enumerate(_script()):
        theirs.scale(p.sum()).backward()
        if overflow:
            p.grad[1] = INF
        theirs.step(opt)
        theirs.update()
        ours.update(torch.tensor([1.0 if overflow else 0.0]))
        p.grad = None
        assert ours.get_scale() == theirs.get_scale(), f"step {i}"
        assert int(ours._growth_tracker) == int(theirs._growth_tracker), f"step {i}"


def test_hysteresis_counts_consecutive_overflows():
    s = DynamicLossScaler(LossScalerConfig(init_scale=1024.0, hysteresis=3, growth_interval=100))
    seq = [1, 1, 0, 1, 1, 1, 1, 1, 1]   # a clean step refills the budget
    scales = []
    for f in seq:
        s.update(torch.tensor([float(f)]))
        scales.append(s.get_scale())
    assert scales == [1024, 1024, 1024, 1024, 1024, 512, 512, 512, 256]
    assert s.overflow_steps == 8


def test_growth_and_max_scale():
    s = DynamicLossScaler(LossScalerConfig(init_scale=4.0, growth_interval=2, max_scale=16.0, min_scale=1.0))
    scales = []
    for _ in range(8):
        s.update(torch.zeros(1))
        scales.append(s.get_scale())
    assert scales == [4, 8, 8, 16, 16, 16, 16, 16]


def test_min_scale_clamps_warns_and_never_raises():
    s = DynamicLossScaler(LossScalerConfig(init_scale=4.0, min_scale=1.0))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(6):
            s.update(torch.ones(1))
    assert s.get_scale() == 1.0
    assert s.overflow_steps == 6 and s.min_scale_hits == 4     # 4 -> 2 -> 1, then 4 clamped cuts
    assert any("clamped at min_scale" in str(x.message) for x in w)


def test_state_dict_round_trip():
    s = DynamicLossScaler(LossScalerConfig(hysteresis=2, growth_interval=5))
    for f in [0, 1, 0, 0, 1, 1, 0]:
        s.update(torch.tensor([float(f)]))
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    for f in [0, 0, 1, 1, 0, 0, 0, 0, 0]:
        s.update(torch.tensor([float(f)]))
        t.update(torch.tensor([float(f)]))
        assert t.state_dict() == s.state_dict()


def test_bad_config():
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScalerConfig(backoff_factor=1.5)
    with pytest.raises(ValueError, match="min_scale <= init_scale"):
        LossScalerConfig(init_scale=0.5, min_scale=1.0)


def _model(seed=0, dtype=torch.float16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def test_gradient_accumulation_over_4_micro_batches():
    """scale() on each of 4 micro-batches, then one fused step (one unscale) on the fp16 model ==
    fp32 AdamW on the unscaled gradient summed over the micro-batches, to fp16 accuracy."""
    torch.manual_seed(1)
    xs = [torch.randn(8, 16) for _ in range(4)]
    model = _model()
    ref = _model(dtype=torch.float32)
    with torch.no_grad():
        for a, b in zip(model.parameters(), ref.parameters()):
            b.copy_(a)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0 ** 12))
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for _ in range(3):
        for x in xs:
            scaler.scale(model(x.half()).float().pow(2).mean() / 4).backward()
            ref(x).pow(2).mean().div(4).backward()
        assert not bool(scaler.step(opt))
        scaler.update()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        # fp16 forward/backward vs fp32: a few fp16 ulps after 3 steps
        torch.testing.assert_close(a.float(), b, rtol=4e-3, atol=4e-3)
    assert scaler.get_scale() == 2.0 ** 12 and scaler.overflow_steps == 0


def _sharded_overflow(rank, world, overflow_rank):
    import torch.distributed as dist
    torch.manual_seed(rank)
    shard = torch.nn.Parameter(torch.randn(10).half())      # each rank owns a different shard
    shard.grad = torch.randn(10).half()
    if rank == overflow_rank:
        shard.grad[3] = INF
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=256.0), process_group=dist.group.WORLD)
    opt = FusedAdamW([shard], lr=0.1)
    before = shard.detach().clone()
    skipped = bool(scaler.step(opt))
    scaler.update()
    return skipped, scaler.get_scale(), torch.equal(before, shard.detach())


@pytest.mark.distributed
def test_overflow_flag_agrees_across_ranks():
    results = run_distributed(_sharded_overflow, 2, args=(1,), timeout=120.0)
    assert results == [(True, 128.0, True), (True, 128.0, True)]
