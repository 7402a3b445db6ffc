"""Data parallelism with gradient buckets that are all-reduced while backward is still running.

`DistributedDataParallel(module, DDPConfig(...))` (or `apply_ddp(model, config)`) keeps one replica of
`module` per rank. At construction it checks that every rank holds the same trainable parameters,
broadcasts parameters and buffers from rank 0, and lays the trainable parameters' gradients out in
flat buckets of at most `bucket_cap_mb`, in reverse registration order (the order backward produces
them). Each parameter's `.grad` is a view into its bucket, so no gradient is copied to be reduced.

During backward a `register_post_accumulate_grad_hook` per parameter counts the gradients that have
arrived. When a bucket is complete, it is handed to a communication thread that all-reduces it
(`llmkern.parallel.comm` ring by default) while autograd goes on computing the next gradients. Buckets
are launched strictly in index order, so every rank runs the same sequence of collectives. A callback
queued on the autograd engine waits for all buckets at the end of backward, so the gradients are
averaged when `backward()` returns, before `optimizer.step()`.

Not here yet: CUDA parameters are refused. `comm.ring_all_reduce` has an NCCL path for CUDA tensors,
but overlapping it with backward needs its own CUDA stream and events per bucket, which have not
been written or run on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel import comm


@dataclasses.dataclass(kw_only=True, slots=True)
class DDPConfig:
    """How `DistributedDataParallel` buckets and reduces gradients."""

    bucket_cap_mb: float = 25.0
    """Largest bucket in MiB (2^20 bytes). A parameter larger than this gets a bucket of its own.
    25 MiB is torch DDP's default; smaller buckets start communicating earlier in backward."""

    reduce_dtype: torch.dtype | None = None
    """Dtype in which gradients are summed and averaged, e.g. torch.float32 for bf16/fp16 gradients,
    so partial sums are not rounded to 16 bits. None reduces in the gradients' own dtype."""

    comm: Literal["ring", "all_reduce"] = "ring"
    """"ring": llmkern.parallel.comm's ring of isend/irecv. "all_reduce": torch.distributed.all_reduce
    on the same buckets (the baseline, for benchmarks)."""

    unused_parameters: Literal["error", "zero"] = "error"
    """What to do with trainable parameters that get no gradient in a synced backward. "error": raise,
    naming them (every other rank's bucket would wait forever). "zero": count them as a zero
    gradient and reduce their bucket at the end of backward (no overlap for that bucket)."""

    broadcast_buffers: bool = True
    """Broadcast buffers (e.g. rotary caches, running stats) from rank 0 at construction."""


@dataclasses.dataclass(slots=True)
class DDPStats:
    """Communication counters of one DDP wrapper, summed over synced backward passes."""

    steps: int = 0
    """Synced backward passes (those that reduced gradients)."""
    bytes_sent: int = 0
    """Bytes this rank sent for gradients: 2(n-1)/n × gradient bytes per step on n ranks."""
    last_step_bytes: int = 0
    """bytes_sent of the last synced backward alone."""
    comm_seconds: float = 0.0
    """Time the communication thread spent reducing buckets."""
    overlapped_seconds: float = 0.0
    """Part of comm_seconds that ran before backward had finished computing gradients."""

    @property
    def overlap_fraction(self) -> float:
        """Fraction of communication time hidden behind backward (0 when nothing was reduced)."""
        return self.overlapped_seconds / self.comm_seconds if self.comm_seconds > 0 else 0.0


class _Bucket:
    __slots__ = ("index", "params", "flat", "views", "ready", "done", "error", "t0", "t1", "sent")

    def __init__(self, index: int, params: list[nn.Parameter]):
        self.index = index
        self.params = params
        dtype, device = params[0].dtype, params[0].device
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.views, pos = [], 0
        for p in params:
            self.views.append(self.flat[pos:pos + p.numel()].view_as(p))
            pos += p.numel()
        self.ready: set[int] = set()  # positions in params whose gradient has arrived this backward
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.t0 = self.t1 = 0.0
        self.sent = 0


class DistributedDataParallel(nn.Module):
    """Wraps `module`; call it like the module. Gradients are averaged over `group` during backward.

    The wrapped module is `self.module`; build the optimizer over `ddp.parameters()` (or the module's).
    """

    def __init__(self, module: nn.Module, config: DDPConfig | None = None, group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DistributedDataParallel: torch.distributed is not initialized "
                               "(launch with torchrun and call dist.init_process_group first)")
        self.module = module
        self.config = config or DDPConfig()
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        comm.check_same_device([p for _, p in named] or [torch.empty(0)], "DistributedDataParallel")
        if named and named[0][1].device.type != "cpu":
            raise NotImplementedError("DistributedDataParallel: only CPU parameters (gloo) for now; reducing CUDA "
                                      "buckets during backward needs per-bucket CUDA streams and events, not "
                                      "written yet (llmkern.parallel.comm.ring_all_reduce itself takes CUDA "
                                      "tensors through NCCL)")
        self._check_replicas(named)
        self._broadcast_state()

        self._names = {p: n for n, p in named}
        # Reverse registration order: backward produces the last layers' gradients first.
        ordered = [p for _, p in reversed(named)]
        cap = int(self.config.bucket_cap_mb * 2**20)
        self._buckets = [_Bucket(i, [ordered[j] for j in idx])
                         for i, idx in enumerate(comm.plan_buckets(ordered, cap))]
        self._where: dict[nn.Parameter, tuple[_Bucket, int]] = {}
        for b in self._buckets:
            for k, p in enumerate(b.params):
                self._where[p] = (b, k)
                p.grad = b.views[k] if p.grad is None else b.views[k].copy_(p.grad)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]

        self.stats = DDPStats()
        self._sync = True
        self._in_backward = False
        self._next_launch = 0
        self._t_backward_end = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._comm_loop, name="llmkern-ddp-comm", daemon=True)
        self._worker.start()

    # --- construction -------------------------------------------------------------------------------

    def _check_replicas(self, named) -> None:
        mine = (len(named), sum(p.numel() for _, p in named), [tuple(p.shape) for _, p in named])
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.group)
        for r, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                raise ValueError(
                    f"DistributedDataParallel: model replicas differ: rank {r} has {theirs[0]} trainable "
                    f"parameters ({theirs[1]} elements), rank 0 has {everyone[0][0]} "
                    f"({everyone[0][1]} elements)"
                    + ("" if theirs[:2] != everyone[0][:2] else "; their shapes differ"))

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        tensors = list(self.module.parameters())
        if self.config.broadcast_buffers:
            tensors += list(self.module.buffers())
        for t in tensors:
            dist.broadcast(t.data, src=src, group=self.group)

    # --- backward -----------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (into the bucket views) without communicating."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: nn.Parameter) -> None:
        b, k = self._where[p]
        view = b.views[k]
        if p.grad is not view and (p.grad is None or p.grad.data_ptr() != view.data_ptr()):
            # The optimizer set grads to None: autograd made a fresh tensor; move it into the bucket.
            view.copy_(p.grad)
            p.grad = view
        if not self._sync:
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        if k in b.ready:
            raise RuntimeError(f"DistributedDataParallel: parameter {self._names[p]} received a gradient "
                               f"twice "
                               f"in one backward (reentrant checkpointing is not supported)")
        b.ready.add(k)
        self._launch_ready()

    def _launch_ready(self) -> None:
        # Strictly in bucket order, so every rank issues the same sequence of collectives.
        while self._next_launch < len(self._buckets):
            b = self._buckets[self._next_launch]
            if len(b.ready) < len(b.params):
                return
            b.done.clear()
            self._queue.put(b)
            self._next_launch += 1

    def _comm_loop(self) -> None:
        while True:
            b = self._queue.get()
            if b is None:
                return
            b.t0 = time.perf_counter()
            try:
                b.sent = self._reduce(b.flat)
                b.error = None
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                b.error = e
            b.t1 = time.perf_counter()
            b.done.set()

    def _reduce(self, flat: torch.Tensor) -> int:
        cfg = self.config
        if cfg.comm == "ring":
            return comm.ring_all_reduce_flat(flat, self.group, op="avg", accumulate_dtype=cfg.reduce_dtype)
        wide = flat if cfg.reduce_dtype in (None, flat.dtype) else flat.to(cfg.reduce_dtype)
        dist.all_reduce(wide, group=self.group)
        wide.div_(self.world)
        if wide is not flat:
            flat.copy_(wide)
        # gloo picks its own algorithm; report what a bandwidth-optimal one sends
        return comm.elements_sent(wide.numel(), self.rank, self.world) * wide.element_size()

    def _finish_backward(self) -> None:
        self._t_backward_end = time.perf_counter()
        self._in_backward = False
        unused = [(b, k) for b in self._buckets for k in range(len(b.params)) if k not in b.ready]
        if unused:
            names = [self._names[b.params[k]] for b, k in unused]
            if self.config.unused_parameters == "error":
                self._drain(self._next_launch)
                self._reset()
                more = " ..." if len(names) > 10 else ""
                raise RuntimeError(f"DistributedDataParallel: {len(names)} trainable parameter(s) got no "
                                   f"gradient in this backward: {', '.join(names[:10])}{more}. Freeze them "
                                   f"(requires_grad=False) or use DDPConfig(unused_parameters='zero').")
            for b, k in unused:
                p, view = b.params[k], b.views[k]
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    view.zero_()  # no local contribution (stale data from a previous step otherwise)
                    p.grad = view
                b.ready.add(k)
            self._launch_ready()
        self._drain(len(self._buckets))
        sent = comm_s = overlap = 0.0
        for b in self._buckets:
            sent += b.sent
            comm_s += b.t1 - b.t0
            overlap += max(0.0, min(b.t1, self._t_backward_end) - b.t0)
        self.stats.steps += 1
        self.stats.last_step_bytes = int(sent)
        self.stats.bytes_sent += int(sent)
        self.stats.comm_seconds += comm_s
        self.stats.overlapped_seconds += overlap
        self._reset()

    def _drain(self, upto: int) -> None:
        for b in self._buckets[:upto]:
            b.done.wait()
            if b.error is not None:
                err = b.error
                self._reset()
                raise RuntimeError(f"DistributedDataParallel: all-reduce of gradient bucket {b.index} failed "
                                   f"on rank {self.rank} of {self.world} (a peer rank died or timed out?): "
                                   f"{type(err).__name__}: {err}") from err

    def _reset(self) -> None:
        for b in self._buckets:
            b.ready.clear()
        self._next_launch = 0

    def close(self) -> None:
        """Stops the communication thread and removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._queue.put(None)

    def __del__(self):
        with contextlib.suppress(Exception):
            self._queue.put(None)


def apply_ddp(model: nn.Module, config: DDPConfig | None = None, group=None) -> DistributedDataParallel:
    """Wraps `model` in llmkern's `DistributedDataParallel` (see `DDPConfig`)."""
    return DistributedDataParallel(model, config, group)
