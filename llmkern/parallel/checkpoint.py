"""Checkpoints of ZeRO training through torch.distributed.checkpoint (DCP), keyed by parameter names,
readable at any world size and any ZeRO stage.

    save_checkpoint("ckpt/step100", model, optimizer, scaler=scaler, step=100)
    extra = load_checkpoint("ckpt/step100", model, optimizer, scaler=scaler)   # at any world size

What is saved, per trainable parameter `name` (its fully qualified name in the wrapped module):
"model.<name>" (the 16-bit or fp32 weights), and "optim.<name>.master" (fp32 masters of 16-bit
parameters), "optim.<name>.exp_avg", "optim.<name>.exp_avg_sq" (the optimizer's state keys), each as
the parameter *flattened* to 1-D. A rank's shard of a flat bucket covers a contiguous range of
each parameter it touches, so a 1-D chunk is what it owns: every rank writes its chunks of a
torch.distributed ShardedTensor whose global metadata every rank computes from the layout, with no
collective. Loading builds the same ShardedTensors for the loading run's layout, so DCP's planner
reads, for every chunk, the overlapping ranges of whatever chunks were written: a checkpoint of
stage 2 on 4 ranks loads into stage 3 on 3 ranks. The local shards are views into the engine's
buffers, so loading writes straight into them. Frozen parameters outside the flat buffers and
module buffers are saved whole (DCP writes a replicated tensor once). "optim.step" holds the step
count, "meta" (pickled) the parameters' shapes, dtypes and the param group hyperparameters, and
"extra.<key>" each keyword of save_checkpoint (an object with state_dict(), such as the loss
scaler, is saved as its state_dict).

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


def _sharded(local: torch.Tensor | None, mine, everyone, numel: int, dtype: torch.dtype, group) -> ShardedTensor:
    """A 1-D ShardedTensor of `numel` elements: `everyone` lists (rank, offset, length) of every chunk,
    `mine` (offset, length) this rank's, whose data is `local`."""
    device = local.device if local is not None else torch.device("cpu")
    metas = [ShardMetadata(shard_offsets=[o], shard_sizes=[n], placement=f"rank:{r}/{device}")
             for r, o, n in everyone]
    props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    shards = [Shard(tensor=local, metadata=m) for m, (r, _, _) in zip(metas, everyone)
              if r == dist.get_rank(group)] if local is not None else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        shards, ShardedTensorMetadata(shards_metadata=metas, size=torch.Size([numel]), tensor_properties=props),
        process_group=group)


def _state(model, optimizer) -> tuple[dict, dict]:
    """The DCP state dict of (model, optimizer) whose tensors alias the engine's buffers, and the meta."""
    sd: dict = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    group, world, rank = model.group, model.world, model.rank
    masters = optimizer.masters if optimizer is not None else []
    keys = optimizer.fused_update.state_keys if optimizer is not None else ()
    t = 0
    for flat in model.checkpoint_flats():
        opt_tensors: dict[str, torch.Tensor] = {}
        if flat["trainable"] and optimizer is not None:
            m = masters[t]
            if m.data_ptr() != flat["shard"].data_ptr():
                opt_tensors["master"] = m
            for key in keys:
                opt_tensors[key] = optimizer.state[m][key]
            t += 1
        chunks = [_pieces(flat["names"], flat["shapes"], flat["offsets"], flat["k"], r) for r in range(world)]
        mine = {i: (plo, slo, n) for i, plo, slo, n in chunks[rank]}
        for i, name in enumerate(flat["names"]):
            numel = math.prod(flat["shapes"][i])
            shapes[name], dtypes[name] = list(flat["shapes"][i]), str(flat["shard"].dtype)
            everyone = [(r, plo, n) for r in range(world) for j, plo, _, n in chunks[r] if j == i]
            here = mine.get(i)
            for key, source in [("model", flat["shard"]), *((f"optim.{k}", v) for k, v in opt_tensors.items())]:
                local = source[here[1]:here[1] + here[2]] if here is not None else None
                full_key = f"model.{name}" if key == "model" else f"optim.{name}.{key[6:]}"
                sd[full_key] = _sharded(local, here, everyone, numel, source.dtype, group)
    flat_ids = {id(p) for flat in model.checkpoint_flats() for p in flat["params"]}
    for name, p in model.module.named_parameters():
        if id(p) not in flat_ids:  # frozen parameters stages 1 and 2 keep whole
            sd[f"model.{name}"] = p.data
            shapes[name], dtypes[name] = list(p.shape), str(p.dtype)
    for name, b in model.module.named_buffers():
        sd[f"buffer.{name}"] = b
    if optimizer is not None:
        sd["optim.step"] = optimizer.step_count
    return sd, state_meta(shapes, dtypes, optimizer)


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
    write_state(directory, *_state(model, optimizer), extra, process_group=model.group)


def load_checkpoint(directory, model, optimizer=None, **extra) -> dict:
    """Loads a checkpoint of save_checkpoint, written at any world size and ZeRO stage, into model and
    optimizer (built with apply_zero at this run's world size); `extra` names the keywords to restore:
    an object with load_state_dict() is loaded in place. Returns {key: the saved value} of `extra`."""
    model.wait_for_parameters()
    out = read_state(directory, *_state(model, optimizer), optimizer, extra, process_group=model.group)
    model.after_load()
    return out


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
