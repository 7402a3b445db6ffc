"""Tensor parallelism on one transformers Llama decoder block (world 2), and the composed 3D training
step of a tiny Llama (world 4), CPU/gloo.

    torchrun --nproc-per-node 2 bench/parallel/bench_tensor_parallel.py [--quick]   # the block
    torchrun --nproc-per-node 4 bench/parallel/bench_tensor_parallel.py [--quick]   # the 3D step

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

The 3D step (world 4): one training step (forward, backward, clip at 1.0, FusedAdamW step) of a tiny
Llama (hidden 256, 4 layers, 8 heads / 4 key-value heads, vocabulary 2048; global batch 8 x 128) under
llmkern.parallel.parallelize at tp2 x pp2 (1F1B, 4 micro-batches) and tp2 x dp2 (DDP), against the
same step of the dense model in one process on the whole global batch. The single process runs on
rank 0 while the other ranks wait at a barrier (it has the machine to itself, as a single-process run
would); each parallel step is timed as the maximum over ranks. Ratios: single-process time / 3D
time (the speed-up of the layout; no goal: the 4 one-thread ranks share the 2 cores of these
machines with the single process's one thread, so the figure is bounded by the cores more than by
the layout). The first step's losses agree with the single process's (checked, printed). Rank 0
writes tensor_parallel_3d_w4.
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

TORCHRUN_NPROC = (2, 4)


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


def time_rotated(calls: dict, n_rounds: int) -> tuple[dict[str, list[float]], float]:
    """`n_rounds` rounds of one call of each candidate, the order rotated every round so that none always
    runs first; a call's time (ms) is the slowest rank's. Returns the times and the contention."""
    names = list(calls)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    meter = ContentionMeter().start()
    for r in range(n_rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            calls[n]()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            rounds[n].append(dt.item() * 1e3)
    return rounds, meter.stop()


def _tiny_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden3d, intermediate_size=(args.hidden3d * 8 // 3 + 31) // 32 * 32,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=args.vocab, max_position_embeddings=args.seq3d, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def bench_3d(args, rank: int, world: int) -> None:
    """The tiny Llama's training step under parallelize (tp2 x pp2, tp2 x dp2) against one process."""
    from llmkern.optim import FusedAdamW
    from llmkern.parallel import ParallelizeConfig, parallelize

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch3d, args.seq3d), generator=g)
    layouts = {"tp2 x pp2": ParallelizeConfig(tp=2, pp=world // 2, microbatches=4, schedule="1f1b"),
               "tp2 x dp2": ParallelizeConfig(tp=2, dp=world // 2)}
    steps, losses = {}, {}
    for name, cfg in layouts.items():
        run = parallelize(_tiny_llama(args), cfg)
        opt = FusedAdamW(run.parameters(), lr=1e-4)
        local = run.local_batch(ids)

        def step(run=run, opt=opt, local=local):
            loss = run.train_step(local, local)
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            return loss

        steps[name], losses[name] = step, None
    dense = _tiny_llama(args) if rank == 0 else None
    dense_opt = FusedAdamW(dense.parameters(), lr=1e-4) if rank == 0 else None

    def single():
        if rank == 0:
            loss = dense(input_ids=ids, labels=ids).loss
            loss.backward()
            dense_opt.clip_grad_norm_(1.0)
            dense_opt.step()
            dense_opt.zero_grad()
            return loss
        return None

    steps["1 process"] = single
    # first step of each (the same initial weights, the same batch): the losses agree
    for name, f in steps.items():
        dist.barrier()
        loss = f()
        losses[name] = None if loss is None else float(loss.detach())
    names = list(steps)
    rounds, contention = time_rotated(steps, args.rounds)
    # pp: the loss is known on the last stage; gather each layout's first loss from every rank
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    first = {n: next((g[n] for g in gathered if g[n] is not None), None) for n in names}

    shape = (f"llama h{args.hidden3d} L{args.layers} V{args.vocab}, batch {args.batch3d}x{args.seq3d}")
    rows = [{"op": "llama_train_step_3d", "candidate": n, "dtype": "float32", "shape": shape, "mode": f"world {world}",
             "median_ms": statistics.median(rounds[n]),
             "ratio_vs_baseline": (statistics.median([b / a for a, b in zip(rounds[n], rounds["1 process"])])
                                   if n != "1 process" else None),
             "baseline": "1 process" if n != "1 process" else None, "ms_min": min(rounds[n]),
             "ms_max": max(rounds[n]), "first_loss": first[n], "contention": contention} for n in names]
    ratios = [Ratio.from_rounds(f"train step {shape} world {world} {n}: 1-process time / 3D time",
                                [b / a for a, b in zip(rounds[n], rounds["1 process"])],
                                peer="the dense model in one process") for n in layouts]
    if rank == 0:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(format_table(rows, ["candidate", "shape", "median_ms", "ms_min", "ms_max", "ratio_vs_baseline",
                                  "first_loss"]))
        print(format_ratios(ratios))
        print(f"uptime: {up}; other processes' CPU share during the rounds: {contention:.2f}")
        for n in layouts:  # fp32, 4 layers: only the order of summation differs
            if abs(first[n] - first["1 process"]) > 1e-4 * abs(first["1 process"]):
                raise SystemExit(f"{n}: first-step loss {first[n]} != the single process's {first['1 process']}")
        write_results(f"tensor_parallel_3d_w{world}" + ("_quick" if args.quick else ""), rows,
                      environment(contention, world_size=world, uptime=up), ratios=ratios)
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--hidden3d", type=int, default=256, help="the 3D step's tiny Llama (world 4)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq3d", type=int, default=128)
    ap.add_argument("--batch3d", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="hidden 256, seq 64, 3 rounds; 3D: hidden 64, 2 layers, "
                                                         "vocabulary 256, batch 8 x 32 (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.seq, args.rounds = 256, 64, 3
        args.hidden3d, args.layers, args.vocab, args.seq3d = 64, 2, 256, 32
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 4:
        bench_3d(args, rank, world)
        dist.destroy_process_group()
        return
    if world != 2:
        raise SystemExit(f"bench_tensor_parallel: world 2 (the block at tp 2) or 4 (the 3D step), got {world}")
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
    rounds, contention = time_rotated(candidates, args.rounds)

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
