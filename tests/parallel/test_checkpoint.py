"""save_checkpoint / load_checkpoint through DCP: a bit-exact round trip at the same world size (weights,
fp32 masters, moments, step, loss scaler), a checkpoint of stage 2 on 4 ranks resumed by stage 1 on 2
ranks and by stage 3 on 3 ranks, each continuing as the uninterrupted 4-rank run does, and
consolidation to one safetensors file without a process group."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llmkern.optim import DynamicLossScaler
from llmkern.parallel import ZeroConfig, apply_zero, load_checkpoint, save_checkpoint
from llmkern.testing import run_distributed

pytestmark = pytest.mark.distributed

GLOBAL = 12      # rows per step: splits over 4, 3 and 2 ranks
BUCKET_MB = 0.004


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(24, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 33), nn.GELU(), nn.Linear(33, 32)) for _ in range(2))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return _Blocks().to(dtype)


def _steps(zmodel, opt, rank, world, first, count, dtype=torch.float32, scaler=None):
    per = GLOBAL // world
    for step in range(first, first + count):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL, 24, generator=g).to(dtype), torch.randn(GLOBAL, 8, generator=g).to(dtype)
        loss = nn.functional.mse_loss(zmodel(x[rank * per:(rank + 1) * per]).float(), y[rank * per:(rank + 1) * per].float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
        opt.zero_grad()


def _everything(zmodel, opt):
    """Every state tensor of this rank (its shards), for bit-exact comparisons."""
    out = [s.clone() for s in zmodel.parameter_shards()] + [m.detach().clone() for m in opt.masters]
    out += [opt.state[m][k].clone() for m in opt.masters for k in ("exp_avg", "exp_avg_sq")]
    return out + [opt.step_count.clone()]


def _params(zmodel, model):
    with zmodel.gather_parameters():
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save(rank, world, directory):
    cfg = ZeroConfig(stage=2, reduce_bucket_mb=BUCKET_MB, timeout_s=30)
    model = _model()
    zmodel, opt = apply_zero(model, cfg, lr=1e-2, weight_decay=0.1)
    _steps(zmodel, opt, rank, world, 0, 3)
    save_checkpoint(f"{directory}/fp32", zmodel, opt, step=3)
    at_save = _params(zmodel, model)
    # the same world size: a fresh run (other weights) loads every state tensor bit for bit
    fresh = _model(seed=5)
    zfresh, ofresh = apply_zero(fresh, cfg, lr=5.0)
    extra = load_checkpoint(f"{directory}/fp32", zfresh, ofresh, step=None)
    exact = all(torch.equal(a, b) for a, b in zip(_everything(zmodel, opt), _everything(zfresh, ofresh)))
    exact &= ofresh.param_groups[0]["lr"] == 1e-2 and extra == {"step": 3}
    # fp16 with masters and the loss scaler
    m16 = _model(dtype=torch.float16)
    z16, o16 = apply_zero(m16, ZeroConfig(stage=2, reduce_bucket_mb=BUCKET_MB, reduce_dtype=torch.float32), lr=1e-2)
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=2)
    _steps(z16, o16, rank, world, 0, 3, torch.float16, scaler)
    save_checkpoint(f"{directory}/fp16", z16, o16, scaler=scaler)
    f16 = _model(seed=5, dtype=torch.float16)
    zf16, of16 = apply_zero(f16, ZeroConfig(stage=2, reduce_bucket_mb=BUCKET_MB, reduce_dtype=torch.float32), lr=1e-2)
    scaler2 = DynamicLossScaler()
    load_checkpoint(f"{directory}/fp16", zf16, of16, scaler=scaler2)
    exact16 = all(torch.equal(a, b) for a, b in zip(_everything(z16, o16), _everything(zf16, of16)))
    exact16 &= scaler2.state_dict() == scaler.state_dict() and len(o16.masters[0]) > 0
    _steps(zmodel, opt, rank, world, 3, 2)
    return {"exact": exact, "exact16": exact16, "at_save": at_save, "final": _params(zmodel, model)}


def _resume(rank, world, directory, stage, group):
    model = _model(seed=9)
    zmodel, opt = apply_zero(model, ZeroConfig(stage=stage, reduce_bucket_mb=BUCKET_MB, timeout_s=30), mesh=group,
                             lr=3.0)
    load_checkpoint(f"{directory}/fp32", zmodel, opt)
    loaded = _params(zmodel, model)
    step = float(opt.step_count)
    _steps(zmodel, opt, rank, world, 3, 2)
    final = _params(zmodel, model)
    zmodel.close()
    return {"loaded": loaded, "step": step, "final": final}


def _save_and_resume(rank, world, directory):
    """Saves on the 4 ranks, then resumes on the first 2 (stage 1) and on the first 3 (stage 3): subgroups
    of one set of processes, as starting three sets would cost more than the training."""
    out = _save(rank, world, directory)
    for size, stage in ((2, 1), (3, 3)):
        group = dist.new_group(list(range(size)))
        if rank < size:
            out[f"resumed_{size}"] = _resume(rank, size, directory, stage, group)
        dist.barrier()
    return out


def test_save_at_4_round_trip_and_resume_at_2_and_3(tmp_path):
    saved = run_distributed(_save_and_resume, 4, (str(tmp_path),), timeout=150)
    assert all(r["exact"] and r["exact16"] for r in saved)
    ref = saved[0]
    # 4 -> 2 ranks under stage 1 and 4 -> 3 ranks under stage 3: both reshard every parameter's chunks
    for world, stage in ((2, 1), (3, 3)):
        for r in [r[f"resumed_{world}"] for r in saved[:world]]:
            assert r["step"] == 3.0
            assert all(torch.equal(r["loaded"][n], t) for n, t in ref["at_save"].items())
            for n, t in ref["final"].items():  # continues as the 4-rank run, up to the reduction order
                err = (r["final"][n] - t).abs().max().item()
                assert err <= 1e-5 * max(1.0, t.abs().max().item()), (world, stage, n, err)
    # one safetensors file, read without a process group, loads into a plain model
    from safetensors.torch import load_file

    from llmkern.cli import main

    assert main(["checkpoint", "consolidate", str(tmp_path / "fp32"), str(tmp_path / "model.safetensors")]) == 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    plain = _model(seed=3)
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert all(torch.equal(p, ref["at_save"][n]) for n, p in plain.named_parameters())
    assert set(weights) == set(ref["at_save"])


def _fsdp2(seed, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _whole(model, opt):
    """FSDP2's parameters and optimizer state as whole tensors (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {**{f"model.{n}": t.clone() for n, t in msd.items()},
            **{f"optim.{n}.{k}": t.clone() for n, st in osd["state"].items() for k, t in st.items()}}


def _fsdp2_round_trip(rank, world, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model, opt = _fsdp2(0, mesh)
    per = GLOBAL // world
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL, 24, generator=g), torch.randn(GLOBAL, 8, generator=g)
        nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{directory}/fsdp2")
    ref = _whole(model, opt)
    # FSDP2 -> llmkern ZeRO-3 (other weights, another lr: both come from the checkpoint)
    zm = _model(seed=7)
    zmodel, zopt = apply_zero(zm, ZeroConfig(stage=3, timeout_s=30), lr=5.0, weight_decay=0.1)
    load_checkpoint(f"{directory}/fsdp2", zmodel, zopt)
    with zmodel.gather_parameters():
        into_zero = all(torch.equal(p, ref[f"model.{n}"]) for n, p in zm.named_parameters())
    into_zero &= zopt.param_groups[0]["lr"] == 1e-2 and float(zopt.step_count) == 2.0
    save_checkpoint(f"{directory}/zero3", zmodel, zopt)
    zmodel.close()
    # another model (a wider head) is refused before anything is read, naming the parameter and both shapes
    other = _model(seed=7)
    other.head = nn.Linear(32, 9)
    zother, oother = apply_zero(other, ZeroConfig(stage=3, timeout_s=30), lr=1e-2)
    try:
        load_checkpoint(f"{directory}/fsdp2", zother, oother)
        refused = ""
    except ValueError as e:
        refused = str(e)
    zother.close()
    # llmkern ZeRO-3 -> FSDP2 (a fresh model and optimizer), as torch users load: get_state_dict, dcp.load
    # (the optimizer keeps its own param groups), set_state_dict
    model2, opt2 = _fsdp2(9, mesh)
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": {"state": osd2["state"]}}, checkpoint_id=f"{directory}/zero3")
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    back = _whole(model2, opt2)
    return {"into_zero": into_zero, "keys": sorted(ref) == sorted(back), "refused": refused,
            "back": all(torch.equal(back[k], t) for k, t in ref.items())}


def test_fsdp2_checkpoint_loads_into_zero3_and_back(tmp_path):
    for r in run_distributed(_fsdp2_round_trip, 2, (str(tmp_path),), timeout=90):
        assert r["into_zero"] and r["keys"] and r["back"], r
        assert "shapes differ: ['model.head.weight: [8, 32] saved, [9, 32] here', 'model.head.bias: [8] saved, " \
               "[9] here'" in r["refused"], r["refused"]


def test_boxes_cover_a_flat_range_in_order():
    from llmkern.parallel.checkpoint import _boxes

    for shape in [(7,), (5, 3), (4, 3, 5), (2, 1, 3, 2)]:
        ref = torch.arange(math.prod(shape)).reshape(shape)
        for lo in range(ref.numel()):
            for hi in range(lo + 1, ref.numel() + 1):
                got = [ref[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1)
                       for off, size in _boxes(shape, lo, hi)]
                assert torch.equal(torch.cat(got), torch.arange(lo, hi)), (shape, lo, hi)
                assert len(got) <= 2 * len(shape) - 1
