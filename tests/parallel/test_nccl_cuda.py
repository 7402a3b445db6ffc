"""llmkern.parallel.comm.ring_all_reduce on CUDA tensors across real processes: llmkern._C_cuda's NCCL
ring (and ncclAllReduce as algo="nccl") against the fp64 sum. One GPU per rank: world 1 needs one GPU,
world 2 two. The process group is gloo: the NCCL communicator is llmkern's own, bootstrapped from the
group's store, and gloo gathers the inputs for the reference. Skipped without a GPU (`cuda` marker);
the same C++ runs here under the emulation in test_nccl_ring.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmkern.parallel import comm
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = [pytest.mark.cuda, pytest.mark.distributed]

SHAPES = [(97,), (1025,), (3, 41), (0,), (1,), (4099,)]
WORLDS = [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))]


def _ranks(rank, world, algo, op, dtype_name, accumulate):
    torch.cuda.set_device(rank)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(100 + rank)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    mine = [t.cuda() for t in inputs]
    # 1 KiB buckets: several buckets, one tensor larger than a bucket, one that is empty.
    stats = comm.ring_all_reduce(mine, bucket_bytes=1024, op=op, algo=algo,
                                 accumulate_dtype=torch.float32 if accumulate else None)
    torch.cuda.synchronize()
    everyone = [None] * world
    dist.all_gather_object(everyone, inputs)
    return [t.cpu() for t in mine], everyone, stats.bytes_sent


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("algo", ["ring", "nccl"])
@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16", "float64"])
def test_cuda_ring_matches_fp64_reference(world, algo, op, dtype_name):
    accumulate = algo == "ring" and dtype_name in ("float16", "bfloat16")
    for acc in sorted({False, accumulate}):
        results = run_distributed(_ranks, world, (algo, op, dtype_name, acc), timeout=120)
        for outs, everyone, sent in results:
            for i, out in enumerate(outs):
                xs = [inputs[i] for inputs in everyone]
                ref = torch.stack([x.double() for x in xs]).sum(0) / (world if op == "avg" else 1)
                base = xs[0].clone()
                for x in xs[1:]:
                    base = base + x
                base = base / world if op == "avg" else base
                assert_close_to_ref(out, ref, base, name=f"tensor {i} {algo} {op} accumulate_fp32={acc}")
        if not acc:
            # per bucket 2(world-1)/world of its bytes, up to chunk rounding: exact in total over the ranks
            total = sum(torch.Size(s).numel() for s in SHAPES) * getattr(torch, dtype_name).itemsize
            assert sum(r[2] for r in results) == 2 * (world - 1) * total


def _bf16_fp32_accumulation(rank, world):
    torch.cuda.set_device(rank)
    x = torch.full((1001,), 1.0 if rank == 0 else 2**-9, dtype=torch.bfloat16, device="cuda")
    comm.ring_all_reduce([x], accumulate_dtype=torch.float32)
    return x.cpu()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_fp32_accumulation_rounds_once():
    world = torch.cuda.device_count()
    for x in run_distributed(_bf16_fp32_accumulation, world, timeout=120):
        expected = torch.tensor(1.0 + (world - 1) * 2**-9).to(torch.bfloat16)
        assert (x == expected).all()
