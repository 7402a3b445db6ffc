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


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(init_scale=INF, max_scale=INF), ValueError, r"init_scale must be in \(0, 3.403e\+38\]"),
    (dict(max_scale=1e39), ValueError, r"max_scale must be in \(0, 3.403e\+38\]"),
    (dict(growth_interval=2.5), TypeError, "growth_interval must be an int >= 1, got float 2.5"),
    (dict(growth_interval=0), ValueError, "growth_interval must be an int >= 1, got 0"),
    (dict(hysteresis=True), TypeError, "hysteresis must be an int >= 1, got bool"),
    (dict(growth_factor=INF), ValueError, "growth_factor must be finite and > 1"),
    (dict(min_scale=0.0), ValueError, r"min_scale must be in \(0, "),
    (dict(init_scale="1024"), TypeError, "init_scale must be a number, got str"),
    (dict(init_scale=2.0 ** 30), ValueError, "min_scale <= init_scale <= max_scale"),
], ids=["inf-scales", "max-beyond-float32", "fractional-interval", "zero-interval", "bool-hysteresis",
        "inf-growth", "zero-min", "string-scale", "init-above-max"])
def test_config_is_validated_at_construction(kwargs, error, match):
    """Each was accepted before: init_scale=max_scale=inf skipped every step forever (inf * 0 grads
    are nan), growth_interval=2.5 was taken, and max_scale=1e39 failed only at the first update()."""
    with pytest.raises(error, match=match):
        LossScalerConfig(**kwargs)


def test_keyword_construction_as_grad_scaler_users_write_it():
    s = DynamicLossScaler(init_scale=2.0 ** 12, growth_interval=3, hysteresis=2)
    assert s.config == LossScalerConfig(init_scale=2.0 ** 12, growth_interval=3, hysteresis=2)
    assert s.get_scale() == 2.0 ** 12
    with pytest.raises(TypeError, match="a LossScalerConfig or its fields as keywords, not both"):
        DynamicLossScaler(LossScalerConfig(), init_scale=8.0)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['enabled'\].*'init_scale'"):
        DynamicLossScaler(enabled=True)
    with pytest.raises(TypeError, match="first argument is a LossScalerConfig, got str"):
        DynamicLossScaler("cpu")
    with pytest.raises(ValueError, match="growth_factor must be finite and > 1"):
        DynamicLossScaler(growth_factor=1.0)


def test_update_takes_a_bool_or_a_one_element_tensor():
    """update(True) and update(1) raised AttributeError ('bool' object has no attribute 'to')."""
    s = DynamicLossScaler(init_scale=64.0, growth_interval=2)
    s.update(True)
    assert s.get_scale() == 32.0 and s.overflow_steps == 1 and s.last_step_skipped
    s.update(False)
    s.update(torch.tensor(False))          # 0-d
    assert s.get_scale() == 64.0 and not s.last_step_skipped
    s.update(torch.tensor([3], dtype=torch.int32))
    assert s.get_scale() == 32.0
    with pytest.raises(TypeError, match=r"takes None \(the flag of the last step\(\)\), a bool, or a one-element "
                                        r"tensor.*got int 1"):
        s.update(1)
    with pytest.raises(ValueError, match=r"one element, got shape \(2,\)"):
        s.update(torch.zeros(2))
    assert s.get_scale() == 32.0 and s.overflow_steps == 2   # the refused calls changed nothing


class _StageOptimizer:
    """A ScaledStepOptimizer that is no llmkern optimizer (as a pipeline stage's could be): the scaler
    hands it tensors and reads its flag, and calls nothing else."""

    def __init__(self, overflow: bool):
        self.overflow, self.calls, self.last_step_skipped = overflow, [], None

    def step(self, closure=None, *, grad_scale=None, overflow_groups=()):
        self.calls.append(("step", grad_scale.clone(), tuple(overflow_groups)))
        self.last_step_skipped = torch.tensor(self.overflow)

    def clip_grad_norm_(self, max_norm, *, grad_scale=None):
        self.calls.append(("clip", grad_scale.clone(), max_norm))
        return torch.tensor(0.5)


def test_the_scaler_drives_any_scaled_step_optimizer_through_tensors():
    from llmkern.optim import ScaledStepOptimizer

    s = DynamicLossScaler(init_scale=256.0)
    clean, bad = _StageOptimizer(False), _StageOptimizer(True)
    assert isinstance(clean, ScaledStepOptimizer)
    assert not isinstance(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), ScaledStepOptimizer)
    assert float(s.clip_grad_norm_(clean, 2.0)) == 0.5
    assert not bool(s.step(clean)) and not s.last_step_skipped
    s.update()
    assert bool(s.step(bad)) and s.last_step_skipped
    s.update()
    assert s.get_scale() == 128.0
    assert [c[0] for c in clean.calls] == ["clip", "step"]
    assert all(float(c[1]) == 256.0 for c in clean.calls) and clean.calls[1][2] == ()


def test_torch_optimizers_get_grad_scalers_path():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    s = DynamicLossScaler(init_scale=4.0)
    p.grad = torch.full((3,), 8.0)
    assert not bool(s.step(opt))           # unscaled in place to 2, then stepped
    s.update()
    assert torch.equal(p.detach(), torch.full((3,), -1.0))
    p.grad = torch.tensor([1.0, INF, 1.0])
    assert bool(s.step(opt))
    s.update()
    assert torch.equal(p.detach(), torch.full((3,), -1.0)) and s.get_scale() == 2.0
    with pytest.raises(TypeError, match="needs an optimizer that unscales in its step"):
        s.clip_grad_norm_(opt, 1.0)
