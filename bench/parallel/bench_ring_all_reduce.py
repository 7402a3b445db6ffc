"""llmkern ring_all_reduce against dist.all_reduce on gloo (CPU), 1 / 16 / 64 MiB fp32.

    torchrun --nproc-per-node 2 bench/parallel/bench_ring_all_reduce.py
    torchrun --nproc-per-node 4 bench/parallel/bench_ring_all_reduce.py

Method: 1 thread per rank, GLOO_SOCKET_IFNAME=lo; the two ops alternate
rep by rep so both see the same machine load; the time of a rep is the maximum over ranks; the
result is the median over reps. A plain ring of isend/irecv of the whole buffer ("sendrecv ring",
busbw = algbw) is timed beside them: the wire speed the ring all-reduce is built on. busbw = 2(n-1)/n × bytes / time (nccl-tests). Every result is
checked against dist.all_reduce before it is timed. Rank 0 prints ratios and writes
bench/parallel/results/ring_all_reduce_w<n>.{csv,json}.
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

from llmkern.parallel import comm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import environment, write_results  # noqa: E402

TORCHRUN_NPROC = (2, 4)


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return dt.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="1,16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--segment-kib", type=int, default=comm.SEGMENT_BYTES // 1024,
                    help="ring pipeline segment")
    args = ap.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    comm.SEGMENT_BYTES = args.segment_kib * 1024
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for mib in [int(s) for s in args.sizes_mib.split(",")]:
        n = mib * 2**20 // 4
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        # validate first
        a, b = x.clone(), x.clone()
        comm.ring_all_reduce([a])
        dist.all_reduce(b)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        ring_t, ar_t, sr_t = [], [], []
        buf, recv = x.clone(), torch.empty_like(x)

        def sendrecv():  # the wire alone: each rank sends the whole buffer to its right neighbour
            ws = [dist.irecv(recv, (rank - 1) % world), dist.isend(buf, (rank + 1) % world)]
            for w in ws:
                w.wait()

        for rep in range(args.reps + 1):  # rep 0 is warm-up
            r = _timed(lambda: comm.ring_all_reduce_flat(buf))
            g = _timed(lambda: dist.all_reduce(buf))
            s = _timed(sendrecv)
            if rep:
                ring_t.append(r)
                ar_t.append(g)
                sr_t.append(s)
        factor = 2 * (world - 1) / world * n * 4
        for name, ts in (("ring_all_reduce", ring_t), ("dist.all_reduce", ar_t)):
            med = statistics.median(ts)
            rows.append({"op": name, "world": world, "mib": mib, "ms": med * 1e3, "ms_min": min(ts) * 1e3,
                         "ms_max": max(ts) * 1e3, "busbw_gbs": factor / med / 1e9})
        ratio = statistics.median(ar_t) / statistics.median(ring_t)
        rows[-2]["busbw_ratio_vs_all_reduce"] = rows[-1]["busbw_ratio_vs_all_reduce"] = ratio
        med = statistics.median(sr_t)  # busbw = algbw for a ring of sends (nccl-tests sendrecv)
        rows.append({"op": "sendrecv ring", "world": world, "mib": mib, "ms": med * 1e3, "ms_min": min(sr_t) * 1e3,
                     "ms_max": max(sr_t) * 1e3, "busbw_gbs": n * 4 / med / 1e9,
                     "busbw_ratio_vs_all_reduce": statistics.median(ar_t) / med * (n * 4) / factor})
    if rank == 0:
        print(f"{'op':<16} {'world':>5} {'MiB':>4} {'ms':>8} {'busbw GB/s':>10} "
              f"{'ring/all_reduce busbw':>22}")
        for r in rows:
            print(f"{r['op']:<16} {r['world']:>5} {r['mib']:>4} {r['ms']:8.2f} {r['busbw_gbs']:10.3f} "
                  f"{r['busbw_ratio_vs_all_reduce']:22.2f}")
        write_results(f"ring_all_reduce_w{world}", rows, environment(world_size=world))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
