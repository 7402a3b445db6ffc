"""The two lower layers without an optimizer, as ZeRO calls them: step_scalars and AdamWUpdate on
1-D shards of a flat fp32 master equal FusedAdamW on the whole tensor; and a full mixed-precision
step (loss scale, clip, per-parameter cohorts) never reads a device value on the host."""
from __future__ import annotations

import inspect

import pytest
import torch

from llmkern.ops.fused_adamw import fused_adamw_
from llmkern.optim import AdamWUpdate, DynamicLossScaler, FusedAdamW, advance_step_, launch_seed, step_scalars

N = 1025 * 3 + 7
SPLITS = (1000, 2050)            # three shards of unequal, odd lengths


def _data(step, device):
    g = torch.Generator().manual_seed(step)
    return torch.randn(N, generator=g).to(device)


def _shards(t):
    return list(torch.tensor_split(t, SPLITS))


def _run(device, clip, stochastic):
    """(whole tensor through FusedAdamW, shards through step_scalars + AdamWUpdate), after 4 steps."""
    kw = dict(state_dtype=torch.bfloat16, state_rounding="stochastic", rounding_seed=11) if stochastic else {}
    whole = torch.nn.Parameter(_data(0, device).bfloat16())
    opt = FusedAdamW([whole], lr=1e-2, weight_decay=0.1, **kw)
    master = whole.detach().float()                      # the flat fp32 master, as ZeRO keeps it
    copy16 = whole.detach().clone()
    state_dtype = kw.get("state_dtype", torch.float32)
    m, v = torch.zeros(N, dtype=state_dtype, device=device), torch.zeros(N, dtype=state_dtype, device=device)
    update = AdamWUpdate(state_rounding=kw.get("state_rounding", "nearest"))
    group = dict(opt.param_groups[0])
    step = torch.zeros(1, device=device)
    for k in range(1, 5):
        grad = _data(k, device).bfloat16() * 8
        whole.grad = grad.clone()
        if clip:
            opt.clip_grad_norm_(0.5)
        opt.step(grad_scale=8.0)
        items = [(g, ()) for g in _shards(grad)]
        scalars = step_scalars(items, grad_scale=8.0, max_norm=0.5 if clip else None)
        advance_step_(step, scalars)
        offsets = [0, *SPLITS]
        for j, (p, g, a, b, c) in enumerate(zip(_shards(master), _shards(grad), _shards(m), _shards(v),
                                               _shards(copy16))):
            extra = {"element_offset": offsets[j]} if stochastic else {}
            update(group, [p], [g], [[a], [b]], [c], step, scalars,
                   rounding_seed=launch_seed(11 if stochastic else 0, 0, True), **extra)
    return whole.detach(), opt.state[whole], copy16, master, m, v


@pytest.mark.cuda
def test_shards_equal_the_whole_tensor(device):
    whole, st, copy16, master, m, v = _run(device, clip=False, stochastic=False)
    assert torch.equal(master, st["master_param"]) and torch.equal(copy16, whole)
    assert torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"])


@pytest.mark.cuda
def test_clipped_shards_match_the_whole_tensor(device):
    """The clip coefficient comes from a sum of squares added shard by shard, so it may differ from
    the whole tensor's in its last bit: the masters agree to a few fp32 ulps."""
    whole, st, _, master, _, _ = _run(device, clip=True, stochastic=False)
    rel = ((master.double() - st["master_param"].double()).abs().max() / st["master_param"].abs().max()).item()
    assert rel <= 1e-6


@pytest.mark.cuda
@pytest.mark.skipif("element_offset" not in inspect.signature(fused_adamw_).parameters,
                    reason="fused_adamw_ has no element_offset argument yet (the op layer adds it)")
def test_stochastic_rounding_on_shards_draws_the_whole_tensors_bits(device):
    whole, st, copy16, master, m, v = _run(device, clip=False, stochastic=True)
    assert torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"])
    assert torch.equal(master, st["master_param"])


@pytest.mark.cuda
def test_a_full_mixed_precision_step_never_syncs():
    """Loss scale, clip, a late parameter (two cohorts) and the scaler's update on a GPU with
    torch.cuda's sync debug mode set to error: no host read of a device value."""
    device = "cuda"
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)).to(device, torch.float16)
    opt = FusedAdamW(model.parameters(), lr=1e-3)
    scaler = DynamicLossScaler(init_scale=1024.0, device=device)
    x = torch.randn(8, 16, device=device, dtype=torch.float16)
    for k in range(3):
        model[1].weight.requires_grad_(k > 0)         # unfrozen at step 1: a second cohort
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.scale(model(x).float().pow(2).mean()).backward()
            scaler.clip_grad_norm_(opt, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == [3.0, 3.0, 2.0, 3.0]
