"""llmkern.parallel.collectives on CUDA tensors across real processes: llmkern._C_cuda's NCCL ring
(backend "ring", bootstrapped from a gloo group's store) and torch.distributed's NCCL collectives
(backend "torch", on an NCCL group) against the fp64 oracle. One GPU per rank: world 1 needs one GPU,
world 2 two. Skipped without a GPU (`cuda` marker); the same C++ runs here under the emulation in
test_nccl_ring.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmkern.parallel import collectives as C
from llmkern.parallel import ring
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = [pytest.mark.cuda, pytest.mark.distributed]

LENGTHS = [97, 1025, 0, 1, 4099]
WORLDS = [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))]


def _ranks(rank, world, backend, op, dtype_name, accumulate):
    torch.cuda.set_device(rank)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(100 + rank)
    inputs = [torch.randn(ring.padded_numel(n, world), generator=g, dtype=torch.float64).to(dtype) for n in LENGTHS]
    acc = torch.float32 if accumulate else None
    reduced, shards, gathered = [], [], []
    with C.counting() as counter:
        for x in inputs:
            reduced.append(C.all_reduce_(x.cuda(), op=op, backend=backend, accumulate_dtype=acc).cpu())
            shards.append(C.reduce_scatter(x.cuda(), op=op, backend=backend, accumulate_dtype=acc).cpu())
            gathered.append(C.all_gather(x[:4].cuda(), backend=backend).cpu())
    torch.cuda.synchronize()
    everyone = [None] * world
    dist.all_gather_object(everyone, inputs)
    return reduced, shards, gathered, everyone, counter.get("all_reduce").bytes_sent


def _judge(out, xs, op, name):
    if op == "max":
        assert torch.equal(out, torch.stack(xs).amax(0)), name
        return
    ref = torch.stack([x.double() for x in xs]).sum(0)
    base = xs[0].clone()
    for x in xs[1:]:
        base = base + x
    if op == "avg":
        ref, base = ref / len(xs), base / len(xs)
    assert_close_to_ref(out, ref, base, name=name)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", ["ring", "torch"])
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16", "float64"])
def test_cuda_collectives_match_fp64_reference(world, backend, op, dtype_name):
    accumulate = backend == "ring" and dtype_name in ("float16", "bfloat16") and op != "max"
    pg_backend = "gloo" if backend == "ring" else "nccl"
    for acc in sorted({False, accumulate}):
        results = run_distributed(_ranks, world, (backend, op, dtype_name, acc), timeout=120, backend=pg_backend)
        for rank, (reduced, shards, gathered, everyone, sent) in enumerate(results):
            for i, out in enumerate(reduced):
                xs = [inputs[i] for inputs in everyone]
                _judge(out, xs, op, f"all_reduce_ {i} {backend} {op} accumulate_fp32={acc}")
                k = xs[0].numel() // world
                _judge(shards[i], [x[rank * k:(rank + 1) * k] for x in xs], op, f"reduce_scatter {i} {backend}")
                assert torch.equal(gathered[i], torch.cat([x[:4] for x in xs]))
            if not acc:  # an all-reduce sends 2(w-1)/w of its bytes per rank, up to chunk rounding
                total = sum(x.numel() for x in everyone[0]) * getattr(torch, dtype_name).itemsize
                assert abs(sent - 2 * (world - 1) * total / world) <= 2 * (world - 1) * len(LENGTHS) * 8


def _bf16_fp32_accumulation(rank, world):
    torch.cuda.set_device(rank)
    x = torch.full((1001,), 1.0 if rank == 0 else 2**-9, dtype=torch.bfloat16, device="cuda")
    C.all_reduce_(x, accumulate_dtype=torch.float32)
    return x.cpu()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_fp32_accumulation_rounds_once():
    world = torch.cuda.device_count()
    for x in run_distributed(_bf16_fp32_accumulation, world, timeout=120):
        expected = torch.tensor(1.0 + (world - 1) * 2**-9).to(torch.bfloat16)
        assert (x == expected).all()
