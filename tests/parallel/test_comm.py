"""llmkern.parallel.comm.ring_all_reduce on real gloo ranks (world sizes 2 and 4) against dist.all_reduce."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmkern.parallel import comm
from llmkern.testing import run_distributed

pytestmark = pytest.mark.distributed

# (numel of each tensor) with odd lengths, an empty tensor, and one tensor larger than small buckets
SHAPES = [(97,), (3, 41), (0,), (1025,), (7, 5, 3), (1,)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]


def _inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + rank)
    out = []
    for i, shape in enumerate(SHAPES):
        dt = DTYPES[i % len(DTYPES)]
        if dt.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=torch.float32).to(dt))
        else:
            out.append(torch.randint(-1000, 1000, shape, generator=g, dtype=dt))
    return out


def _compare(rank, world, bucket_bytes, op, segment_bytes=None):
    if segment_bytes:  # tiny pipeline segments: many per chunk, partial last ones
        comm.SEGMENT_BYTES = segment_bytes
    mine = [t for t in _inputs(rank) if op == "sum" or t.is_floating_point()]
    ref = [t.clone() for t in mine]
    stats = comm.ring_all_reduce(mine, bucket_bytes=bucket_bytes, op=op)
    for t in ref:
        # the reference: gloo's all_reduce in float64 (exact for these magnitudes), cast back
        wide = t.double()
        dist.all_reduce(wide)
        if op == "avg":
            wide /= world
        t.copy_(wide.to(t.dtype) if t.dtype.is_floating_point else wide.round().to(t.dtype))
    errs = []
    for a, b in zip(mine, ref):
        tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(a.dtype,
                                                              1e-6 if a.dtype.is_floating_point else 0)
        errs.append(bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * world)))
    n = sum(t.numel() * t.element_size() for t in mine)
    return errs, stats.bytes_sent, stats.buckets, n


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("bucket_bytes,segment_bytes",
                         [(64, None), (1000, 24), (25 * 2**20, None), (25 * 2**20, 40)])
def test_ring_matches_all_reduce(world, bucket_bytes, segment_bytes):
    for op in ("sum", "avg"):
        results = run_distributed(_compare, world, (bucket_bytes, op, segment_bytes), timeout=60)
        for errs, _, _, _ in results:
            assert all(errs), errs
        sent = [r[1] for r in results]
        n = results[0][3]
        # every rank sends 2(n-1)/n of the bytes, exactly so in total over the ring
        assert sum(sent) == 2 * (world - 1) * n
        assert len({r[2] for r in results}) == 1


def _flat_views_no_copy(rank, world):
    buf = torch.arange(10.0) * (rank + 1)
    views = [buf[0:3], buf[3:4].view(1, 1), buf[4:10].view(2, 3)]
    stats = comm.ring_all_reduce(views)
    return buf, stats.copied_bytes


def test_views_of_one_buffer_are_reduced_without_copies():
    results = run_distributed(_flat_views_no_copy, 2, timeout=60)
    for buf, copied in results:
        assert copied == 0
        torch.testing.assert_close(buf, torch.arange(10.0) * 3)


def _accumulate_fp32(rank, world):
    x = torch.full((1001,), 1.0 if rank == 0 else 2**-9, dtype=torch.bfloat16)
    lo = x.clone()
    comm.ring_all_reduce([x], accumulate_dtype=torch.float32)
    comm.ring_all_reduce([lo])
    return x, lo


def test_fp32_accumulation_for_bf16():
    """1 + 3·2^-9 = 1.0078 after one rounding to bf16; summed in bf16 starting from 1.0 (chunk 0 of
    the ring starts at rank 0) each 2^-9 is lost and the result stays 1.0."""
    results = run_distributed(_accumulate_fp32, 4, timeout=60)
    for x, lo in results:
        assert (x == 1.0078125).all()
        assert (lo == 1.0).any()


def test_integer_average_refused():
    with pytest.raises(ValueError, match="floating-point"):
        comm.ring_all_reduce([torch.zeros(3, dtype=torch.int32)], op="avg")


def test_mixed_devices_refused():
    with pytest.raises(ValueError, match="one device"):
        comm.ring_all_reduce([torch.zeros(3), torch.zeros(3, device="meta")])


def test_plan_buckets_separates_dtypes_and_caps_size():
    ts = [torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10), torch.zeros(100)]
    assert comm.plan_buckets(ts, 80) == [[0, 2], [1], [3]]
    assert comm.plan_buckets(ts, 10**9) == [[0, 2, 3], [1]]
