"""llmkern.optim.step_scalars: the global sum of squares over sharded gradients (each element counted
once), found_inf / grad_coef on the device, and their use by FusedAdamW.clip_grad_norm_ and the loss
scaler in real gloo runs: a 2x2 (dp x tp) layout where some parameters are sharded over tp, some
over tp and dp (ZeRO on top of TP), and norms and biases are replicated, against single-process
training on the full tensors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from llmkern.optim import (SHARDED_OVER, DynamicLossScaler, FusedAdamW, global_sumsq, grad_norm, sharded_over,
                           step_scalars)
from llmkern.testing import assert_close_to_ref, run_distributed

INF = float("inf")


def _oracle_norm(tensors):
    return torch.stack([t.double().pow(2).sum() for t in tensors]).sum().sqrt()


def test_local_sumsq_and_scalars_without_groups():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(97, generator=g), torch.randn(33, 17, generator=g), torch.randn(0, generator=g)]
    items = [(t, ()) for t in grads] + [(None, ())]
    sumsq = global_sumsq(items)
    assert sumsq.dtype == torch.float64 and sumsq.shape == (1,)
    norm = grad_norm(sumsq, 4.0)
    baseline = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads])) / 4.0
    assert_close_to_ref(norm, _oracle_norm(grads) / 4.0, baseline)
    # clip to 1 with the gradients carrying a scale of 4: grad_coef = clip / 4
    s = step_scalars(items, grad_scale=torch.tensor([4.0]), max_norm=1.0)
    assert float(s.found_inf) == 0.0
    torch.testing.assert_close(s.grad_coef, (1.0 / (norm + 1e-6) / 4.0).reshape(1), rtol=1e-6, atol=0)
    # nothing asked: no pass over the gradients, flag 0, coefficient 1
    s = step_scalars(items)
    assert s.sumsq is None and float(s.found_inf) == 0.0 and float(s.grad_coef) == 1.0
    grads[1][3, 4] = INF
    s = step_scalars(items, grad_scale=2.0)
    assert float(s.found_inf) == 1.0 and float(s.grad_coef) == 0.5


def test_sum_of_finite_squares_beyond_float32_is_finite():
    """Partial sums are widened to fp64 before they are added, so two tensors whose squares sum to
    more than float32's 3.4e38 do not read as an overflow (each partial alone fits)."""
    a = torch.full((4,), 6e18)
    items = [(a, ()), (a.clone(), ())]
    sumsq = global_sumsq(items)
    assert torch.isfinite(sumsq).all() and float(sumsq) == pytest.approx(8 * 6e18 ** 2, rel=1e-6)
    assert float(step_scalars(items, max_norm=1.0).found_inf) == 0.0


def test_bad_items():
    with pytest.raises(TypeError, match="item 0: expected a"):
        global_sumsq([torch.zeros(3)])
    with pytest.raises(TypeError, match="item 1: the groups must be a tuple"):
        global_sumsq([(torch.zeros(3), ()), (torch.zeros(3), None)])
    with pytest.raises(ValueError, match="pass device="):
        global_sumsq([(None, ())])
    with pytest.raises(ValueError, match="max_norm must be a number > 0"):
        step_scalars([(torch.zeros(3), ())], max_norm=0.0)
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
        step_scalars([(torch.zeros(3), ())], grad_scale=0.0)
    p = torch.nn.Parameter(torch.zeros(2))
    setattr(p, SHARDED_OVER, "tp")
    with pytest.raises(TypeError, match="must be a tuple of torch.distributed ProcessGroups"):
        sharded_over(p)


# ---- the 2x2 layout ------------------------------------------------------------------------------
# rank = 2 * dp + tp. W1 (12x10) is split by rows over tp and replicated over dp; W2 (10x7, stored as
# 70 elements) is split over tp then dp (each rank a quarter: ZeRO over TP); b (10) and the norm
# weight ln (10) are replicated on every rank.
SHAPES = {"W1": (12, 10), "W2": (10, 7), "b": (10,), "ln": (10,)}


def _full(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def _shard(full, dp, tp):
    return {"W1": full["W1"].chunk(2, 0)[tp].clone(),
            "W2": full["W2"].reshape(-1).chunk(2)[tp].chunk(2)[dp].clone(),
            "b": full["b"].clone(), "ln": full["ln"].clone()}


def _mesh(rank):
    dp, tp = divmod(rank, 2)
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]   # every rank creates every group
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return dp, tp, tp_groups[dp], dp_groups[tp]


def _sharded_params(full, dp, tp, tp_group, dp_group):
    params = {k: torch.nn.Parameter(v) for k, v in _shard(full, dp, tp).items()}
    setattr(params["W1"], SHARDED_OVER, (tp_group,))
    setattr(params["W2"], SHARDED_OVER, (tp_group, dp_group))
    return params


def _tp_run(rank, world, steps, plant):
    """Clip + FusedAdamW on the shards for `steps` steps; returns the norms and this rank's shards.
    plant = (rank, name): that rank's gradient of `name` gets an inf at the last step."""
    dp, tp, tp_group, dp_group = _mesh(rank)
    params = _sharded_params(_full(0), dp, tp, tp_group, dp_group)
    opt = FusedAdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=1000)   # no process group: the gradients' groups suffice
    norms, skipped, before = [], [], None
    for step in range(steps):
        grads = _shard(_full(100 + step, scale=8.0), dp, tp)
        for k, p in params.items():
            p.grad = grads[k]
        if step == steps - 1 and plant is not None:
            before = {k: p.detach().clone() for k, p in params.items()}
            if rank == plant[0]:
                params[plant[1]].grad.view(-1)[1] = INF
        norms.append(scaler.clip_grad_norm_(opt, 1.0))
        skipped.append(bool(scaler.step(opt)))
        scaler.update()
    unchanged = before is not None and all(torch.equal(before[k], p.detach()) for k, p in params.items())
    return norms, skipped, {k: p.detach() for k, p in params.items()}, unchanged


def _single_process(steps):
    params = {k: torch.nn.Parameter(v) for k, v in _full(0).items()}
    opt = FusedAdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    norms = []
    for step in range(steps):
        for k, g in _full(100 + step).items():
            params[k].grad = g
        norms.append(opt.clip_grad_norm_(1.0))
        opt.step()
    return norms, {k: p.detach() for k, p in params.items()}


@pytest.mark.distributed
def test_tp_dp_norm_counts_every_element_once_and_trains_like_one_process():
    steps = 3
    results = run_distributed(_tp_run, 4, args=(steps, None), timeout=180.0)
    ref_norms, ref_params = _single_process(steps)
    for step in range(steps):
        full = _full(100 + step)
        oracle = _oracle_norm(list(full.values()))
        baseline = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in full.values()]))
        for rank, (norms, skipped, _, _) in enumerate(results):
            assert not skipped[step]
            assert_close_to_ref(norms[step], oracle, baseline, name=f"rank {rank} step {step}")
    for rank, (_, _, shards, _) in enumerate(results):
        want = _shard(ref_params, *divmod(rank, 2))
        for k in SHAPES:
            rel = ((shards[k].double() - want[k].double()).abs().max() / want[k].double().abs().max()).item()
            assert rel <= 1e-6, (rank, k, rel)


@pytest.mark.distributed
@pytest.mark.parametrize("plant", [(3, "W2"), (1, "ln")], ids=["sharded-over-tp-and-dp", "replicated"])
def test_overflow_on_one_rank_skips_on_every_rank(plant):
    """An inf in one rank's shard (or in one rank's copy of a replicated parameter) skips the step on
    all four ranks and changes nothing, bit for bit; the loss scale is cut everywhere."""
    results = run_distributed(_tp_run, 4, args=(2, plant), timeout=180.0)
    for rank, (_, skipped, _, unchanged) in enumerate(results):
        assert skipped == [False, True], rank
        assert unchanged, rank


def _process_group_arg(rank, world, missing_rank):
    """process_group= (every parameter sharded over it) and a parameter whose gradient is None on one
    rank: that rank still joins the collective, and its shard counts as zero."""
    full = _full(7)["W2"].reshape(-1)
    shard = torch.nn.Parameter(full.chunk(world)[rank].clone())
    other = torch.nn.Parameter(torch.zeros(3))
    shard.grad = full.chunk(world)[rank].clone()
    other.grad = None if rank == missing_rank else torch.full((3,), float(rank + 1))
    opt = FusedAdamW([shard, other], lr=1e-2, process_group=dist.group.WORLD)
    norm = opt.clip_grad_norm_(1.0)
    # a deepcopy shares the process groups (they cannot be copied) and keeps the parameters' sharding
    setattr(shard, SHARDED_OVER, (dist.group.WORLD,))
    twin = copy.deepcopy(opt)
    tshard, tother = twin.param_groups[0]["params"]
    assert twin.process_group is dist.group.WORLD and getattr(tshard, SHARDED_OVER) == (dist.group.WORLD,)
    tshard.grad, tother.grad = shard.grad.clone(), None if other.grad is None else other.grad.clone()
    return norm, twin.clip_grad_norm_(1.0)


@pytest.mark.distributed
def test_process_group_argument_and_a_missing_gradient():
    world = 2
    results = run_distributed(_process_group_arg, world, args=(0,), timeout=120.0)
    full = _full(7)["W2"].reshape(-1)
    others = torch.full((3,), 2.0)       # rank 1's; rank 0 has none
    oracle = _oracle_norm([full, others])
    baseline = torch.linalg.vector_norm(torch.cat([full, others]))
    for norm, twin_norm in results:
        assert_close_to_ref(norm, oracle, baseline)
        assert torch.equal(norm, twin_norm)
