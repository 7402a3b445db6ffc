"""Bucketed ring all-reduce on any torch.distributed process group.

`ring_all_reduce(tensors, group)` sums (or averages) a list of tensors across the ranks of
`group`. Tensors are packed into flat buckets of at most `bucket_bytes`, one dtype per bucket, and
each bucket goes round the ring: reduce-scatter, then all-gather. CPU tensors take a ring of
`isend`/`irecv` to the neighbours over the group (gloo). CUDA tensors take the NCCL extension
(csrc/comm/nccl_comm.cu, llmkern.parallel.nccl): the same schedule over ncclSend/ncclRecv with our
reduction kernel, through one NCCL communicator per (group, device), bootstrapped from the group's
own store (the PrefixStore torch keeps for every group, the default one included). The group itself
may be gloo: only its store is used. Without llmkern._C_cuda a CUDA tensor is refused with the
reason (no silent fallback to the group's backend).

Why a ring of point-to-point messages on gloo: measured here (bench/parallel/bench_ring_all_reduce.py, 64 MiB fp32)
gloo's own all_reduce reaches 1.26 GB/s bus bandwidth at 2 ranks and 0.75 GB/s at 4, while a ring of
plain isend/irecv moves 1.49 and 1.08 GB/s per link.

The schedule (which chunk each rank sends and receives at each step) is the one in
csrc/comm/ring_schedule.h, mirrored function for function below; tests/parallel/test_ring_schedule.py
compares the two for world sizes 1..16.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist

# --- the schedule: a line-for-line mirror of csrc/comm/ring_schedule.h -------------------------------


def next_rank(rank: int, world: int) -> int:
    return (rank + 1) % world


def prev_rank(rank: int, world: int) -> int:
    return (rank - 1) % world


def ring_steps(world: int) -> int:
    """Steps in each of reduce-scatter and all-gather."""
    return world - 1


def chunk_range(n: int, world: int, chunk: int) -> tuple[int, int]:
    """(offset, count) of chunk `chunk` when n elements are cut into `world` near-equal chunks."""
    base, extra = divmod(n, world)
    return chunk * base + min(chunk, extra), base + (1 if chunk < extra else 0)


def reduce_scatter_step(rank: int, world: int, step: int) -> tuple[int, int]:
    """(send_chunk, recv_chunk) of `rank` at reduce-scatter step `step`; the received one is added."""
    return (rank - step) % world, (rank - step - 1) % world


def all_gather_step(rank: int, world: int, step: int) -> tuple[int, int]:
    """(send_chunk, recv_chunk) of `rank` at all-gather step `step`; the received one is copied."""
    return (rank + 1 - step) % world, (rank - step) % world


def owned_chunk(rank: int, world: int) -> int:
    """The chunk `rank` holds fully reduced after reduce-scatter."""
    return (rank + 1) % world


def elements_sent(n: int, rank: int, world: int) -> int:
    """Elements `rank` sends in one all-reduce of n elements (2(world-1)/world·n, ±1 per step)."""
    total = 0
    for s in range(ring_steps(world)):
        total += chunk_range(n, world, reduce_scatter_step(rank, world, s)[0])[1]
        total += chunk_range(n, world, all_gather_step(rank, world, s)[0])[1]
    return total


# --- the gloo path -------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class CommStats:
    """What one `ring_all_reduce` call did on this rank."""

    bytes_sent: int = 0
    """Bytes this rank sent: 2(n-1)/n of the reduced bytes, up to chunk rounding."""
    buckets: int = 0
    """Flat buckets reduced (one ring each)."""
    copied_bytes: int = 0
    """Bytes packed into (and unpacked from) bucket buffers; zero when inputs were already flat views."""
    seconds: float = 0.0
    """Wall time of the call."""


def _group_rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


# Pipelining segment: each chunk goes over the wire in pieces of this many bytes, so a piece is added
# (reduce-scatter) or forwarded (all-gather) while the next ones are still in flight.
SEGMENT_BYTES = 1 << 20


_SCRATCH = threading.local()


def _scratch_pool(like: torch.Tensor, numel: int) -> torch.Tensor:
    """Receive buffers kept across calls (per thread, dtype and device): allocating 2 × 32 MiB afresh
    for every 64 MiB all-reduce costs page faults on first touch, measured at a third of the time."""
    pools = _SCRATCH.__dict__.setdefault("pools", {})
    key = (like.dtype, like.device)
    buf = pools.get(key)
    if buf is None or buf.numel() < numel:
        buf = pools[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf


def _ring_flat(flat: torch.Tensor, group, rank: int, world: int, average: bool,
               segment_bytes: int | None = None) -> int:
    """All-reduce one contiguous 1-D tensor in place round the ring; returns the bytes sent.

    The 2(world-1) steps of the schedule run as one pipeline: the chunk a rank sends at step t+1 is
    the one it received (and reduced) at step t, so each segment is sent on as soon as it is ready
    instead of waiting for the whole chunk. Receives for step t+1 are posted before step t is
    processed, into the other of two scratch buffers (reduce-scatter) or straight into place
    (all-gather).
    """
    n = flat.numel()
    if world == 1 or n == 0:
        if average and world > 1:
            flat.div_(world)
        return 0
    nxt, prv = next_rank(rank, world), prev_rank(rank, world)
    size = flat.element_size()
    seg = max(1, (segment_bytes or SEGMENT_BYTES) // size)
    rs_steps, total = ring_steps(world), 2 * ring_steps(world)
    nseg = -(-chunk_range(n, world, 0)[1] // seg)
    largest = chunk_range(n, world, 0)[1]
    pool = _scratch_pool(flat, 2 * largest)
    scratch = [pool[:largest], pool[largest:2 * largest]]
    pending_sends: dict[int, list] = {}  # chunk -> its isend works (its memory is busy until they finish)
    sent = 0

    def step_chunks(t: int) -> tuple[int, int]:
        if t < rs_steps:
            return reduce_scatter_step(rank, world, t)
        return all_gather_step(rank, world, t - rs_steps)

    def segments(chunk: int):
        off, cnt = chunk_range(n, world, chunk)
        return [(off + j, min(seg, cnt - j)) for j in range(0, cnt, seg)]

    def send(t: int, chunk: int, j: int, off: int, cnt: int) -> None:
        nonlocal sent
        w = dist.isend(flat[off:off + cnt], group=group, group_dst=nxt, tag=t * nseg + j)
        pending_sends.setdefault(chunk, []).append(w)
        sent += cnt * size

    def post_recvs(t: int) -> list:
        chunk = step_chunks(t)[1]
        if t >= rs_steps:  # received in place: the chunk's earlier sends must be finished
            for w in pending_sends.pop(chunk, []):
                w.wait()
        base = chunk_range(n, world, chunk)[0]
        works = []
        for j, (off, cnt) in enumerate(segments(chunk)):
            into = scratch[t % 2][off - base:off - base + cnt] if t < rs_steps else flat[off:off + cnt]
            works.append((dist.irecv(into, group=group, group_src=prv, tag=t * nseg + j), off, cnt, into))
        return works

    recvs = post_recvs(0)
    first = step_chunks(0)[0]
    for j, (off, cnt) in enumerate(segments(first)):
        send(0, first, j, off, cnt)
    for t in range(total):
        following = post_recvs(t + 1) if t + 1 < total else []
        chunk = step_chunks(t)[1]
        for j, (w, off, cnt, into) in enumerate(recvs):
            w.wait()
            if t < rs_steps:
                flat[off:off + cnt].add_(into)
                if average and t == rs_steps - 1:  # the owned chunk, divided once before it is gathered
                    flat[off:off + cnt].div_(world)
            if t + 1 < total:
                send(t + 1, chunk, j, off, cnt)
        recvs = following
    for works in pending_sends.values():
        for w in works:
            w.wait()
    return sent


def _nccl_flat(flat: torch.Tensor, group, op: str, accumulate_dtype: torch.dtype | None, algo: str) -> int:
    from llmkern.parallel import nccl

    if flat.dtype not in nccl.DTYPES:
        raise ValueError(f"ring_all_reduce: CUDA tensors must be one of {[str(d) for d in nccl.DTYPES]} "
                         f"(the NCCL ring's reduction kernel), got {flat.dtype}")
    comm = nccl.communicator_for(group, flat.device)
    if accumulate_dtype is None or accumulate_dtype == flat.dtype:
        return comm.all_reduce_(flat, op=op, algo=algo)
    if accumulate_dtype == torch.float32 and algo == "ring" and flat.dtype in (torch.float16, torch.bfloat16):
        # fp32 partial sums on the wire, one rounding at the end, 16-bit all-gather (nccl_comm.cu).
        return comm.all_reduce_(flat, op=op, algo=algo, accumulate_fp32=True)
    wide = flat.to(accumulate_dtype)
    sent = comm.all_reduce_(wide, op=op, algo=algo)
    flat.copy_(wide)
    return sent


def ring_all_reduce_flat(flat: torch.Tensor, group=None, *, op: Literal["sum", "avg"] = "sum",
                         accumulate_dtype: torch.dtype | None = None,
                         algo: Literal["ring", "nccl"] = "ring") -> int:
    """All-reduce one contiguous 1-D tensor in place; returns the bytes this rank sent.

    accumulate_dtype: reduce in this dtype (e.g. torch.float32 for bf16/fp16 buffers), so partial
    sums never round to 16 bits. On gloo the buffer is cast up, reduced there and cast back once
    (twice the bytes on the wire). On NCCL with the ring, fp32 partial sums travel only inside the
    reduce-scatter and are rounded once (1.33x the bytes at 4 ranks, 1x at 2).
    algo: CUDA tensors only: "ring" is llmkern's ring with its own reduction kernel, "nccl" calls
    ncclAllReduce (the baseline; NCCL picks its algorithm, bytes are reported as the ring's).
    """
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError("ring_all_reduce_flat: expects a contiguous 1-D tensor")
    if algo not in ("ring", "nccl"):
        raise ValueError(f"ring_all_reduce: algo must be 'ring' or 'nccl', got {algo!r}")
    if flat.device.type == "cuda":
        return _nccl_flat(flat, group, op, accumulate_dtype, algo)
    if flat.device.type != "cpu":
        raise ValueError(f"ring_all_reduce: tensors must be on the CPU (gloo ring) or a CUDA device (NCCL "
                         f"ring), got {flat.device}")
    if algo != "ring":
        raise ValueError(f"ring_all_reduce: algo={algo!r} is for CUDA tensors; CPU tensors take the gloo "
                         f"ring")
    rank, world = _group_rank_world(group)
    if accumulate_dtype is not None and accumulate_dtype != flat.dtype:
        wide = flat.to(accumulate_dtype)
        sent = _ring_flat(wide, group, rank, world, op == "avg")
        flat.copy_(wide)
        return sent
    return _ring_flat(flat, group, rank, world, op == "avg")


def _flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over `tensors` when they already lie back to back in one storage, else None."""
    first = tensors[0]
    if not all(t.is_contiguous() for t in tensors):
        return None
    storage = first.untyped_storage()
    pos = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != pos:
            return None
        pos += t.numel()
    total = pos - first.storage_offset()
    return first.new_empty(0).set_(storage, first.storage_offset(), (total,))


def plan_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped into buckets: one dtype per bucket, in the given order, each at most
    `bucket_bytes` unless a single tensor is larger (it then gets a bucket of its own)."""
    buckets: list[list[int]] = []
    open_by_dtype: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        cur = open_by_dtype.get(t.dtype)
        if cur is None or (cur[1] + nbytes > bucket_bytes and cur[0]):
            cur = ([], 0)
            buckets.append(cur[0])
        cur[0].append(i)
        open_by_dtype[t.dtype] = (cur[0], cur[1] + nbytes)
    return buckets


def check_same_device(tensors: Sequence[torch.Tensor], what: str = "ring_all_reduce") -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{what}: all tensors must be on one device to share buckets, got "
                         f"{sorted(str(d) for d in devices)}")
    return next(iter(devices))


def ring_all_reduce(tensors: Sequence[torch.Tensor], group=None, *, bucket_bytes: int = 25 * 2**20,
                    op: Literal["sum", "avg"] = "sum",
                    accumulate_dtype: torch.dtype | None = None,
                    algo: Literal["ring", "nccl"] = "ring") -> CommStats:
    """Sums (op="sum") or averages (op="avg") `tensors` in place across the ranks of `group`.

    Tensors are packed into buckets of at most `bucket_bytes` (one dtype each). Tensors that already
    lie back to back in one storage are reduced through a view, without copies; others are copied
    into a flat buffer and back. Returns this rank's `CommStats` (bytes sent, buckets, copies, time).
    CPU tensors go round a gloo ring, CUDA tensors round the NCCL ring (`algo`: see
    `ring_all_reduce_flat`); `seconds` of a CUDA call covers the enqueueing, not the GPU's work.
    """
    t0 = time.perf_counter()
    stats = CommStats()
    tensors = list(tensors)
    if not tensors:
        return stats
    if op not in ("sum", "avg"):
        raise ValueError(f"ring_all_reduce: op must be 'sum' or 'avg', got {op!r}")
    check_same_device(tensors)
    if op == "avg" and any(not (t.is_floating_point() or t.is_complex()) for t in tensors):
        raise ValueError("ring_all_reduce: op='avg' needs floating-point tensors "
                         "(integer averages would round)")
    for idx in plan_buckets(tensors, bucket_bytes):
        members = [tensors[i] for i in idx]
        flat = _flat_view(members)
        if flat is None:
            flat = torch.cat([t.reshape(-1) for t in members])
            stats.copied_bytes += 2 * flat.numel() * flat.element_size()
            stats.bytes_sent += ring_all_reduce_flat(flat, group, op=op, accumulate_dtype=accumulate_dtype,
                                                      algo=algo)
            pos = 0
            for t in members:
                t.copy_(flat[pos:pos + t.numel()].view_as(t))
                pos += t.numel()
        else:
            stats.bytes_sent += ring_all_reduce_flat(flat, group, op=op, accumulate_dtype=accumulate_dtype,
                                                      algo=algo)
        stats.buckets += 1
    stats.seconds = time.perf_counter() - t0
    return stats
