"""Per-rank bytes of model states under ZeRO, predicted without running: `estimate_memory`, and the
table of `llmkern plan --zero`.

The ZeRO paper's per-rank model-state bytes for Ψ trainable parameters in a 16-bit dtype, N ranks and
K bytes of optimizer state per parameter (mixed-precision Adam: fp32 master, exp_avg, exp_avg_sq,
K = 12):

    data parallel   2Ψ + 2Ψ + KΨ
    stage 1         2Ψ + 2Ψ + KΨ/N
    stage 2         2Ψ + (2 + K)Ψ/N
    stage 3         (2 + 2 + K)Ψ/N

Here every Ψ/N is exact, not rounded: llmkern.parallel.zero lays the trainable parameters out in flat
buckets (llmkern.parallel.buffers.FlatLayout: reverse registration order, at most `reduce_bucket_mb`
per bucket, one dtype per bucket) and pads each bucket with zeros to a multiple of N, so a rank's
shard of a bucket of P elements is ceil(P/N) elements: the padding is at most N-1 elements per
bucket. Given a module (a `meta` one is fine), the buckets are those the engine would build; given a
parameter count, the parameters are one flat bucket. fp32 parameters need no master: K = 8.
Frozen parameters (a LoRA base) add their bytes to the parameters, sharded in stage 3.

Bytes communicated per step and rank: stages 1 and 2 reduce-scatter the gradients and all-gather
the parameters, (N-1)/N × 2Ψ each, as data parallelism's all-reduce; stage 3 gathers the parameters
twice (forward and backward), 1.5× that.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from llmkern.parallel.buffers import FlatLayout
from llmkern.parallel import zero
from llmkern.parallel.zero import ZeroConfig, ZeroMemory

_ADAM_MOMENTS = 2


def _bucket_sizes(model_or_param_count, config: ZeroConfig, world_size: int, param_dtype):
    """(padded element count of each trainable bucket, frozen elements, element size)."""
    if isinstance(model_or_param_count, nn.Module):
        model = model_or_param_count
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        dtype = param_dtype if param_dtype is not None else (trainable[0].dtype if trainable else torch.float32)
        stand_ins = [torch.empty(p.shape, dtype=dtype, device="meta") for p in trainable]
        layout = FlatLayout(stand_ins, bucket_bytes=int(config.reduce_bucket_mb * 2**20), pad_to=world_size)
        padded = [b.padded_numel for b in layout.buckets]
    elif isinstance(model_or_param_count, int) and not isinstance(model_or_param_count, bool):
        if model_or_param_count < 0:
            raise ValueError(f"estimate_memory: a parameter count must be >= 0, got {model_or_param_count}")
        dtype = param_dtype if param_dtype is not None else torch.bfloat16
        frozen = 0
        padded = [-(-model_or_param_count // world_size) * world_size] if model_or_param_count else []
    else:
        raise TypeError(f"estimate_memory: expected an nn.Module or a parameter count (int), got "
                        f"{type(model_or_param_count).__name__}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"estimate_memory: param_dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    return padded, frozen, torch.empty((), dtype=dtype).element_size()


def estimate_memory(model_or_param_count, config: ZeroConfig, world_size: int, *,
                    param_dtype: torch.dtype | None = None, state_dtype: torch.dtype = torch.float32) -> ZeroMemory:
    """Per-rank bytes of parameters, gradients and optimizer states (AdamW) and bytes sent per step under
    `config` on `world_size` ranks (see the module docstring for the formulas and the padding).

    model_or_param_count: a module (any device, `meta` included) or the number of trainable parameters.
    param_dtype: the parameters' dtype (default: the module's, bfloat16 for a count); 16-bit means fp32
        masters in the optimizer, as in the paper.
    state_dtype: the moments' dtype (torch.float32, or torch.bfloat16 as FusedAdamW's state_dtype)."""
    if not isinstance(config, ZeroConfig):
        raise TypeError(f"estimate_memory: config must be a ZeroConfig, got {type(config).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"estimate_memory: world_size must be an int >= 1, got {world_size!r}")
    if config.stage == 3 and isinstance(model_or_param_count, nn.Module):
        return _estimate_stage3(model_or_param_count, config, world_size, param_dtype, state_dtype)
    padded, frozen, e = _bucket_sizes(model_or_param_count, config, world_size, param_dtype)
    n = world_size
    shard = sum(p // n for p in padded)       # this rank's elements of the trainable buckets
    whole = sum(padded)
    k = _state_bytes(e, state_dtype)
    frozen_bytes = frozen * e if config.stage < 3 else -(-frozen // n) * e
    params = (whole if config.stage < 3 else shard) * e + frozen_bytes
    grads = whole * e if config.stage == 1 else shard * e
    states = shard * k
    host = 0
    if config.offload_optimizer:
        # on the host: a separate fp32 master (fp32 parameters too), the moments, the fp32 gradient shard
        # the step reads and, for 16-bit parameters, the buffer the step writes the 16-bit copy into
        moments = k - (4 if e == 2 else 0)
        host, states = shard * (4 + moments + 4 + (e if e == 2 else 0)), 0
    gathers = 2 if config.stage == 3 and config.reshard_after_forward else 1
    sent = (n - 1) * shard * e * (1 + gathers)
    return ZeroMemory(parameters=params, gradients=grads, optimizer_states=states, gathered=0, communicated=sent,
                      host_optimizer_states=host)


def _state_bytes(e: int, state_dtype: torch.dtype) -> int:
    return _ADAM_MOMENTS * torch.empty((), dtype=state_dtype).element_size() + (4 if e == 2 else 0)


def _estimate_stage3(model: nn.Module, config: ZeroConfig, n: int, param_dtype, state_dtype) -> ZeroMemory:
    """Stage 3 of a module: the engine's units (zero.stage3_units), each holding one flat buffer per
    (dtype, trainable, persistent) padded to a multiple of n; the root unit is gathered once per step, the
    others twice (forward, backward) unless reshard_after_forward is off; persistent flats (parameters of
    at most param_persistence_threshold elements) are held whole and gathered once after a step."""
    units = zero.stage3_units(model)
    params = grads = states = sent = 0
    full = []
    for u, named in enumerate(zero._unit_params(model, units)):
        unit_full = 0
        root = u == len(units) - 1
        times = 1 if root or not config.reshard_after_forward else 2
        for (dtype, trainable, persistent), group in zero._flat_groups(named, config.param_persistence_threshold):
            e = torch.empty((), dtype=param_dtype or dtype).element_size()
            k = -(-sum(p.numel() for _, p in group) // n)
            if persistent:  # whole on every rank, gathered once after a step when trainable
                params += k * n * e
                gathers = int(trainable)
            else:
                unit_full += k * n * e
                params += k * e
                gathers = times
            sent += (n - 1) * k * e * (gathers + int(trainable))
            if trainable:
                grads += k * e
                states += k * _state_bytes(e, state_dtype)
        full.append(unit_full)
    gathered = full[-1] + sum(sorted(full[:-1], reverse=True)[:1 + config.prefetch])
    host = 0
    if config.offload_optimizer:  # as for stages 1 and 2 (estimate_memory), on the trainable shards
        for named in zero._unit_params(model, units):
            for (dtype, trainable, _), group in zero._flat_groups(named, config.param_persistence_threshold):
                if trainable:
                    e = torch.empty((), dtype=param_dtype or dtype).element_size()
                    k = -(-sum(p.numel() for _, p in group) // n)
                    moments = _state_bytes(e, state_dtype) - (4 if e == 2 else 0)
                    host += k * (4 + moments + 4 + (e if e == 2 else 0))
        states = 0
    return ZeroMemory(parameters=params, gradients=grads, optimizer_states=states, gathered=gathered,
                      communicated=sent, host_optimizer_states=host)


def format_plan(model_or_param_count, world_size: int, *, param_dtype: torch.dtype | None = None,
                reduce_bucket_mb: float = 25.0, offload_optimizer: bool = False) -> str:
    """The table `llmkern plan --zero` prints: per-rank GiB of each model state for data parallelism and
    ZeRO stages 1-3 on `world_size` ranks, and GiB sent per step."""
    gib = 2.0 ** 30
    rows = []
    dp = estimate_memory(model_or_param_count, ZeroConfig(stage=1, reduce_bucket_mb=reduce_bucket_mb), 1,
                         param_dtype=param_dtype)
    dp_sent = 2 * (world_size - 1) / world_size * dp.parameters
    rows.append(("DP", dp.parameters, dp.gradients, dp.optimizer_states, 0, dp_sent))
    for stage in (1, 2, 3):
        cfg = ZeroConfig(stage=stage, reduce_bucket_mb=reduce_bucket_mb, offload_optimizer=offload_optimizer)
        m = estimate_memory(model_or_param_count, cfg, world_size, param_dtype=param_dtype)
        rows.append((f"ZeRO-{stage}", m.parameters, m.gradients, m.optimizer_states, m.host_optimizer_states,
                     m.communicated))
    head = f"{'':8} {'params':>10} {'grads':>10} {'optim':>10} {'total':>10} {'host':>10} {'sent/step':>10}"
    lines = [f"model states per rank (GiB) on {world_size} ranks", head]
    for name, p, g, o, h, s in rows:
        lines.append(f"{name:8} {p / gib:10.3f} {g / gib:10.3f} {o / gib:10.3f} {(p + g + o) / gib:10.3f} "
                     f"{h / gib:10.3f} {s / gib:10.3f}")
    return "\n".join(lines)


def _model_from_config(path: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    """`llmkern plan --zero (--params N | --config DIR_OR_JSON) --world-size N [--dtype bf16]`."""
    ap = argparse.ArgumentParser(prog="llmkern plan --zero", description="ZeRO model-state bytes per rank "
                                 "(the ZeRO paper's formulas on llmkern's padded flat layout)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", type=float, help="trainable parameter count (e.g. 7e9)")
    src.add_argument("--config", help="a Hugging Face config (a directory or config.json); built on 'meta'")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--offload", action="store_true", help="optimizer states on the host (ZeroConfig.offload_optimizer)")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        ap.error(f"--world-size must be >= 1, got {args.world_size}")
    what = int(args.params) if args.params is not None else _model_from_config(args.config)
    print(format_plan(what, args.world_size, param_dtype=_DTYPES[args.dtype], reduce_bucket_mb=args.bucket_mb,
                      offload_optimizer=args.offload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
