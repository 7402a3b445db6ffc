"""llmkern ZeRO 1/2/3 (and ZeRO-2 + offload) against torch's ZeroRedundancyOptimizer + DDP and FSDP2:
step time and per-rank model-state bytes of a tiny Llama on CPU/gloo.

    torchrun --nproc-per-node 2 bench/parallel/bench_zero.py [--quick] [--dtype bf16]

Every variant trains its own copy of the same model on the same batches; the variants take turns step
by step (so all see the same machine load), each step timed as the maximum over ranks. Model-state
bytes per rank are counted from what each variant holds after a step (parameters, gradients,
optimizer states; llmkern's from ZeroModel.memory(), checked against estimate_memory). Ratios (goal
<= 1.0): ZeRO-3 step time / FSDP2's, ZeRO-3 bytes / FSDP2's, ZeRO-1 and ZeRO-2 step time /
ZeroRedundancyOptimizer + DDP's, and measured / estimated bytes. Rank 0 prints the table and writes
bench/results/zero_w<n>.{csv,json}.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llmkern.optim import FusedAdamW
from llmkern.parallel import DDPConfig, ZeroConfig, apply_ddp, apply_zero, estimate_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import ContentionMeter, Ratio, environment, format_table, write_results

TORCHRUN_NPROC = (2,)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards); views into one
    flat buffer (DDP's buckets, FSDP2's sharded gradients) count their buffer once."""
    storages = {}
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        st = local.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _torch_state_bytes(model, opt) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) this rank holds in a torch DDP / FSDP2 model."""
    params = list(model.parameters())
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer holds the local optimizer
    states = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    return _bytes(params), _bytes(p.grad for p in params), _bytes(states)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--quick", action="store_true", help="2 layers of 256, 3 steps")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.layers, args.hidden = 3, 2, 256
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8192, max_position_embeddings=128,
                      attn_implementation="sdpa")
    base = LlamaForCausalLM(cfg).to(dtype)
    n_params = sum(p.numel() for p in base.parameters())
    variants, opts, zero_cfgs = {}, {}, {}
    ddp = apply_ddp(copy.deepcopy(base), DDPConfig())
    variants["llmkern DDP"], opts["llmkern DDP"] = ddp, FusedAdamW(ddp.parameters(), lr=1e-4)
    for name, zc in {"llmkern ZeRO-1": ZeroConfig(stage=1), "llmkern ZeRO-2": ZeroConfig(stage=2),
                     "llmkern ZeRO-3": ZeroConfig(stage=3),
                     "llmkern ZeRO-2 + offload": ZeroConfig(stage=2, offload_optimizer=True)}.items():
        variants[name], opts[name] = apply_zero(copy.deepcopy(base), zc, lr=1e-4)
        zero_cfgs[name] = zc
    tddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    variants["torch ZeroRedundancyOptimizer + DDP"] = tddp
    opts["torch ZeroRedundancyOptimizer + DDP"] = ZeroRedundancyOptimizer(tddp.parameters(), torch.optim.AdamW,
                                                                          lr=1e-4)
    fsdp = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    variants["torch FSDP2 fully_shard"], opts["torch FSDP2 fully_shard"] = fsdp, torch.optim.AdamW(
        fsdp.parameters(), lr=1e-4)
    batch, seq = 4 * world, 128
    per_rank = batch // world
    times: dict[str, list[float]] = {k: [] for k in variants}
    meter = ContentionMeter().start()
    for step in range(args.steps + 1):  # step 0 is warm-up
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        names = list(variants)
        names = names[step % len(names):] + names[:step % len(names)]  # none always runs first
        for name in names:
            model = variants[name]
            dist.barrier()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opts[name].step()
            if name.startswith("torch") or name == "llmkern DDP":
                opts[name].zero_grad(set_to_none=False)   # keep the gradients to count them
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step:
                times[name].append(dt.item())
    contention = meter.stop()
    rows, ratios, med = [], [], {k: statistics.median(v) for k, v in times.items()}
    model_bytes = {}
    for name, model in variants.items():
        row = {"op": "train_step", "candidate": name, "dtype": args.dtype,
               "shape": f"llama {args.layers}x{args.hidden} ({n_params / 1e6:.1f} M params), {batch}x{seq}",
               "mode": f"world {world}", "median_ms": med[name] * 1e3, "world": world}
        if name in zero_cfgs:
            m = model.memory()
            est = estimate_memory(base, zero_cfgs[name], world)
            row.update(stage=zero_cfgs[name].stage, params_bytes=m.parameters, grads_bytes=m.gradients,
                       optim_bytes=m.optimizer_states, host_bytes=m.host_optimizer_states,
                       estimated_bytes=est.model_states + est.host_optimizer_states,
                       sent_bytes_per_step=m.communicated)
        else:
            p, g, o = _torch_state_bytes(model, opts[name])
            row.update(stage={"llmkern DDP": 0}.get(name), params_bytes=p, grads_bytes=g, optim_bytes=o, host_bytes=0)
        row["bytes_per_rank"] = row["params_bytes"] + row["grads_bytes"] + row["optim_bytes"] + row["host_bytes"]
        model_bytes[name] = row["bytes_per_rank"]
        rows.append(row)
    fsdp_name, zro = "torch FSDP2 fully_shard", "torch ZeroRedundancyOptimizer + DDP"
    ratios.append(Ratio.from_rounds("ZeRO-3 step time / FSDP2's",
                                    [a / b for a, b in zip(times["llmkern ZeRO-3"], times[fsdp_name])],
                                    peer=fsdp_name, goal=1.0, higher_is_better=False))
    ratios.append(Ratio(name="ZeRO-3 model-state bytes per rank / FSDP2's",
                        value=model_bytes["llmkern ZeRO-3"] / model_bytes[fsdp_name], peer=fsdp_name, goal=1.0,
                        higher_is_better=False))
    for stage in (1, 2):
        ratios.append(Ratio.from_rounds(f"ZeRO-{stage} step time / ZeroRedundancyOptimizer + DDP's",
                                        [a / b for a, b in zip(times[f"llmkern ZeRO-{stage}"], times[zro])],
                                        peer=zro, goal=1.0, higher_is_better=False))
    for r in rows:
        if r.get("estimated_bytes"):
            ratios.append(Ratio(name=f"{r['candidate']}: measured / estimate_memory bytes",
                                value=r["bytes_per_rank"] / r["estimated_bytes"], peer="estimate_memory", goal=1.0,
                                higher_is_better=False))
    if rank == 0:
        print(f"world {world}, load average {os.getloadavg()[0]:.1f}, {n_params / 1e6:.1f} M parameters, {args.dtype}")
        print(format_table(rows, ["candidate", "median_ms", "bytes_per_rank", "params_bytes", "grads_bytes",
                                  "optim_bytes", "host_bytes"]))
        for r in ratios:
            print(f"  {r.name}: {r.value:.3f} (goal {r.describe_goal()}, {'met' if r.met else 'missed'})")
        write_results(f"zero_w{world}", rows, environment(contention, world_size=world, loadavg=os.getloadavg()),
                      ratios)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
