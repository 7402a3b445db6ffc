"""llmkern DistributedDataParallel against torch.nn.parallel.DistributedDataParallel, tiny Llama on gloo.

    torchrun --nproc-per-node 2 bench/parallel/bench_ddp.py

Model and batch: LlamaForCausalLM with hidden 256, 4 layers, 4 heads,
intermediate 1024, vocab 1024 (4.72 M params), fp32, global batch 8×256 tokens, AdamW, full
fine-tune. Every variant keeps its own model copy; variants are interleaved step by step so they
see the same machine load. Step time is the maximum over ranks, median over steps. The llmkern rows
include a bucket-size sweep and show the overlap fraction (share of communication time that ran
before backward finished). Rank 0 prints ratios to torch DDP and writes
bench/parallel/results/ddp_w<n>.{csv,json}.
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

from llmkern.parallel import DDPConfig, DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import environment, write_results  # noqa: E402

TORCHRUN_NPROC = (2, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--buckets-mb", default="1,5,25")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256,
                      attn_implementation="sdpa")
    base = LlamaForCausalLM(cfg)
    variants = {"torch DDP (25 MB)": torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))}
    for mb in [float(b) for b in args.buckets_mb.split(",")]:
        variants[f"llmkern DDP ring ({mb:g} MB)"] = DistributedDataParallel(copy.deepcopy(base),
                                                                           DDPConfig(bucket_cap_mb=mb))
    variants["llmkern DDP all_reduce (25 MB)"] = DistributedDataParallel(copy.deepcopy(base),
                                                                         DDPConfig(comm="all_reduce"))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in variants.items()}
    per_rank = 8 // world
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
    for step in range(args.steps + 1):  # step 0 is warm-up
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 1024, (8, 256), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        for name, model in variants.items():
            dist.barrier()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step:
                times[name].append(dt.item())
            else:
                losses[name] = loss.item()
    ref = statistics.median(times["torch DDP (25 MB)"])
    rows = []
    for name, ts in times.items():
        model = variants[name]
        st = getattr(model, "stats", None)
        rows.append({"variant": name, "world": world, "step_ms": statistics.median(ts) * 1e3,
                     "step_ms_min": min(ts) * 1e3, "vs_torch_ddp": statistics.median(ts) / ref,
                     "tokens_per_s": 8 * 256 / statistics.median(ts), "first_loss": losses[name],
                     "buckets": len(model._buckets) if st else None,
                     "overlap_fraction": st.overlap_fraction if st else None,
                     "comm_ms_per_step": st.comm_seconds / st.steps * 1e3 if st else None,
                     "mb_sent_per_step": st.last_step_bytes / 2**20 if st else None})
    if rank == 0:
        print(f"{'variant':<32} {'step ms':>8} {'vs torch':>8} {'tok/s':>7} {'buckets':>7} {'overlap':>7} "
              f"{'comm ms':>8} {'MiB sent':>8}")
        for r in rows:
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            print(f"{r['variant']:<32} {r['step_ms']:8.1f} {r['vs_torch_ddp']:8.2f} {r['tokens_per_s']:7.0f} "
                  f"{fmt(r['buckets'], '7d')} {fmt(r['overlap_fraction'], '7.2f')} "
                  f"{fmt(r['comm_ms_per_step'], '8.1f')} "
                  f"{fmt(r['mb_sent_per_step'], '8.1f')}")
        write_results(f"ddp_w{world}", rows, environment(world_size=world))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
