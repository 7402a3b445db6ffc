"""llmkern DDP against torch DDP: step time of a tiny Llama (forward, backward, AdamW) on CPU/gloo.

    torchrun --nproc-per-node 2 bench/parallel/bench_ddp.py

Every variant trains its own copy of the same model on the same batches; the variants take turns step
by step (so all see the same machine load), each step timed as the maximum over ranks. Reported: the
median step time, its ratio to torch DDP's (goal <= 1.0 at 2 ranks), tokens/s, the buckets, the
fraction of communication hidden behind backward and the bytes each rank sent per step. Rank 0 prints
the table and writes bench/results/ddp_w<n>.{csv,json}.
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
from _harness import ContentionMeter, Ratio, environment, format_table, write_results

TORCHRUN_NPROC = (2, 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--buckets-mb", default="5,25")
    ap.add_argument("--quick", action="store_true", help="3 steps, one bucket size")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.buckets_mb = 3, "25"
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
    batch, seq = 8, 256
    per_rank = batch // world
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses = {}
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
    contention = meter.stop()
    base_name = "torch DDP (25 MB)"
    ref = statistics.median(times[base_name])
    rows = []
    for name, ts in times.items():
        model = variants[name]
        st = getattr(model, "stats", None)
        med = statistics.median(ts)
        rows.append({"op": "ddp_step", "candidate": name, "dtype": "float32", "shape": f"llama 4x256, {batch}x{seq}",
                     "mode": f"world {world}", "median_ms": med * 1e3,
                     "ratio_vs_baseline": med / ref if name != base_name else None,
                     "baseline": base_name if name != base_name else None,
                     "tokens_per_s": batch * seq / med, "step_ms_min": min(ts) * 1e3, "step_ms_max": max(ts) * 1e3,
                     "first_loss": losses[name], "buckets": len(model.buffer.buckets) if st else None,
                     "overlap_fraction": st.overlap_fraction if st else None,
                     "comm_ms_per_step": st.comm_seconds / st.steps * 1e3 if st else None,
                     "mb_sent_per_step": st.last_step_bytes / 2**20 if st else None})
    # Per step (variants interleaved step by step): llmkern's step time over torch DDP's, goal <= 1.0 at 2 ranks.
    ratios = [Ratio.from_rounds(f"{world} ranks, {name}: step time / torch DDP's", [t / b for t, b in zip(ts, times[base_name])],
                                peer=base_name, goal=1.0 if world == 2 else None, higher_is_better=False)
              for name, ts in times.items() if name != base_name and name.startswith("llmkern")]
    if rank == 0:
        print(f"world {world}, load average {os.getloadavg()[0]:.1f}; ratio_vs_baseline = step time / torch DDP's "
              f"(goal <= 1.0)")
        print(format_table(rows, ["candidate", "median_ms", "ratio_vs_baseline", "tokens_per_s", "buckets",
                                  "overlap_fraction", "comm_ms_per_step", "mb_sent_per_step"]))
        write_results(f"ddp_w{world}", rows, environment(contention, world_size=world, loadavg=os.getloadavg()), ratios)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
