"""The ring schedule and its gloo transport: reduce-scatter and all-gather as separate phases.

The schedule (which chunk each rank sends and receives at each step) is the one in
csrc/comm/ring_schedule.h, mirrored function for function below; tests/parallel/test_ring_schedule.py
compares the two for world sizes 1..16. Rank r owns chunk r after reduce-scatter, as with
torch.distributed.reduce_scatter_tensor: a buffer of world*k elements leaves rank r's result at
[r*k, (r+1)*k).

`run(flat, st, seq, kind, op, timeout_s)` moves one contiguous CPU buffer round the ring of the
group's ranks with gloo isend/irecv: kind "all_reduce" (reduce-scatter then all-gather),
"reduce_scatter" or "all_gather". The step loop runs in C++ (csrc/comm/gloo_ring.cpp, the op
torch.ops.llmkern._ring_gloo_, with the GIL released); `run_python` below is the same loop in Python,
its readable twin, which the tests hold it to bit for bit. The steps form one pipeline: each chunk goes over the wire in
segments of SEGMENT_BYTES, and a segment received at step t is reduced and sent on at step t+1 while
the rest of its chunk is still arriving; the receives of step t+1 are posted while step t is
processed (into scratch at once; in place segment by segment, each once its memory is sent). Every wait is bounded by timeout_s and a failed wait raises groups.PeerFailure naming the
neighbour (llmkern.parallel.collectives turns it into a CollectiveError on every rank).

Why a ring of point-to-point messages on gloo: gloo's all_reduce moved 64 MiB fp32 at 1.26 GB/s bus
bandwidth at 2 ranks and 0.75 GB/s at 4 on these machines, a ring of plain isend/irecv at 1.49 and
1.08 GB/s per link (bench/parallel/bench_ring_all_reduce.py measures both in one run).
"""
from __future__ import annotations

import re
import threading
from typing import Literal

import torch
import torch.distributed as dist

from llmkern import _ext
from llmkern.parallel import groups

Kind = Literal["all_reduce", "reduce_scatter", "all_gather"]

# --- the schedule: a line-for-line mirror of csrc/comm/ring_schedule.h -------------------------------


def next_rank(rank: int, world: int) -> int:
    return (rank + 1) % world


def prev_rank(rank: int, world: int) -> int:
    return (rank - 1) % world


def ring_steps(world: int) -> int:
    """Steps in each of reduce-scatter and all-gather."""
    return world - 1


def chunk_range(n: int, world: int, chunk: int) -> tuple[int, int]:
    """(offset, count) of chunk `chunk` when n elements are cut into `world` near-equal chunks (equal
    when world divides n, as reduce-scatter and all-gather require)."""
    base, extra = divmod(n, world)
    return chunk * base + min(chunk, extra), base + (1 if chunk < extra else 0)


def reduce_scatter_step(rank: int, world: int, step: int) -> tuple[int, int]:
    """(send_chunk, recv_chunk) of `rank` at reduce-scatter step `step`; the received one is reduced in."""
    return (rank - step - 1) % world, (rank - step - 2) % world


def all_gather_step(rank: int, world: int, step: int) -> tuple[int, int]:
    """(send_chunk, recv_chunk) of `rank` at all-gather step `step`; the received one is copied."""
    return (rank - step) % world, (rank - step - 1) % world


def owned_chunk(rank: int, world: int) -> int:
    """The chunk `rank` holds fully reduced after reduce-scatter (and sends first in all-gather)."""
    return rank % world


def elements_sent(n: int, rank: int, world: int) -> int:
    """Elements `rank` sends in one all-reduce of n elements (2(world-1)/world·n, ±1 per step)."""
    total = 0
    for s in range(ring_steps(world)):
        total += chunk_range(n, world, reduce_scatter_step(rank, world, s)[0])[1]
        total += chunk_range(n, world, all_gather_step(rank, world, s)[0])[1]
    return total


def bytes_sent(kind: Kind, n: int, rank: int, world: int, element_size: int) -> int:
    """Bytes `rank` sends in one `kind` of n elements: the chunks of its send steps."""
    total = 0
    for send, _, _ in _steps(kind, rank, world):
        total += chunk_range(n, world, send)[1]
    return total * element_size


def padded_numel(n: int, world: int) -> int:
    """n rounded up to a multiple of world: the length of a buffer whose shards are all equal."""
    return -(-n // world) * world if world > 0 else n


# --- the gloo transport --------------------------------------------------------------------------------

# Pipelining segments: each chunk goes over the wire in pieces, so a piece is reduced (reduce-scatter)
# or forwarded (all-gather) while the next ones are still in flight. SEGMENT_BYTES None: a quarter of
# a chunk, at least MIN_SEGMENT_BYTES. Every message costs a wake-up of the receiving thread, which on
# these loaded 2-core machines is where the ring lost to a single send: 64 MiB fp32 in 1 MiB
# segments reached 0.77 (2 ranks) and 0.86 (4 ranks) of the sendrecv ring's bus bandwidth, in 4 MiB
# segments 0.89 and 0.95, in 8 MiB 0.88 and 0.84 (bench_ring_all_reduce.py --segment-kib, load 17).
# Four segments per chunk still overlap each segment's add with the next one's transfer.
SEGMENT_BYTES: int | None = None
MIN_SEGMENT_BYTES = 1 << 20
SEGMENTS_PER_CHUNK = 4


def segment_elements(largest_chunk: int, element_size: int, segment_bytes: int | None = None) -> int:
    """Elements per pipelining segment: segment_bytes when given, else a quarter of the largest chunk and
    at least MIN_SEGMENT_BYTES (the rule csrc/comm/gloo_ring.cpp applies when passed 0)."""
    if segment_bytes:
        return max(1, segment_bytes // element_size)
    return max(1, MIN_SEGMENT_BYTES // element_size, -(-largest_chunk // SEGMENTS_PER_CHUNK))

_SCRATCH = threading.local()


def _scratch_pool(like: torch.Tensor, numel: int) -> torch.Tensor:
    """Receive buffers kept across calls (per thread and dtype): allocating 2 × 32 MiB afresh for every
    64 MiB all-reduce costs page faults on first touch, measured at a third of the time."""
    pools = _SCRATCH.__dict__.setdefault("pools", {})
    buf = pools.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buf = pools[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buf


def _steps(kind: Kind, rank: int, world: int) -> list[tuple[int, int, bool]]:
    """(send_chunk, recv_chunk, reduce) of every step of `kind`, in order."""
    rs = [(*reduce_scatter_step(rank, world, s), True) for s in range(ring_steps(world))]
    ag = [(*all_gather_step(rank, world, s), False) for s in range(ring_steps(world))]
    return {"all_reduce": rs + ag, "reduce_scatter": rs, "all_gather": ag}[kind]


_PEER_FAILURE = re.compile(r"llmkern-peer-failure\|(-?\d+)\|([^|]*)\|(.*)", re.DOTALL)


def run(flat: torch.Tensor, st: groups.GroupState, seq: int, kind: Kind, op: Literal["sum", "avg", "max"],
        timeout_s: float, segment_bytes: int | None = None) -> int:
    """Runs `kind` on the contiguous 1-D CPU tensor `flat` in place over st's group; returns the bytes
    this rank sent. reduce_scatter leaves the result in chunk `rank` (the rest holds partial sums);
    all_gather expects this rank's shard in chunk `rank`. A failed or timed-out wait raises
    groups.PeerFailure."""
    if not _ext.available("_C"):
        raise RuntimeError(f"llmkern ring: llmkern._C is {_ext.status('_C')}; it holds the ring's step loop "
                           f"(csrc/comm/gloo_ring.cpp). Rebuild with `pip install --no-build-isolation -e .`, or "
                           f"use backend='torch'")
    if flat.numel() == 0 or st.world == 1:
        return 0
    try:
        ring_op()(flat, st.pg.group_name, kind, op, groups.tag(seq, 0), float(timeout_s),
                  int(segment_bytes or SEGMENT_BYTES or 0))
    except RuntimeError as e:
        m = _PEER_FAILURE.search(str(e))
        if m is None:
            raise
        raise groups.PeerFailure(int(m.group(1)), m.group(2), RuntimeError(m.group(3).strip())) from e
    return bytes_sent(kind, flat.numel(), st.rank, st.world, flat.element_size())


_FAKE_REGISTERED = False


def ring_op():
    """torch.ops.llmkern._ring_gloo_ with its fake (a no-op: it only mutates its input), registered once,
    so that opcheck and torch.compile can trace a call."""
    global _FAKE_REGISTERED
    if not _FAKE_REGISTERED:
        torch.library.register_fake("llmkern::_ring_gloo_")(lambda flat, *args: None)
        _FAKE_REGISTERED = True
    return torch.ops.llmkern._ring_gloo_.default


def run_python(flat: torch.Tensor, st: groups.GroupState, seq: int, kind: Kind, op: Literal["sum", "avg", "max"],
               timeout_s: float, segment_bytes: int | None = None) -> int:
    """`run` in Python, step for step (the C++ loop's twin)."""
    n, world, rank = flat.numel(), st.world, st.rank
    if world == 1 or n == 0:
        return 0
    nxt, prv = next_rank(rank, world), prev_rank(rank, world)
    size = flat.element_size()
    steps = _steps(kind, rank, world)
    total, last_reduce = len(steps), sum(1 for s in steps if s[2]) - 1
    largest = chunk_range(n, world, 0)[1]
    seg = segment_elements(largest, size, segment_bytes or SEGMENT_BYTES)
    nseg = -(-largest // seg)
    pool = _scratch_pool(flat, 2 * largest) if last_reduce >= 0 else None
    scratch = [pool[:largest], pool[largest:2 * largest]] if pool is not None else None
    pending: dict[tuple[int, int], list] = {}  # (chunk, segment) -> its isend works (memory busy until done)
    sent = 0

    def segments(chunk: int):
        off, cnt = chunk_range(n, world, chunk)
        return [(off + j, min(seg, cnt - j)) for j in range(0, cnt, seg)]

    def where(t: int, what: str) -> str:
        phase = "reduce-scatter" if steps[t][2] else "all-gather"
        step = t if steps[t][2] else t - (last_reduce + 1)
        return f"{what} at {phase} step {step}"

    def send(t: int, chunk: int, j: int, off: int, cnt: int) -> None:
        nonlocal sent
        try:
            w = dist.isend(flat[off:off + cnt], group=st.pg, group_dst=nxt, tag=groups.tag(seq, t * nseg + j))
        except Exception as e:
            raise groups.PeerFailure(nxt, where(t, "send"), e) from e
        pending.setdefault((chunk, j), []).append((w, t))
        sent += cnt * size

    def post(t: int, j: int, off: int, cnt: int):
        """The receive of segment j of step t: into scratch (reduce-scatter) or in place (all-gather),
        where that segment's earlier send must have finished first."""
        _, chunk, reduce = steps[t]
        if reduce:
            base = chunk_range(n, world, chunk)[0]
            into = scratch[t % 2][off - base:off - base + cnt]
        else:
            for w, ts in pending.pop((chunk, j), []):
                groups.wait(w, timeout_s, nxt, where(ts, "send"))
            into = flat[off:off + cnt]
        try:
            w = dist.irecv(into, group=st.pg, group_src=prv, tag=groups.tag(seq, t * nseg + j))
        except Exception as e:
            raise groups.PeerFailure(prv, where(t, "receive"), e) from e
        return w, off, cnt, into

    recvs = [post(0, j, off, cnt) for j, (off, cnt) in enumerate(segments(steps[0][1]))]
    for j, (off, cnt) in enumerate(segments(steps[0][0])):
        send(0, steps[0][0], j, off, cnt)
    for t in range(total):
        after = segments(steps[t + 1][1]) if t + 1 < total else []
        # Receives into scratch depend on nothing: all posted now. In-place ones are posted segment by
        # segment as this step goes, each after the send that last read its memory: waiting for a whole
        # chunk's sends first would stall the pipeline at the phase boundary (the all-gather would
        # start only once the reduce-scatter's last segment had left).
        eager = t + 1 < total and steps[t + 1][2]
        following = [post(t + 1, j, off, cnt) for j, (off, cnt) in enumerate(after)] if eager else []
        _, chunk, reduce = steps[t]
        for j, (w, off, cnt, into) in enumerate(recvs):
            groups.wait(w, timeout_s, prv, where(t, "receive"))
            if reduce:
                own = flat[off:off + cnt]
                if op == "max":
                    torch.maximum(own, into, out=own)
                else:
                    own.add_(into)
                if op == "avg" and t == last_reduce:  # the owned chunk, divided once before it is gathered
                    own.div_(world)
            if t + 1 < total:
                send(t + 1, chunk, j, off, cnt)
                if not eager and j < len(after):
                    following.append(post(t + 1, j, *after[j]))
        if not eager:
            following += [post(t + 1, j, *after[j]) for j in range(len(following), len(after))]
        recvs = following
    for works in pending.values():
        for w, ts in works:
            groups.wait(w, timeout_s, nxt, where(ts, "send"))
    return sent
