"""Tensor parallelism on one transformers Llama decoder block, forward + backward, CPU/gloo.

    torchrun --nproc-per-node 2 bench/parallel/bench_tensor_parallel.py [--quick]

Candidates, each a copy of the same block (hidden 512, 8 heads, MLP 1376; input (2, 256, 512) fp32):
- llmkern TP:  apply_tensor_parallel on a module holding the block (q/k/v and gate/up column-parallel,
               o and down row-parallel; one region entry before the attention and one before the MLP,
               so 2 all-reduces forward and 2 backward);
- DTensor TP:  torch.distributed.tensor.parallel.parallelize_module with ColwiseParallel on q/k/v and
               gate/up and RowwiseParallel on o and down (the plan in torch's tensor-parallel tutorial);
- llmkern TP ring: the same with TPComm(backend="ring") (llmkern's ring over gloo instead of
               torch.distributed's all-reduce), reported without a goal;
- 1 rank:      the dense block on every rank (what each rank would do without tp).
They take turns call by call (the order rotates every round, so none always runs first); each call
starts after a barrier and is timed as the maximum over ranks. A ratio is the median of the
per-round ratios, its spread their range (bench/_harness.py). Goal: llmkern / DTensor <= 1.0.
Rank 0 prints the table and uptime and writes bench/results/tensor_parallel_w<n>.{json,csv}.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel.tensor_parallel import TPComm, apply_tensor_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import ContentionMeter, Ratio, environment, format_ratios, format_table, write_results  # noqa: E402

TORCHRUN_NPROC = (2,)


class Block(nn.Module):
    """One LlamaDecoderLayer with its rotary table: x (B, T, C) -> (B, T, C), causal."""

    def __init__(self, cfg):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        out = self.layer(x, position_embeddings=self.rotary(x, pos), position_ids=pos)
        return out[0] if isinstance(out, tuple) else out


def dtensor_block(block: Block, world: int) -> Block:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    plan = {"layer.self_attn.q_proj": ColwiseParallel(), "layer.self_attn.k_proj": ColwiseParallel(),
            "layer.self_attn.v_proj": ColwiseParallel(), "layer.self_attn.o_proj": RowwiseParallel(),
            "layer.mlp.gate_proj": ColwiseParallel(), "layer.mlp.up_proj": ColwiseParallel(),
            "layer.mlp.down_proj": RowwiseParallel()}
    return parallelize_module(block, mesh, plan)


def fwd_bwd(m: nn.Module, x0: torch.Tensor, gy: torch.Tensor):
    def run():
        x = x0.detach().requires_grad_()
        y = m(x)
        y.backward(gy)
        for p in m.parameters():
            p.grad = None
        return y.detach(), x.grad
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="hidden 256, seq 64, 3 rounds (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.seq, args.rounds = 256, 64, 3
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import LlamaConfig

    heads = max(world, args.hidden // 64)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=(args.hidden * 8 // 3 + 31) // 32 * 32,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=args.seq,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    dense = Block(cfg)
    ours = copy.deepcopy(dense)
    report = apply_tensor_parallel(ours, dist.group.WORLD)
    ours_ring = copy.deepcopy(dense)
    apply_tensor_parallel(ours_ring, dist.group.WORLD, comm=TPComm(backend="ring"))
    theirs = dtensor_block(copy.deepcopy(dense), world)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=g)
    gy = torch.randn(args.batch, args.seq, args.hidden, generator=g)
    candidates = {"llmkern TP": fwd_bwd(ours, x, gy), "DTensor TP": fwd_bwd(theirs, x, gy),
                  "llmkern TP ring": fwd_bwd(ours_ring, x, gy), "1 rank": fwd_bwd(dense, x, gy)}
    # the three compute the same block: outputs and input gradients agree to fp32 summation order
    results = {k: f() for k, f in candidates.items()}
    agree = {k: max((a - b).abs().max().item() for a, b in zip(v, results["1 rank"])) for k, v in results.items()}

    names = list(candidates)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    meter = ContentionMeter().start()
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            candidates[n]()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            rounds[n].append(dt.item() * 1e3)
    contention = meter.stop()

    shape = f"llama block h{args.hidden} heads {heads} mlp {cfg.intermediate_size}, x {args.batch}x{args.seq}"
    per_round = {n: [a / b for a, b in zip(rounds[n], rounds["DTensor TP"])] for n in names}
    rows = [{"op": "tp_block_fwd_bwd", "candidate": n, "dtype": "float32", "shape": shape, "mode": f"tp {world}",
             "median_ms": statistics.median(rounds[n]),
             "ratio_vs_baseline": statistics.median(per_round[n]) if n != "DTensor TP" else None,
             "baseline": "DTensor TP" if n != "DTensor TP" else None, "ms_min": min(rounds[n]),
             "ms_max": max(rounds[n]), "max_diff_vs_1_rank": agree[n], "contention": contention} for n in names]
    ratios = [
        Ratio.from_rounds(f"fwd+bwd {shape} tp{world}: llmkern / DTensor time", per_round["llmkern TP"],
                          peer="torch DTensor parallelize_module", goal=1.0, higher_is_better=False),
        Ratio.from_rounds(f"fwd+bwd {shape} tp{world}: 1-rank time / llmkern time",
                          [a / b for a, b in zip(rounds["1 rank"], rounds["llmkern TP"])],
                          peer="the dense block on 1 rank"),
    ]
    if rank == 0:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(report)
        print(format_table(rows, ["candidate", "shape", "median_ms", "ms_min", "ms_max", "ratio_vs_baseline",
                                  "max_diff_vs_1_rank"]))
        print(format_ratios(ratios))
        print(f"uptime: {up}; other processes' CPU share during the rounds: {contention:.2f}")
        write_results(f"tensor_parallel_w{world}" + ("_quick" if args.quick else ""), rows,
                      environment(contention, world_size=world, uptime=up), ratios=ratios)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
