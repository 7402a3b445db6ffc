"""llmkern.parallel.mesh: degrees checked against the world size, a (pp, dp, tp) DeviceMesh whose groups
are torch's own (DTensor works on them), axis names accepted wherever a group is, and the optimizer's
global gradient norm counting every element once when parameters say what they are sharded over.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmkern.optim import FusedAdamW
from llmkern.parallel import DDPConfig, DistributedDataParallel
from llmkern.parallel.mesh import ParallelConfig, ParallelDims, init_mesh, mark_sharded, sharded_over
from llmkern.testing import run_distributed


@pytest.mark.parametrize("config,world,message", [
    (ParallelConfig(dp=2, tp=2, pp=2), 4, r"dp \* tp \* pp = 8 ranks, but the world size is 4"),
    (ParallelConfig(tp=3), 4, r"tp \* pp = 3 does not divide the world size 4"),
    (ParallelConfig(tp=0), 4, r"ParallelConfig.tp must be a positive integer, got 0"),
    (ParallelConfig(dp=0), 4, r"ParallelConfig.dp must be a positive integer or -1"),
])
def test_degrees_are_checked_against_the_world_size(config, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.from_config(config, world)


def test_degrees_and_coordinates():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, pp=2), 8)
    assert (dims.dp, dims.tp, dims.pp) == (2, 2, 2)
    assert dims.shape == (2, 2, 2)
    # tp ranks adjacent, pipeline stages farthest apart
    assert dims.coordinates(0) == {"pp": 0, "dp": 0, "tp": 0}
    assert dims.coordinates(1) == {"pp": 0, "dp": 0, "tp": 1}
    assert dims.coordinates(2) == {"pp": 0, "dp": 1, "tp": 0}
    assert dims.coordinates(5) == {"pp": 1, "dp": 0, "tp": 1}


def _full_grads():
    g = torch.Generator().manual_seed(3)
    return {"w1": torch.randn(8, 6, generator=g), "b1": torch.randn(8, generator=g),
            "w2": torch.randn(5, 8, generator=g), "b2": torch.randn(5, generator=g),
            "norm": torch.randn(6, generator=g), "emb": torch.randn(12, 6, generator=g)}


def _norm_on_2x2(rank, world):
    """A TP-like split over tp (w1/b1 column-parallel, w2 row-parallel; b2 and the norm weight
    replicated), and a ZeRO-like parameter split over tp and dp together."""
    mesh = init_mesh(ParallelConfig(tp=2))
    tp = mesh["tp"].get_local_rank()
    dp = mesh["dp"].get_local_rank()
    full = _full_grads()
    shards = {
        "w1": full["w1"].chunk(2, 0)[tp], "b1": full["b1"].chunk(2, 0)[tp], "w2": full["w2"].chunk(2, 1)[tp],
        "b2": full["b2"], "norm": full["norm"], "emb": full["emb"].reshape(-1).chunk(4)[dp * 2 + tp],
    }
    params = {k: nn.Parameter(torch.zeros_like(g)) for k, g in shards.items()}
    for k, p in params.items():
        p.grad = shards[k].clone()
    for k in ("w1", "b1", "w2"):
        mark_sharded(params[k], "tp")
    mark_sharded(params["emb"], "tp", "dp", mesh=mesh)
    opt = FusedAdamW(list(params.values()), lr=1e-3)
    norm = opt.clip_grad_norm_(1e9)
    return (norm.item(), [len(sharded_over(p)) for p in params.values()]), _ddp_on_dp_axis(mesh)


@pytest.mark.distributed
def test_on_a_2x2_mesh():
    """One world-4 run (building the mesh dominates): the optimizer's global grad norm counts every
    element once; DDP averages over the dp axis only, next to DTensor on the tp axis."""
    full = _full_grads()
    expected = torch.sqrt(sum(g.double().pow(2).sum() for g in full.values())).item()
    for (norm, marks), (dtensor_ok, diff, sent) in run_distributed(_norm_on_2x2, 4, timeout=120):
        assert norm == pytest.approx(expected, rel=1e-6)  # fp64 sums, returned as float32
        assert marks == [1, 1, 1, 0, 0, 2]
        assert dtensor_ok
        assert diff < 1e-6
        assert sent == (4 * 3 + 3) * 4  # a 2-rank all-reduce sends the whole bucket once


def _ddp_on_dp_axis(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    # DTensor runs on the same mesh: the groups are torch's own
    full = torch.arange(8.0).reshape(4, 2)
    dt = distribute_tensor(full, mesh["tp"], [Shard(0)])
    dtensor_ok = torch.equal(dt.full_tensor(), full) and dt.to_local().shape == (2, 2)
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    ddp = DistributedDataParallel(m, DDPConfig(timeout_s=60), group="dp")
    dp = mesh["dp"].get_local_rank()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(9))
    ddp(x[dp * 2:dp * 2 + 2]).sum().backward()
    ref = nn.Linear(4, 3)
    ref.load_state_dict(m.state_dict())
    ref(x).sum().backward()
    diff = max((p.grad - q.grad / 2).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
    return dtensor_ok, diff, ddp.stats.last_step_bytes
