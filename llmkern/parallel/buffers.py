"""Flat, padded gradient buffers reduced bucket by bucket while backward runs (DDP; ZeRO plugs in).

`FlatLayout(params, bucket_bytes, pad_to)` decides where every parameter's gradient lives: the
parameters in reverse registration order (the order backward produces their gradients), cut into
buckets of at most `bucket_bytes` holding one dtype each (a parameter larger than that gets a bucket
of its own; the first bucket may have a smaller cap, `first_bucket_bytes`, so communication starts
early in backward), each bucket padded with zeros to a multiple of `pad_to` elements. With pad_to = the
world size every bucket splits into equal shards, rank r's being [r*k, (r+1)*k) (the shard
collectives.reduce_scatter gives rank r).

`GradBuffer(params, reducer, group, ...)` allocates the buckets, makes every `param.grad` a view into
its bucket, and registers a post-accumulate-grad hook per parameter. In a synced backward the hooks
count the gradients that arrived; a bucket whose gradients are all there is handed to the reducer as
soon as every bucket before it has been, so every rank issues the same collectives in the same order,
while autograd goes on computing the next gradients. A callback queued on the autograd engine waits
for all buckets at the end of backward, so the gradients are reduced when `backward()` returns.

The reducer is the pluggable part: `reducer.launch(bucket)` starts the collective on `bucket.data`
asynchronously and returns a collectives.Handle; `reducer.finish(bucket)` runs once it is done.
DDP's `AllReduce` averages the whole bucket; ZeRO-2/3 plug in a reducer that reduce-scatters each
bucket into the rank's shard (`bucket.shard(rank)`) or into storage of its own (a different bucket
to shard mapping is just another reducer), without copying any of this file.

CUDA: a bucket's reduction waits, on a side stream, for an event recorded on the stream that produced
its last gradient, and runs there (the NCCL ring or torch.distributed's NCCL work both enqueue on the
current stream); at the end of backward the caller's stream waits for every bucket, before an
optimizer can read the gradients. CPU: reductions run on the group's collective thread.

Failures: an error of a reduction is re-raised in the training thread at the end of backward (a peer
that stops is a groups.CollectiveError within the reducer's timeout). A backward that raised before
its end leaves buckets half counted; the next backward (a new autograd graph task) notices, waits for
the reductions already launched, and starts clean, so the buffer is usable again.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from llmkern.parallel import collectives, groups


@dataclasses.dataclass(frozen=True, slots=True)
class BucketSpec:
    """One bucket of a FlatLayout."""

    index: int
    dtype: torch.dtype
    params: tuple[int, ...]
    """Indices into FlatLayout.params, in layout order."""
    offsets: tuple[int, ...]
    """Element offset of each of those parameters inside the bucket."""
    numel: int
    """Elements of the parameters."""
    padded_numel: int
    """numel rounded up to a multiple of pad_to; the tail is zeros."""


class FlatLayout:
    """Where every parameter's gradient lives in a set of flat buckets (see the module docstring)."""

    def __init__(self, params: Sequence[torch.Tensor], *, bucket_bytes: int, pad_to: int = 1,
                 reverse: bool = True, first_bucket_bytes: int | None = None):
        if bucket_bytes <= 0 or (first_bucket_bytes is not None and first_bucket_bytes <= 0):
            raise ValueError(f"FlatLayout: bucket_bytes and first_bucket_bytes must be positive, got {bucket_bytes} "
                             f"and {first_bucket_bytes}")
        if pad_to < 1:
            raise ValueError(f"FlatLayout: pad_to must be >= 1, got {pad_to}")
        self.params = list(reversed(params)) if reverse else list(params)
        self.pad_to = pad_to
        self.buckets: list[BucketSpec] = []
        self.where: list[tuple[int, int]] = [(-1, -1)] * len(self.params)  # param index -> (bucket, offset)
        open_by_dtype: dict[torch.dtype, list] = {}  # dtype -> [param indices, offsets, numel]
        order: list[list] = []
        for i, p in enumerate(self.params):
            nbytes = p.numel() * p.element_size()
            cur = open_by_dtype.get(p.dtype)
            cap = first_bucket_bytes if first_bucket_bytes is not None and order and cur is order[0] else bucket_bytes
            if cur is None or (cur[2] * p.element_size() + nbytes > cap and cur[0]):
                cur = open_by_dtype[p.dtype] = [[], [], 0, p.dtype]
                order.append(cur)
            cur[0].append(i)
            cur[1].append(cur[2])
            cur[2] += p.numel()
        for b, (idx, offs, numel, dtype) in enumerate(order):
            padded = -(-numel // pad_to) * pad_to
            self.buckets.append(BucketSpec(b, dtype, tuple(idx), tuple(offs), numel, padded))
            for i, off in zip(idx, offs):
                self.where[i] = (b, off)

    def signature(self) -> list:
        """What every rank must agree on: each parameter's shape and dtype and the bucket plan."""
        return ([(tuple(p.shape), str(p.dtype)) for p in self.params]
                + [(b.params, b.padded_numel) for b in self.buckets])

    def shard(self, bucket: int, rank: int, world: int) -> tuple[int, int]:
        """(offset, count) of `rank`'s shard of bucket `bucket` when pad_to is a multiple of world."""
        spec = self.buckets[bucket]
        if spec.padded_numel % world:
            raise ValueError(f"FlatLayout: bucket {bucket} holds {spec.padded_numel} elements, not a multiple of "
                             f"world size {world}; build the layout with pad_to={world}")
        k = spec.padded_numel // world
        return rank * k, k

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def padded_numel(self) -> int:
        return sum(b.padded_numel for b in self.buckets)


class Bucket:
    """A bucket at run time: its flat tensor, the gradient views into it, and this backward's state."""

    __slots__ = ("data", "end_event", "handle", "ready", "spec", "start_event", "views")

    def __init__(self, spec: BucketSpec, data: torch.Tensor, views: list[torch.Tensor]):
        self.spec, self.data, self.views = spec, data, views
        self.ready: set[int] = set()  # positions in spec.params whose gradient arrived this backward
        self.handle: collectives.Handle | None = None
        self.start_event = self.end_event = None  # CUDA timing of this step's reduction

    def shard(self, rank: int, world: int) -> torch.Tensor:
        """The view of rank's equal shard of the (padded) bucket."""
        k = self.spec.padded_numel // world
        if k * world != self.spec.padded_numel:
            raise ValueError(f"Bucket {self.spec.index}: {self.spec.padded_numel} elements do not split into {world} "
                             f"equal shards (build the layout with pad_to={world})")
        return self.data[rank * k:(rank + 1) * k]


class BucketReducer(Protocol):
    """How a GradBuffer reduces a bucket. launch() must issue the same collective on every rank (the
    buffer calls it in bucket order) and return a collectives.Handle; finish() runs after wait()."""

    def launch(self, bucket: Bucket) -> collectives.Handle: ...

    def finish(self, bucket: Bucket) -> None: ...


@dataclasses.dataclass(kw_only=True, slots=True)
class AllReduce:
    """DDP's reducer: the bucket averaged (or summed) over the group, in place."""

    group: object = None
    """A group or mesh axis (see llmkern.parallel.groups.resolve)."""
    op: Literal["avg", "sum"] = "avg"
    """avg: the mean of the ranks' gradients (DDP's semantics); sum: their sum."""
    accumulate_dtype: torch.dtype | None = None
    """Reduce in this wider dtype (e.g. torch.float32 for bf16 gradients); see collectives."""
    backend: collectives.Backend = "ring"
    """"ring" (llmkern's ring) or "torch" (torch.distributed.all_reduce)."""
    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    """Seconds to wait for a peer before raising."""

    def launch(self, bucket: Bucket) -> collectives.Handle:
        return collectives.all_reduce_(bucket.data, self.group, op=self.op, accumulate_dtype=self.accumulate_dtype,
                                       backend=self.backend, async_op=True, check=False, timeout=self.timeout_s)

    def finish(self, bucket: Bucket) -> None:
        pass


@dataclasses.dataclass(kw_only=True, slots=True)
class ReduceScatter:
    """ZeRO-2/3's reducer: each bucket (laid out with pad_to = the world size) is reduce-scattered, rank
    r's reduced shard landing in `bucket.shard(r, world)`, or in the tensor `into(bucket)` returns (a
    shard of an optimizer's flat gradient, same dtype and bucket.spec.padded_numel / world elements)."""

    group: object = None
    """A group or mesh axis (see llmkern.parallel.groups.resolve)."""
    op: Literal["avg", "sum"] = "avg"
    """avg: the mean of the ranks' gradients; sum: their sum."""
    accumulate_dtype: torch.dtype | None = None
    """Reduce in this wider dtype (e.g. torch.float32 for bf16 gradients); see collectives."""
    backend: collectives.Backend = "ring"
    """"ring" (llmkern's ring) or "torch" (torch.distributed.reduce_scatter_single)."""
    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    """Seconds to wait for a peer before raising."""
    into: Callable[[Bucket], torch.Tensor] | None = None
    """Where a bucket's shard goes; None: the bucket's own shard view."""

    def launch(self, bucket: Bucket) -> collectives.Handle:
        out = self.into(bucket) if self.into is not None else None
        return collectives.reduce_scatter(bucket.data, out, self.group, op=self.op,
                                          accumulate_dtype=self.accumulate_dtype, backend=self.backend,
                                          async_op=True, check=False, timeout=self.timeout_s)

    def finish(self, bucket: Bucket) -> None:
        pass


@dataclasses.dataclass(slots=True)
class BufferStats:
    """Communication counters of one GradBuffer, summed over synced backward passes."""

    steps: int = 0
    """Synced backward passes (those that reduced gradients)."""
    bytes_sent: int = 0
    """Bytes this rank sent for gradients (an all-reduce sends 2(n-1)/n of the bucket bytes on n ranks)."""
    last_step_bytes: int = 0
    """bytes_sent of the last synced backward alone."""
    comm_seconds: float = 0.0
    """Time the reductions took (CPU: on the collective thread; CUDA: on the side stream)."""
    overlapped_seconds: float = 0.0
    """Part of comm_seconds that ran before backward had finished computing gradients."""

    @property
    def overlap_fraction(self) -> float:
        """Fraction of communication time hidden behind backward (0 when nothing was reduced)."""
        return self.overlapped_seconds / self.comm_seconds if self.comm_seconds > 0 else 0.0


def check_devices(params: Sequence[torch.Tensor], what: str) -> list[str]:
    """The one device of `params` (as a list of at most one name), or a ValueError naming them all."""
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(f"{what}: all trainable parameters must be on one device (the CPU or one CUDA device) to "
                         f"share gradient buckets, got {devices}; move the model with .to(device) first")
    if devices and torch.device(devices[0]).type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: parameters must be on the CPU or a CUDA device, got {devices[0]}")
    return devices


class GradBuffer:
    """The gradients of `params` in flat buckets, reduced by `reducer` during backward (module docstring).

    params: trainable parameters, all on one device (the CPU or one CUDA device).
    names: their names, for error messages (default "param<i>").
    unused: what a synced backward does with parameters that got no gradient: "error" raises naming
      them; "zero" counts them as zero gradients (their buckets are then reduced at the end).
    """

    def __init__(self, params: Sequence[nn.Parameter], reducer: BucketReducer, *, bucket_bytes: int,
                 first_bucket_bytes: int | None = None, pad_to: int = 1, names: Sequence[str] | None = None,
                 unused: Literal["error", "zero"] = "error", what: str = "GradBuffer"):
        params = list(params)
        if unused not in ("error", "zero"):
            raise ValueError(f"{what}: unused must be 'error' or 'zero', got {unused!r}")
        devices = check_devices(params, what)
        self.what, self.reducer, self.unused = what, reducer, unused
        self.layout = FlatLayout(params, bucket_bytes=bucket_bytes, pad_to=pad_to,
                                 first_bucket_bytes=first_bucket_bytes)
        named = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self._names = {id(p): n for p, n in zip(params, named)}
        self.device = torch.device(devices[0]) if devices else torch.device("cpu")
        self.buckets: list[Bucket] = []
        self._slot: dict[int, tuple[Bucket, int]] = {}  # id(param) -> (bucket, position in bucket)
        for spec in self.layout.buckets:
            data = torch.zeros(spec.padded_numel, dtype=spec.dtype, device=self.device)
            views = []
            for k, (i, off) in enumerate(zip(spec.params, spec.offsets)):
                p = self.layout.params[i]
                views.append(data[off:off + p.numel()].view_as(p))
            bucket = Bucket(spec, data, views)
            self.buckets.append(bucket)
            for k, i in enumerate(spec.params):
                p = self.layout.params[i]
                self._slot[id(p)] = (bucket, k)
                p.grad = bucket.views[k] if p.grad is None else bucket.views[k].copy_(p.grad)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.layout.params]
        self.stats = BufferStats()
        self.sync = True
        self._task: int | None = None  # autograd graph task of the synced backward in progress
        self._next_launch = 0
        self._t_backward_end = 0.0
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._end_event = None
        self._pending_cuda_stats: list = []

    # --- hooks -----------------------------------------------------------------------------------------

    def grad_view(self, param: torch.Tensor) -> torch.Tensor:
        """The view of `param`'s gradient in its bucket."""
        bucket, k = self._slot[id(param)]
        return bucket.views[k]

    def _on_grad(self, p: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if self._task is not None and self._task != task:
            # The previous synced backward raised before its end: its launched reductions may still
            # write into the buckets, so they are waited for before this gradient goes in.
            self._abandon()
        bucket, k = self._slot[id(p)]
        view = bucket.views[k]
        if p.grad is not view and (p.grad is None or p.grad.data_ptr() != view.data_ptr()):
            # The gradient was set to None (zero_grad(set_to_none=True)): autograd made a fresh tensor;
            # move it into the bucket.
            view.copy_(p.grad)
            p.grad = view
        if not self.sync:
            return
        if self._task is None:
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        if k in bucket.ready:
            raise RuntimeError(f"{self.what}: parameter {self._names[id(p)]} received a gradient twice in one "
                               f"backward (reentrant checkpointing, or the parameter used by two graphs that "
                               f"are differentiated together)")
        bucket.ready.add(k)
        self._launch_ready()

    def _launch_ready(self) -> None:
        # Strictly in bucket order, so every rank issues the same sequence of collectives.
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if len(b.ready) < len(b.spec.params):
                return
            self._launch(b)
            self._next_launch += 1

    def _launch(self, b: Bucket) -> None:
        if self._side_stream is None:
            b.handle = self.reducer.launch(b)
            return
        produced = torch.cuda.Event()
        produced.record()  # on the stream that produced this bucket's last gradient
        self._side_stream.wait_event(produced)
        with torch.cuda.stream(self._side_stream):
            b.start_event = torch.cuda.Event(enable_timing=True)
            b.start_event.record()
            b.handle = self.reducer.launch(b)
            b.end_event = torch.cuda.Event(enable_timing=True)
            b.end_event.record()

    # --- end of backward -------------------------------------------------------------------------------

    def _finish_backward(self) -> None:
        self._t_backward_end = time.perf_counter()
        if self._side_stream is not None:
            self._end_event = torch.cuda.Event(enable_timing=True)
            self._end_event.record()
        missing = [(b, k) for b in self.buckets for k in range(len(b.spec.params)) if k not in b.ready]
        if missing:
            names = [self._names[id(self.layout.params[b.spec.params[k]])] for b, k in missing]
            if self.unused == "error":
                self._drain()
                self.reset()
                more = " ..." if len(names) > 10 else ""
                raise RuntimeError(f"{self.what}: {len(names)} trainable parameter(s) got no gradient in this "
                                   f"backward: {', '.join(names[:10])}{more}. Freeze them (requires_grad=False) or "
                                   f"let them count as zero (unused_parameters='zero').")
            for b, k in missing:
                p, view = self.layout.params[b.spec.params[k]], b.views[k]
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    view.zero_()  # no local contribution (stale data from a previous step otherwise)
                    p.grad = view
                b.ready.add(k)
            self._launch_ready()
        self._drain()
        self._account()
        self.reset()

    def _drain(self) -> None:
        """Waits for every launched bucket (the caller's stream waits for CUDA ones) and runs finish()."""
        error = None
        for b in self.buckets[:self._next_launch]:
            if b.handle is None:
                continue
            try:
                b.handle.wait()
                if error is None:
                    self.reducer.finish(b)
            except BaseException as e:  # noqa: BLE001 - the first error is re-raised after all waited
                error = error or (b, e)
        if error is not None:
            b, e = error
            self.reset()
            if isinstance(e, groups.CollectiveError):
                raise groups.CollectiveError(f"{self.what}: reducing gradient bucket {b.spec.index} failed: {e}",
                                             rank=e.rank, world=e.world, peer=e.peer, stopped=e.stopped,
                                             reports=e.reports) from e
            raise RuntimeError(f"{self.what}: reducing gradient bucket {b.spec.index} failed: {type(e).__name__}: "
                               f"{e}") from e

    def _account(self) -> None:
        sent = comm_s = overlap = 0.0
        for b in self.buckets:
            o = b.handle.outcome if b.handle is not None else None
            if o is None:
                continue
            sent += o.bytes_sent or 0
            if o.started is not None and o.finished is not None:
                comm_s += o.finished - o.started
                overlap += max(0.0, min(o.finished, self._t_backward_end) - o.started)
        if self._side_stream is not None:
            self._pending_cuda_stats.append([(b.start_event, b.end_event) for b in self.buckets
                                             if b.start_event is not None] + [self._end_event])
            self._collect_cuda_stats(block=False)
        self.stats.steps += 1
        self.stats.last_step_bytes = int(sent)
        self.stats.bytes_sent += int(sent)
        self.stats.comm_seconds += comm_s
        self.stats.overlapped_seconds += overlap

    def _collect_cuda_stats(self, block: bool) -> None:
        """Adds the side-stream times of finished CUDA steps to the stats (events are read once done)."""
        keep = []
        for step in self._pending_cuda_stats:
            *pairs, end = step
            if not block and not end.query():
                keep.append(step)
                continue
            end.synchronize()
            for start, stop in pairs:
                stop.synchronize()
                dur = start.elapsed_time(stop) / 1e3
                # Milliseconds from the reduction's start to backward's end, on the GPU's clock.
                before_end = start.elapsed_time(end) / 1e3
                self.stats.comm_seconds += dur
                self.stats.overlapped_seconds += max(0.0, min(dur, before_end))
        self._pending_cuda_stats = keep

    def synchronize_stats(self) -> BufferStats:
        """The stats with every finished CUDA step's timing read (blocks on the GPU); CPU: as is."""
        self._collect_cuda_stats(block=True)
        return self.stats

    def _abandon(self) -> None:
        """The previous synced backward never reached its end (it raised): wait for what it launched
        (every rank that raised at the same point launched the same buckets) and start over."""
        try:
            self._drain()
        finally:
            self.reset()

    def reset(self) -> None:
        """Forgets this backward's progress (nothing is waited for)."""
        for b in self.buckets:
            b.ready.clear()
            b.handle = None
            b.start_event = b.end_event = None
        self._next_launch = 0
        self._task = None

    def close(self) -> None:
        """Removes the hooks; the gradients stay where they are."""
        for h in self._handles:
            h.remove()
        self._handles = []
