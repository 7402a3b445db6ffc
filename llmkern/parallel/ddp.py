"""Data parallelism: gradients averaged over the replicas bucket by bucket while backward runs.

`DistributedDataParallel(module, DDPConfig(...), group=...)` (or `apply_ddp(model, config)`) keeps one
replica of `module` per rank of `group` (a ProcessGroup, a 1-D DeviceMesh, a mesh axis name such as
"dp", or None for the default group). At construction every rank checks that the others hold the
same trainable parameters (names, shapes, dtypes), the same config and the same bucket plan, and
raises naming the rank and what differs; then parameters and buffers are broadcast from the group's
rank 0.

The gradients live in a llmkern.parallel.buffers.GradBuffer: flat buckets of at most `bucket_cap_mb`
in reverse registration order, each parameter's `.grad` a view into its bucket, and each bucket
averaged over the group (its `AllReduce` reducer: llmkern's ring or torch.distributed.all_reduce) as
soon as its gradients are there, while autograd computes the rest. When `backward()` returns the
gradients are averaged. CUDA parameters are reduced on a side stream ordered by CUDA events (see
buffers.py); the caller's stream waits for them before backward returns control, so an optimizer
reads averaged gradients.

Faults: every reduction waits at most `timeout_s` for a peer; a dead or stalled peer raises a
groups.CollectiveError on every rank naming the ranks that stopped. An exception inside backward
leaves the wrapper usable: the next backward starts clean (the reductions already launched are
waited for first).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel import buffers, collectives, groups


@dataclasses.dataclass(kw_only=True, slots=True)
class DDPConfig:
    """How `DistributedDataParallel` buckets and reduces gradients."""

    bucket_cap_mb: float = 25.0
    """Largest bucket in MiB (2^20 bytes). A parameter larger than this gets a bucket of its own.
    25 MiB is torch DDP's default; smaller buckets start communicating earlier in backward."""

    first_bucket_mb: float | None = 1.0
    """Cap of the first bucket (the last layers' gradients), so that communication starts early in
    backward. 1 MiB is torch DDP's default; None gives it bucket_cap_mb like the rest."""

    reduce_dtype: torch.dtype | None = None
    """Dtype in which gradients are summed and averaged, e.g. torch.float32 for bf16/fp16 gradients,
    so partial sums are not rounded to 16 bits. None reduces in the gradients' own dtype."""

    comm: Literal["ring", "all_reduce"] = "ring"
    """"ring": llmkern's ring (gloo isend/irecv on the CPU, the NCCL ring on CUDA). "all_reduce":
    torch.distributed.all_reduce on the same buckets (the baseline, for benchmarks)."""

    unused_parameters: Literal["error", "zero"] = "error"
    """What to do with trainable parameters that get no gradient in a synced backward. "error": raise,
    naming them (every other rank's bucket would wait for them). "zero": count them as a zero
    gradient and reduce their bucket at the end of backward (no overlap for that bucket)."""

    broadcast_buffers: bool = True
    """Broadcast buffers (e.g. rotary caches, running stats) from rank 0 at construction."""

    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    """Seconds a reduction waits for a peer before every rank raises, naming the peers that stopped
    (torch.distributed's own default is 30 minutes)."""

    def __post_init__(self):
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"DDPConfig.bucket_cap_mb must be > 0, got {self.bucket_cap_mb!r}")
        if self.first_bucket_mb is not None and not self.first_bucket_mb > 0:
            raise ValueError(f"DDPConfig.first_bucket_mb must be > 0 or None, got {self.first_bucket_mb!r}")
        if self.comm not in ("ring", "all_reduce"):
            raise ValueError(f"DDPConfig.comm must be 'ring' or 'all_reduce', got {self.comm!r}")
        if self.unused_parameters not in ("error", "zero"):
            raise ValueError(f"DDPConfig.unused_parameters must be 'error' or 'zero', got {self.unused_parameters!r}")
        if self.reduce_dtype is not None and not (isinstance(self.reduce_dtype, torch.dtype)
                                                  and self.reduce_dtype.is_floating_point):
            raise ValueError(f"DDPConfig.reduce_dtype must be a floating-point torch.dtype or None, got "
                             f"{self.reduce_dtype!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"DDPConfig.timeout_s must be > 0, got {self.timeout_s!r}")


DDPStats = buffers.BufferStats


class DistributedDataParallel(nn.Module):
    """Wraps `module`; call it like the module. Gradients are averaged over `group` during backward.

    The wrapped module is `self.module`; build the optimizer over `ddp.parameters()` (or the module's).
    `self.buffer` is the GradBuffer (`buffer.grad_view(p)`, `buffer.buckets`), `self.stats` its stats.
    """

    def __init__(self, module: nn.Module, config: DDPConfig | None = None, group=None):
        super().__init__()
        self.module = module
        self.config = config or DDPConfig()
        if not isinstance(self.config, DDPConfig):
            raise TypeError(f"DistributedDataParallel: config must be a DDPConfig, got {type(self.config).__name__}")
        self.group = groups.resolve(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        cfg = self.config
        reducer = buffers.AllReduce(group=self.group, op="avg", accumulate_dtype=cfg.reduce_dtype,
                                    backend="ring" if cfg.comm == "ring" else "torch", timeout_s=cfg.timeout_s)
        caps = {"bucket_bytes": int(cfg.bucket_cap_mb * 2**20),
                "first_bucket_bytes": None if cfg.first_bucket_mb is None
                else int(min(cfg.first_bucket_mb, cfg.bucket_cap_mb) * 2**20)}
        layout = buffers.FlatLayout([p for _, p in named], **caps)
        self._check_replicas(named, layout)
        buffers.check_devices([p for _, p in named], "DistributedDataParallel")  # the same verdict on every rank
        self._broadcast_state()
        self.buffer = buffers.GradBuffer([p for _, p in named], reducer, **caps, names=[n for n, _ in named],
                                         unused=cfg.unused_parameters, what="DistributedDataParallel")
        self.stats = self.buffer.stats

    # --- construction -------------------------------------------------------------------------------

    def _check_replicas(self, named, layout: buffers.FlatLayout) -> None:
        cfg = self.config
        collectives.agree(
            self.group, "DistributedDataParallel: model replicas differ", timeout=cfg.timeout_s, describe=_describe,
            trainable_parameters=len(named), elements=sum(p.numel() for _, p in named),
            names=[n for n, _ in named], shapes=[tuple(p.shape) for _, p in named],
            dtypes=[str(p.dtype) for _, p in named], devices=[str(p.device.type) for _, p in named],
            config={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, bucket_plan=layout.signature())

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        tensors = list(self.module.parameters())
        if self.config.broadcast_buffers:
            tensors += list(self.module.buffers())
        for t in tensors:
            # gloo's own broadcast for CUDA tensors (the ring backend's point-to-point path is for CPU ones)
            collectives.broadcast_(t.data, 0, self.group, backend="torch" if t.is_cuda else "ring", check=False,
                                   timeout=self.config.timeout_s)

    # --- use ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (into the bucket views) without communicating."""
        old, self.buffer.sync = self.buffer.sync, False
        try:
            yield
        finally:
            self.buffer.sync = old

    def close(self) -> None:
        """Removes the gradient hooks."""
        self.buffer.close()


def _describe(rank: int, theirs: dict, ours: dict) -> str:
    """One rank's difference from rank 0, in the words of the replica check."""
    if (theirs["trainable_parameters"], theirs["elements"]) != (ours["trainable_parameters"], ours["elements"]):
        text = (f"rank {rank} has {theirs['trainable_parameters']} trainable parameters ({theirs['elements']} "
                f"elements), rank 0 has {ours['trainable_parameters']} ({ours['elements']} elements)")
        return text + ("; their shapes differ" if theirs["trainable_parameters"] == ours["trainable_parameters"]
                       else "")
    for key in ("names", "shapes", "dtypes", "devices"):
        for i, (a, b) in enumerate(zip(theirs[key], ours[key])):
            if a != b:
                return (f"trainable parameter {i} ({ours['names'][i]}) differs in {key[:-1]}: {a} on rank {rank}, "
                        f"{b} on rank 0")
    bad = [f"{k}={theirs['config'][k]!r} (rank 0: {ours['config'][k]!r})" for k in ours["config"]
           if theirs["config"].get(k) != ours["config"][k]]
    if bad:
        return f"rank {rank} has DDPConfig " + ", ".join(bad)
    return f"rank {rank} plans different gradient buckets"


def apply_ddp(model: nn.Module, config: DDPConfig | None = None, group=None) -> DistributedDataParallel:
    """Wraps `model` in llmkern's `DistributedDataParallel` (see `DDPConfig`)."""
    return DistributedDataParallel(model, config, group)
