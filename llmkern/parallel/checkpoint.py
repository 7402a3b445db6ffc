"""Checkpoints of ZeRO training through torch.distributed.checkpoint (DCP), keyed by parameter names,
readable at any world size and any ZeRO stage.

    save_checkpoint("ckpt/step100", model, optimizer, scaler=scaler, step=100)
    extra = load_checkpoint("ckpt/step100", model, optimizer, scaler=scaler)   # at any world size

What is saved is what torch writes for `dcp.save({"model": model_sd, "optim": optim_sd})` with the
state dicts of torch.distributed.checkpoint.state_dict.get_state_dict (FSDP2, DDP, one process), so
each side loads the other's: "model.<name>" per parameter (its fully qualified name in the wrapped
module) and persistent buffer, in the parameter's shape; "optim.state.<name>.exp_avg",
".exp_avg_sq" (the optimizer's state keys), ".step" and, for 16-bit parameters, ".master" (the fp32
master; torch's optimizers step fp32 parameters and keep none, so loading their checkpoint makes
the masters the loaded weights); "optim.param_groups.<g>.<key>" the hyperparameters with "params"
the parameter names. A rank's shard of a flat bucket covers a contiguous row-major range of each
parameter it touches; that range is at most 2*ndim - 1 rectangular boxes (a partial first row, the
whole rows, a partial last row, recursively), each a view into the engine's buffers and one chunk of
a torch.distributed ShardedTensor whose global metadata every rank computes from the layout, with no
collective. Loading builds the same ShardedTensors for the loading run's layout, so DCP's planner
reads, for every box, the overlapping parts of whatever chunks were written (another world size,
another stage, FSDP2's row blocks) straight into the engine's buffers. Frozen parameters outside
the flat buffers are saved whole (DCP writes a replicated tensor once). "meta" (pickled) holds the
parameters' shapes and dtypes, "extra.<key>" each keyword of save_checkpoint (an object with
state_dict(), such as the loss scaler, is saved as its state_dict).

`consolidate(dir, out)` (`llmkern checkpoint consolidate DIR OUT`) reads a checkpoint without a
process group and writes the model's weights, reshaped, as one safetensors file that
`transformers`' loading or `peft` reads.
"""
from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch import nn

_FORMAT = 1


def _pieces(names, shapes, offsets, k: int, rank: int):
    """For each parameter of a flat, rank's chunk of it: (index, param_lo, shard_lo, length) where the
    rank's shard [rank*k, (rank+1)*k) meets the parameter's range of the flat."""
    lo_r, hi_r = rank * k, (rank + 1) * k
    out = []
    for i, (shape, off) in enumerate(zip(shapes, offsets)):
        n = math.prod(shape)
        lo, hi = max(off, lo_r), min(off + n, hi_r)
        if lo < hi:
            out.append((i, lo - off, lo - lo_r, hi - lo))
    return out


def _boxes(shape, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The flat (row-major) range [lo, hi) of a tensor of `shape` as rectangular boxes (offsets, sizes), in
    flat order: a partial first row, a block of whole rows, a partial last row, each partial row split
    the same way one dimension down (at most 2*ndim - 1 boxes)."""
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [((lo,), (hi - lo,))]
    row = math.prod(shape[1:])
    inner = tuple(shape[1:])
    first, last = lo // row, (hi - 1) // row
    if first == last:
        return [((first, *o), (1, *sz)) for o, sz in _boxes(inner, lo - first * row, hi - first * row)]
    out = []
    whole_lo, whole_hi = -(-lo // row), hi // row
    if lo % row:
        out += [((first, *o), (1, *sz)) for o, sz in _boxes(inner, lo % row, row)]
    if whole_hi > whole_lo:
        out.append(((whole_lo, *[0] * len(inner)), (whole_hi - whole_lo, *inner)))
    if hi % row:
        out += [((last, *o), (1, *sz)) for o, sz in _boxes(inner, 0, hi % row)]
    return out


def _sharded(local: list[torch.Tensor], everyone, shape, dtype: torch.dtype, group) -> ShardedTensor:
    """A ShardedTensor of `shape`: `everyone` lists (rank, offsets, sizes) of every box, `local` the data
    of this rank's boxes in the order they appear in `everyone`."""
    device = local[0].device if local else torch.device("cpu")
    me = dist.get_rank(group)
    metas = [ShardMetadata(shard_offsets=list(o), shard_sizes=list(sz), placement=f"rank:{r}/{device}")
             for r, o, sz in everyone]
    props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    shards = [Shard(tensor=t, metadata=m) for t, m in zip(local, [m for m, (r, _, _) in zip(metas, everyone) if r == me])]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(shape), tensor_properties=props),
        process_group=group)


def _persistent_buffers(module: nn.Module):
    """(name, buffer) of the buffers module.state_dict() holds (non-persistent ones are rebuilt by the
    module, as torch leaves them out of its state dicts)."""
    for prefix, m in module.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), b


def flats_with_state(flats, optimizer):
    """(flat, {"master": ..., "<state key>": ...}) for each flat of the engine's `checkpoint_flats()`: the
    optimizer's tensors of a trainable flat, in the order the optimizer holds its masters ("master" only
    where it is not the parameter shard itself); {} for a frozen flat or without an optimizer."""
    masters = optimizer.masters if optimizer is not None else []
    keys = optimizer.fused_update.state_keys if optimizer is not None else ()
    t = 0
    for flat in flats:
        tensors: dict[str, torch.Tensor] = {}
        if flat["trainable"] and optimizer is not None:
            m = masters[t]
            if m.data_ptr() != flat["shard"].data_ptr():
                tensors["master"] = m
            for key in keys:
                tensors[key] = optimizer.state[m][key]
            t += 1
        yield flat, tensors


def _state(model, optimizer) -> tuple[dict, dict, dict]:
    """The DCP state dict of (model, optimizer) whose tensors alias the engine's buffers, the meta, and
    {name: [(parameter shard, master shard, offset, length), ...]} for the 16-bit parameters with separate
    fp32 masters: where this rank's pieces of each lie (a checkpoint without masters, such as torch's,
    gives the masters the loaded weights)."""
    sd: dict = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    where: dict = {}
    group, world, rank = model.group, model.world, model.rank
    for flat, opt_tensors in flats_with_state(model.checkpoint_flats(), optimizer):
        chunks = [_pieces(flat["names"], flat["shapes"], flat["offsets"], flat["k"], r) for r in range(world)]
        for i, name in enumerate(flat["names"]):
            shape = tuple(flat["shapes"][i]) or (1,)  # a 0-d parameter as one element
            shapes[name], dtypes[name] = list(flat["shapes"][i]), str(flat["shard"].dtype)
            everyone, mine = [], []
            for r in range(world):
                for j, plo, slo, n in chunks[r]:
                    if j != i:
                        continue
                    at = slo
                    for o, sz in _boxes(shape, plo, plo + n):
                        everyone.append((r, o, sz))
                        if r == rank:
                            mine.append((at, sz))
                        at += math.prod(sz)
            if "master" in opt_tensors:
                where[name] = [(flat["shard"], opt_tensors["master"], slo, n) for j, _, slo, n in chunks[rank] if j == i]
            for key, source in [("model", flat["shard"]), *opt_tensors.items()]:
                local = [source[at:at + math.prod(sz)].view(sz) for at, sz in mine]
                full_key = f"model.{name}" if key == "model" else f"optim.state.{name}.{key}"
                sd[full_key] = _sharded(local, everyone, shape, source.dtype, group)
            if opt_tensors:
                sd[f"optim.state.{name}.step"] = optimizer.step_count.view(())
    flat_ids = {id(p) for flat in model.checkpoint_flats() for p in flat["params"]}
    for name, p in model.module.named_parameters():
        if id(p) not in flat_ids:  # frozen parameters stages 1 and 2 keep whole
            sd[f"model.{name}"] = p.data
            shapes[name], dtypes[name] = list(p.shape), str(p.dtype)
    for name, b in _persistent_buffers(model.module):
        sd[f"model.{name}"] = b
    if optimizer is not None:
        for g, group_ in enumerate(optimizer.param_groups):
            for key, value in group_.items():
                sd[f"optim.param_groups.{g}.{key}"] = value if key != "params" else optimizer.group_names[g]
    return sd, state_meta(shapes, dtypes, optimizer), where


def state_meta(shapes: dict, dtypes: dict, optimizer) -> dict:
    """The pickled "meta" entry: the format, every parameter's shape and dtype, the param group
    hyperparameters."""
    return {"format": _FORMAT, "shapes": shapes, "dtypes": dtypes,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if optimizer is not None else []}


def write_state(directory, sd: dict, meta: dict, extra: dict, process_group=None) -> None:
    """Adds "meta" and the "extra.<key>" entries to `sd` and saves it with DCP (a collective call)."""
    sd["meta"] = pickle.dumps(meta)
    for key, value in extra.items():
        sd[f"extra.{key}"] = pickle.dumps(value.state_dict() if hasattr(value, "state_dict") else value)
    dcp.save(sd, checkpoint_id=str(directory), process_group=process_group)


def read_state(directory, sd: dict, meta: dict, optimizer, extra: dict, process_group=None,
               shapes: str = "shapes") -> dict:
    """Loads `sd` (this run's layout) with DCP, checks the saved parameter shapes against `meta`'s
    (`shapes` names them in the error), restores the param group hyperparameters and the extras (an
    object with load_state_dict() in place). Returns {key: the saved value} of `extra`."""
    sd["meta"] = b""
    for key in extra:
        sd[f"extra.{key}"] = b""
    try:
        dcp.load(sd, checkpoint_id=str(directory), process_group=process_group)
    except Exception as e:  # noqa: BLE001 - DCP wraps missing keys and shape mismatches in CheckpointException
        raise RuntimeError(f"load_checkpoint({directory}): {type(e).__name__}: {e}") from e
    saved = pickle.loads(sd["meta"])
    mismatched = [n for n, s in meta["shapes"].items() if saved["shapes"].get(n) != s]
    if mismatched:
        raise ValueError(f"load_checkpoint({directory}): parameters {mismatched[:5]} have {shapes} "
                         f"{[saved['shapes'].get(n) for n in mismatched[:5]]} in the checkpoint, "
                         f"{[meta['shapes'][n] for n in mismatched[:5]]} in the model")
    if optimizer is not None:
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k in group})
    out = {}
    for key, target in extra.items():
        out[key] = pickle.loads(sd[f"extra.{key}"])
        if hasattr(target, "load_state_dict"):
            target.load_state_dict(out[key])
    return out


def save_checkpoint(directory, model, optimizer=None, **extra) -> None:
    """Saves model (a ZeroModel or Zero3Model), optimizer (its ZeroOptimizer) and `extra` (objects with a
    state_dict(), such as DynamicLossScaler, or picklable values) to `directory` with DCP. A collective
    call: every rank of the model's group makes it."""
    model.wait_for_parameters()
    sd, meta, _ = _state(model, optimizer)
    write_state(directory, sd, meta, extra, process_group=model.group)


def _saved_size(md) -> torch.Size | None:
    return getattr(md, "size", None)


def load_checkpoint(directory, model, optimizer=None, **extra) -> dict:
    """Loads a checkpoint of save_checkpoint, written at any world size and ZeRO stage, or one torch wrote
    with `dcp.save({"model": model_sd, "optim": optim_sd})` from `get_state_dict(model, optimizer)` (FSDP2,
    DDP, one process), into model and optimizer (built with apply_zero at this run's world size). `extra`
    names the keywords to restore: an object with load_state_dict() is loaded in place. Returns {key: the
    saved value} of `extra`. Masters absent from the checkpoint (torch's optimizers keep none) become
    the loaded weights in fp32; param-group hyperparameters absent from it stay as the optimizer has them."""
    model.wait_for_parameters()
    sd, _, where = _state(model, optimizer)
    try:
        saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a missing directory or metadata file, named below
        raise RuntimeError(f"load_checkpoint({directory}): cannot read the checkpoint's metadata: "
                           f"{type(e).__name__}: {e}") from e
    want: dict = {}
    missing, mismatched = [], []
    step_key = None
    no_master = set()
    for key, value in sd.items():
        if key.startswith("optim.param_groups."):
            continue  # read below from whatever groups the checkpoint has
        if key.endswith(".step") and key.startswith("optim.state."):
            if step_key is None and key in saved:
                step_key = key
                want[key] = value
            continue
        if key not in saved:
            if key.endswith(".master"):
                no_master.add(key[len("optim.state."):-len(".master")])
            else:
                missing.append(key)
            continue
        size = value.size() if isinstance(value, ShardedTensor) else value.shape
        if _saved_size(saved[key]) != size:
            mismatched.append(f"{key}: {list(_saved_size(saved[key]) or [])} saved, {list(size)} here")
        want[key] = value
    if optimizer is not None and step_key is None:
        missing.append("optim.state.<name>.step")
    # a parameter of another shape has optimizer states of that shape too: name the parameters alone
    mismatched = [m for m in mismatched if m.startswith("model.")] or mismatched
    if missing or mismatched:
        raise ValueError(f"load_checkpoint({directory}): the checkpoint does not fit this model: "
                         + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "")
                         + ("; " if missing and mismatched else "")
                         + (f"shapes differ: {mismatched[:5]}" if mismatched else ""))
    groups = sorted(k for k in saved if k.startswith("optim.param_groups.")) if optimizer is not None else []
    for key in groups:
        want[key] = None
    for key in extra:
        if f"extra.{key}" not in saved:
            raise ValueError(f"load_checkpoint({directory}): no extra {key!r} in the checkpoint (it has "
                             f"{sorted(k[6:] for k in saved if k.startswith('extra.'))})")
        want[f"extra.{key}"] = b""
    try:
        dcp.load(want, checkpoint_id=str(directory), process_group=model.group)
    except Exception as e:  # noqa: BLE001 - DCP wraps read errors in CheckpointException
        raise RuntimeError(f"load_checkpoint({directory}): {type(e).__name__}: {e}") from e
    with torch.no_grad():
        for name in no_master:
            for shard, master, lo, n in where.get(name, []):
                master[lo:lo + n].copy_(shard[lo:lo + n])
    if groups:
        _restore_groups(optimizer, {k: want[k] for k in groups})
    out = {}
    for key, target in extra.items():
        out[key] = pickle.loads(want[f"extra.{key}"])
        if hasattr(target, "load_state_dict"):
            target.load_state_dict(out[key])
    model.after_load()
    return out


def _restore_groups(optimizer, flat: dict) -> None:
    """Sets each param group's hyperparameters from the saved group holding its first parameter (saved
    as "optim.param_groups.<g>.<key>", "params" the parameter names); keys the group lacks are skipped."""
    saved: dict[int, dict] = {}
    for key, value in flat.items():
        g, name = key[len("optim.param_groups."):].split(".", 1)
        saved.setdefault(int(g), {})[name] = value
    owner = {n: g for g, grp in saved.items() for n in grp.get("params", [])}
    for group, names in zip(optimizer.param_groups, optimizer.group_names):
        src = saved.get(owner.get(names[0], -1)) if names else None
        if src is not None:
            group.update({k: v for k, v in src.items() if k != "params" and k in group})


def consolidate(directory, out) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, whole and in their shapes, written to `out` as safetensors (no
    process group needed); returns them."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    buf = Path(out).with_suffix(".consolidating.pt")
    dcp_to_torch_save(str(directory), str(buf))
    try:
        full = torch.load(buf, weights_only=False)
    finally:
        buf.unlink(missing_ok=True)
    meta = pickle.loads(full["meta"]) if isinstance(full["meta"], bytes) else pickle.load(io.BytesIO(full["meta"]))
    weights = {name: full[f"model.{name}"].reshape(shape).contiguous() for name, shape in meta["shapes"].items()}
    save_file(weights, str(out))
    return weights


def main(argv: list[str] | None = None) -> int:
    """`llmkern checkpoint consolidate DIR OUT`."""
    import argparse

    ap = argparse.ArgumentParser(prog="llmkern checkpoint")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="a DCP checkpoint of llmkern ZeRO -> one safetensors file")
    c.add_argument("directory")
    c.add_argument("out")
    args = ap.parse_args(argv)
    weights = consolidate(args.directory, args.out)
    print(f"wrote {len(weights)} tensors ({sum(t.numel() for t in weights.values())} elements) to {args.out}")
    return 0
