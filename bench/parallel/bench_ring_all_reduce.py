"""llmkern's gloo ring all-reduce against gloo's own all_reduce and a plain send/recv ring, on CPU.

    torchrun --nproc-per-node 2 bench/parallel/bench_ring_all_reduce.py
    torchrun --nproc-per-node 4 bench/parallel/bench_ring_all_reduce.py

Candidates, on the same fp32 buffer, interleaved rep by rep so all see the same machine load:
- "ring": llmkern.parallel.all_reduce_(x) as users call it (backend "ring", the layout check on);
- "ring, unchecked": the same with check=False (the transport alone, as DDP's buckets call it);
- "gloo all_reduce": torch.distributed.all_reduce (gloo picks its algorithm);
- "sendrecv ring": every rank sends the whole buffer to its right neighbour and receives from its
  left one (isend/irecv): the wire speed a ring is built on (nccl-tests' sendrecv; busbw = algbw).
The time of a rep is the maximum over ranks (a barrier before, an all_reduce of the times after);
the result is the median over reps. busbw = 2(n-1)/n x bytes / time (nccl-tests). Results are
checked against dist.all_reduce before they are timed. 1 thread per rank, GLOO_SOCKET_IFNAME=lo.
Rank 0 prints the busbw ratios ring/sendrecv (goal >= 0.9) and ring/gloo (>= 1.2) and writes
bench/results/ring_all_reduce_w<n>.{csv,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llmkern.parallel import collectives, ring

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import ContentionMeter, Ratio, environment, format_table, write_results

TORCHRUN_NPROC = (2, 4)


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item()


def _candidates(buf: torch.Tensor, rank: int, world: int) -> dict:
    recv = torch.empty_like(buf)

    def sendrecv():
        ws = [dist.irecv(recv, (rank - 1) % world), dist.isend(buf, (rank + 1) % world)]
        for w in ws:
            w.wait()

    return {
        "ring": lambda: collectives.all_reduce_(buf),
        "ring, unchecked": lambda: collectives.all_reduce_(buf, check=False),
        "gloo all_reduce": lambda: dist.all_reduce(buf),
        "sendrecv ring": sendrecv,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--segment-kib", type=int, default=0,
                    help="ring pipeline segment (0: a quarter of a chunk, at least 1 MiB)")
    ap.add_argument("--quick", action="store_true", help="16 MiB, 3 reps")
    args = ap.parse_args()
    if args.quick:
        args.sizes_mib, args.reps = "16", 3
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    ring.SEGMENT_BYTES = args.segment_kib * 1024 or None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, contention, ratios = [], [], []
    for mib in [int(s) for s in args.sizes_mib.split(",")]:
        n = mib * 2**20 // 4
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        a, b = x.clone(), x.clone()  # validate first
        collectives.all_reduce_(a)
        dist.all_reduce(b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        candidates = _candidates(x.clone(), rank, world)
        times = {k: [] for k in candidates}
        meter = ContentionMeter().start()
        for rep in range(args.reps + 1):  # rep 0 is warm-up
            for name, fn in candidates.items():
                t = _timed(fn)
                if rep:
                    times[name].append(t)
        contention.append(meter.stop())
        med = {k: statistics.median(v) for k, v in times.items()}
        algbytes = n * 4
        busbw = {k: (algbytes if k == "sendrecv ring" else 2 * (world - 1) / world * algbytes) / t / 1e9
                 for k, t in med.items()}
        for name in candidates:
            base = "sendrecv ring" if name.startswith("ring") else None
            rows.append({"op": "all_reduce", "candidate": name, "dtype": "float32", "shape": f"{mib} MiB",
                         "mode": f"world {world}", "median_ms": med[name] * 1e3,
                         "ratio_vs_baseline": busbw[name] / busbw[base] if base else None, "baseline": base,
                         "gbytes_per_s": busbw[name], "busbw_gbs": busbw[name],
                         "busbw_vs_gloo": busbw[name] / busbw["gloo all_reduce"],
                         "world": world, "mib": mib, "ms_min": min(times[name]) * 1e3,
                         "ms_max": max(times[name]) * 1e3})
        # Ratios per rep (candidates interleaved rep by rep), llmkern's ring as users call it.
        f = 2 * (world - 1) / world  # busbw of the all-reduce per byte over the sendrecv ring's
        t_ring, t_send, t_gloo = times["ring"], times["sendrecv ring"], times["gloo all_reduce"]
        ratios.append(Ratio.from_rounds(f"{mib} MiB, {world} ranks: ring busbw / sendrecv ring's",
                                        [f * s_ / r for s_, r in zip(t_send, t_ring)], peer="sendrecv ring", goal=0.9))
        ratios.append(Ratio.from_rounds(f"{mib} MiB, {world} ranks: ring busbw / gloo all_reduce's",
                                        [g / r for g, r in zip(t_gloo, t_ring)], peer="gloo all_reduce", goal=1.2))
    if rank == 0:
        print(f"world {world}, load average {os.getloadavg()[0]:.1f}; ratio_vs_baseline = busbw / sendrecv "
              f"ring's (goal >= 0.9), busbw_vs_gloo (goal >= 1.2)")
        print(format_table(rows, ["candidate", "shape", "median_ms", "gbytes_per_s", "ratio_vs_baseline",
                                  "busbw_vs_gloo"]))
        env = environment(max((c for c in contention if c is not None), default=None), world_size=world,
                          loadavg=os.getloadavg())
        write_results(f"ring_all_reduce_w{world}", rows, env, ratios)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
