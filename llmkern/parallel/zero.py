"""ZeRO: fp32 masters and moments (stage 1), gradients (stage 2) and parameters (stage 3, Zero3Model
below) partitioned across the data-parallel ranks.

    model, optimizer = llmkern.parallel.apply_zero(model, ZeroConfig(stage=2), lr=1e-4)
    scaler = DynamicLossScaler(process_group=...)            # optional, fp16
    for step in ...:
        with model.no_sync():                                # gradient accumulation
            model(**micro0).loss.backward()
        model(**micro1).loss.backward()                      # reduce-scattered while backward runs
        optimizer.clip_grad_norm_(1.0)                       # the global norm over every shard
        optimizer.step()                                     # the fused step on the shard, then all-gather
        optimizer.zero_grad()

Layout. The trainable parameters are laid out as llmkern.parallel.buffers.FlatLayout lays out their
gradients: reverse registration order, buckets of at most `reduce_bucket_mb` holding one dtype, each
padded to a multiple of the world size N. Each parameter becomes a view into a flat parameter buffer
of its bucket (the same offsets as its gradient in the GradBuffer), so rank r's shard of bucket b is
the slice [r*k, (r+1)*k) of both, k = padded_numel / N. The optimizer owns, per bucket, an fp32
master of that slice (the parameter slice itself for fp32 parameters), exp_avg and exp_avg_sq:
12 bytes per element of the shard for 16-bit parameters, 8 for fp32 ones.

A step. Backward fills the GradBuffer; each bucket, once complete, is reduce-scattered (average over
the group, `reduce_dtype` partial sums) while autograd goes on. Stage 1 reduces into the bucket's own
shard view (the full gradient buffer stays allocated, 2Ψ bytes of 16-bit gradients); stage 2 reduces
into a separate shard tensor and frees the bucket's storage as soon as its collective is done (CPU:
on the collective thread; CUDA: at the end of backward, when the caller's stream has waited for it),
so the gradients at rest are 2Ψ/N. The next forward re-allocates (zeroed) what was freed. optimizer.step
runs llmkern.optim.step_scalars over the gradient shards, marked sharded over the group (the overflow
flag and the clipping norm count every element once across ranks), then one fused update launch
(llmkern.optim.fused_update, the optimizer class's rule) over every bucket's shard, which unscales,
clips, updates masters and moments and writes the 16-bit parameter shard in one pass. Then every
bucket's parameter buffer is all-gathered in place, asynchronously: the next forward waits for it.

Offload (`offload_optimizer=True`): masters and moments live in host memory and the update runs
llmkern.optim.CPUAdam's C++ kernel there; each reduced gradient shard is copied down to its host
fp32 buffer as soon as its reduce-scatter ends (on the collective thread, while backward goes on;
on CUDA at step()), and the updated 16-bit shards come back through host copy buffers (pinned when
CUDA is usable). On a CPU-only machine the "device" is the CPU too; the host store is still separate
memory (tests check the masters do not alias the parameters).

Stage 3 (Zero3Model): every parameter, trainable or frozen, lives as this rank's shard of a flat
buffer per unit (each child of an nn.ModuleList, i.e. each transformer block, and the root with the
rest) and dtype; see the class. The optimizer above steps its trainable shards unchanged.

Construction is collective: every rank checks that the others hold the same trainable parameters,
the same ZeroConfig and the same bucket plan (a ValueError naming the rank and the difference), then
parameters and buffers are broadcast from the group's rank 0. Every collective runs under
`timeout_s`, so a rank that stops or skips a step becomes a CollectiveError on the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from llmkern.optim import FusedAdamW, MixedPrecisionOptimizer, step_scalars
from llmkern.optim.fused_update import advance_step_, launch_seed
from llmkern.optim.step_scalars import global_sumsq, grad_norm
from llmkern.parallel import buffers, collectives, groups

_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(kw_only=True, slots=True)
class ZeroConfig:
    """How `apply_zero` partitions model states across the data-parallel group."""

    stage: Literal[1, 2, 3] = 2
    """1: optimizer states (fp32 masters, moments) partitioned; 2: gradients too; 3: parameters too."""

    offload_optimizer: bool = False
    """Keep masters and moments in host memory and run the step there (llmkern.optim.CPUAdam's kernel)."""

    reduce_bucket_mb: float = 25.0
    """Largest gradient bucket in MiB (2^20 bytes) reduce-scattered as one collective. 25 MiB is torch
    DDP's default bucket; smaller buckets start communicating earlier in backward, larger ones issue
    fewer collectives."""

    prefetch: int = 1
    """Stage 3: units whose parameters are all-gathered ahead of the one running (0: none)."""

    reshard_after_forward: bool = True
    """Stage 3: free a unit's gathered parameters after its forward (gathered again for backward); False
    keeps them until the unit's backward, trading memory for one all-gather per unit."""

    param_persistence_threshold: int = 0
    """Stage 3: parameters of at most this many elements (biases, norm weights) stay whole on every rank,
    as DeepSpeed's stage3_param_persistence_threshold: never gathered or freed around a unit, all-gathered
    once after each optimizer step; their gradients and optimizer states are still sharded. Gathering a
    33-element bias costs a collective's latency for 132 bytes; keeping it whole costs (N-1)/N of those
    bytes. 0: every parameter sharded."""

    reduce_dtype: torch.dtype | None = None
    """Dtype of the partial sums of the gradient reduction, e.g. torch.float32 for bf16 gradients;
    None reduces in the gradients' own dtype."""

    comm: Literal["ring", "torch"] = "ring"
    """"ring": llmkern's ring collectives; "torch": torch.distributed's reduce_scatter / all_gather."""

    timeout_s: float = groups.DEFAULT_TIMEOUT_S
    """Seconds a collective waits for a peer before every rank raises, naming the peers that stopped."""

    def __post_init__(self):
        if self.stage not in (1, 2, 3) or isinstance(self.stage, bool):
            raise ValueError(f"ZeroConfig.stage must be 1, 2 or 3, got {self.stage!r}")
        if not isinstance(self.offload_optimizer, bool):
            raise TypeError(f"ZeroConfig.offload_optimizer must be a bool, got {self.offload_optimizer!r}")
        if not (isinstance(self.reduce_bucket_mb, (int, float)) and self.reduce_bucket_mb > 0):
            raise ValueError(f"ZeroConfig.reduce_bucket_mb must be > 0, got {self.reduce_bucket_mb!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"ZeroConfig.prefetch must be an int >= 0, got {self.prefetch!r}")
        if (isinstance(self.param_persistence_threshold, bool) or not isinstance(self.param_persistence_threshold, int)
                or self.param_persistence_threshold < 0):
            raise ValueError(f"ZeroConfig.param_persistence_threshold must be an int >= 0, got "
                             f"{self.param_persistence_threshold!r}")
        if self.reduce_dtype is not None and not (isinstance(self.reduce_dtype, torch.dtype)
                                                  and self.reduce_dtype.is_floating_point):
            raise ValueError(f"ZeroConfig.reduce_dtype must be a floating-point torch.dtype or None, got "
                             f"{self.reduce_dtype!r}")
        if self.comm not in ("ring", "torch"):
            raise ValueError(f"ZeroConfig.comm must be 'ring' or 'torch', got {self.comm!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"ZeroConfig.timeout_s must be > 0, got {self.timeout_s!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class ZeroMemory:
    """Per-rank bytes of model states (what `ZeroModel.memory()` measures and `estimate_memory` predicts)."""

    parameters: int
    """Model parameters at rest (16-bit or fp32, trainable and frozen; stage 3: this rank's shards)."""
    gradients: int
    """Gradients at rest between steps (stage 1: the whole gradient buffer; 2 and 3: this rank's shards)."""
    optimizer_states: int
    """fp32 masters (16-bit parameters only) and moments of this rank's shard."""
    gathered: int
    """Stage 3: the largest transient set of gathered units (the running one and the prefetched ones)."""
    communicated: int
    """Bytes this rank sends per optimizer step (reduce-scatter of gradients, all-gathers of parameters)."""
    host_optimizer_states: int = 0
    """Offload: host bytes of masters, moments, the fp32 gradient shard and the 16-bit copy buffer (the
    optimizer_states on the device are then 0)."""

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states


# A rank that skips a step (or calls the engine in another order) would otherwise pair its collectives
# with different ones of its peers and go on with wrong data: one collective per step (the first
# bucket's reduce-scatter, the first bucket's all-gather; in stage 3 the root unit's all-gathers) also
# exchanges its signature (collectives' check=True, one small message per peer), so every rank raises
# a ValueError naming the two calls instead. Checking every bucket would add a message per bucket.


class _ShardReducer:
    """The GradBuffer's reducer: each bucket reduce-scattered (averaged) into the rank's gradient shard.
    Stage 2 reduces into a separate shard and frees the bucket's storage when its collective is done."""

    def __init__(self, engine: ZeroModel):
        self.engine = engine

    def launch(self, bucket: buffers.Bucket) -> collectives.Handle:
        e = self.engine
        out = e._grad_shards[bucket.spec.index] if e.config.stage >= 2 else None
        # The first bucket's collective checks that every rank is at the same call (see the comment above).
        handle = collectives.reduce_scatter(bucket.data, out, e.group, op="avg",
                                            accumulate_dtype=e.config.reduce_dtype, backend=e.config.comm,
                                            async_op=True, check=bucket.spec.index == 0, timeout=e.config.timeout_s)
        if e._optimizer is not None:
            shard = out if out is not None else bucket.data[e.rank * e.shard_numel[bucket.spec.index]:
                                                            (e.rank + 1) * e.shard_numel[bucket.spec.index]]
            e._optimizer.stream_down(bucket.spec.index, shard, handle)
        if e.config.stage >= 2 and not bucket.data.is_cuda:
            handle.add_done_callback(lambda ok, data=bucket.data: ok and _free(data))
        return handle

    def finish(self, bucket: buffers.Bucket) -> None:
        if self.engine.config.stage >= 2:
            _free(bucket.data)


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _allocated(t: torch.Tensor) -> bool:
    return t.untyped_storage().size() > 0


def _realloc(t: torch.Tensor) -> None:
    """Gives a freed flat tensor its storage back, zeroed (its views see the new memory)."""
    if not _allocated(t):
        t.untyped_storage().resize_(t.numel() * t.element_size())
        t.zero_()


class ZeroModel(nn.Module):
    """`module` with its trainable parameters laid out in flat buckets whose optimizer states (and, in
    stage 2, gradients) are partitioned across `group`. Call it like the module; build nothing else
    over its parameters: `apply_zero` returns the optimizer that steps them."""

    def __init__(self, module: nn.Module, config: ZeroConfig, group=None):
        super().__init__()
        if config.stage == 3:
            raise ValueError("ZeroModel runs stages 1 and 2; apply_zero builds a Zero3Model for stage 3")
        self.module, self.config = module, config
        self.group = groups.resolve(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("apply_zero: the model has no trainable parameters (requires_grad=True)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        bucket_bytes = int(config.reduce_bucket_mb * 2**20)
        layout = buffers.FlatLayout(self.params, bucket_bytes=bucket_bytes, pad_to=self.world)
        self._check_ranks(named, layout)
        buffers.check_devices(self.params, "apply_zero")
        self._broadcast_state()
        self.buffer = buffers.GradBuffer(self.params, _ShardReducer(self), bucket_bytes=bucket_bytes,
                                         pad_to=self.world, names=self.names, what="ZeRO")
        self.layout = self.buffer.layout
        self.device = self.buffer.device
        # Flat parameter buffers with the gradient buckets' offsets; each parameter a view into its own.
        self.flat_params: list[torch.Tensor] = []
        with torch.no_grad():
            for spec in self.layout.buckets:
                flat = torch.zeros(spec.padded_numel, dtype=spec.dtype, device=self.device)
                for i, off in zip(spec.params, spec.offsets):
                    p = self.layout.params[i]
                    flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = flat[off:off + p.numel()].view_as(p)
                self.flat_params.append(flat)
        self._versions = [p._version for p in self.params]
        self._data_ptrs = [p.data_ptr() for p in self.params]
        k = [spec.padded_numel // self.world for spec in self.layout.buckets]
        self.shard_numel = k
        self._grad_shards = ([torch.zeros(n, dtype=s.dtype, device=self.device) for n, s in zip(k, self.layout.buckets)]
                             if config.stage >= 2 else [b.shard(self.rank, self.world) for b in self.buffer.buckets])
        self._gathers: list[collectives.Handle] = []

    # --- construction ---------------------------------------------------------------------------------

    def _check_ranks(self, named, layout: buffers.FlatLayout) -> None:
        cfg = self.config
        collectives.agree(
            self.group, "apply_zero: ranks differ", timeout=cfg.timeout_s,
            trainable_parameters=len(named), names=[n for n, _ in named], shapes=[tuple(p.shape) for _, p in named],
            dtypes=[str(p.dtype) for _, p in named], devices=[p.device.type for _, p in named],
            config={f.name: str(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)},
            bucket_plan=layout.signature())

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        for t in [*self.module.parameters(), *self.module.buffers()]:
            collectives.broadcast_(t.data, 0, self.group, backend="torch" if t.is_cuda else "ring", check=False,
                                   timeout=self.config.timeout_s)

    # --- use ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        self.wait_for_parameters()
        if self.config.stage >= 2:
            for b in self.buffer.buckets:
                _realloc(b.data)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (in the full gradient buckets) without communicating; the next
        synced backward reduces the sum once."""
        old, self.buffer.sync = self.buffer.sync, False
        try:
            yield
        finally:
            self.buffer.sync = old

    def wait_for_parameters(self) -> None:
        """Waits for the all-gathers of the last step (forward calls it)."""
        handles, self._gathers = self._gathers, []
        for h in handles:
            h.wait()

    def check_parameters(self) -> None:
        """Raises if a parameter was replaced or moved since apply_zero (its updates would be lost)."""
        for name, p, ptr in zip(self.names, self.params, self._data_ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"ZeRO: parameter {name} was replaced or moved after apply_zero (its storage is no "
                                   f"longer the flat parameter buffer, so the optimizer would not update it); "
                                   f"change parameters before apply_zero, or update them through the optimizer")

    def gradient_shards(self) -> list[torch.Tensor]:
        """This rank's reduced (averaged) gradient shard of every bucket, in bucket order."""
        return self._grad_shards

    def parameter_shards(self) -> list[torch.Tensor]:
        """This rank's slice of every flat parameter buffer (the optimizer writes them)."""
        return [flat[self.rank * k:(self.rank + 1) * k] for flat, k in zip(self.flat_params, self.shard_numel)]

    def gather_parameters_async(self) -> None:
        """All-gathers every bucket's parameter buffer in place; the next forward waits for it."""
        cfg = self.config
        self._gathers = [collectives.all_gather(flat[self.rank * k:(self.rank + 1) * k], flat, self.group,
                                                backend=cfg.comm, async_op=True, check=i == 0, timeout=cfg.timeout_s)
                         for i, (flat, k) in enumerate(zip(self.flat_params, self.shard_numel))]

    def checkpoint_flats(self) -> list[dict]:
        """Each bucket as llmkern.parallel.checkpoint reads it: its parameters' names, shapes and offsets,
        the shard length k and this rank's parameter shard."""
        name_of = {id(p): n for n, p in zip(self.names, self.params)}
        out = []
        for spec, shard, k in zip(self.layout.buckets, self.parameter_shards(), self.shard_numel):
            params = [self.layout.params[i] for i in spec.params]
            out.append({"names": [name_of[id(p)] for p in params], "shapes": [tuple(p.shape) for p in params],
                        "offsets": list(spec.offsets), "k": k, "shard": shard, "trainable": True, "params": params})
        return out

    def after_load(self) -> None:
        """A checkpoint wrote this rank's shards: every rank's are all-gathered."""
        self.gather_parameters_async()
        self.wait_for_parameters()

    def zero_grad(self) -> None:
        """Zeroes the gradient buffers and shards (they are accumulated into, as torch's .grad)."""
        for b in self.buffer.buckets:
            if _allocated(b.data):
                b.data.zero_()
        if self.config.stage >= 2:
            for g in self._grad_shards:
                g.zero_()

    @contextlib.contextmanager
    def gather_parameters(self):
        """Whole parameters for code that reads them (stages 1 and 2 keep them whole: waits for the last
        step's all-gather)."""
        self.wait_for_parameters()
        yield

    def memory(self) -> ZeroMemory:
        """Per-rank bytes of parameters, gradients and optimizer states as allocated now (see ZeroMemory)."""
        params = sum(f.numel() * f.element_size() for f in self.flat_params)
        params += sum(p.numel() * p.element_size() for p in self.module.parameters() if not p.requires_grad)
        if self.config.stage == 1:
            grads = sum(b.data.numel() * b.data.element_size() for b in self.buffer.buckets)
        else:
            grads = sum(g.numel() * g.element_size() for g in self._grad_shards)
        opt = self._optimizer.state_bytes() if self._optimizer is not None else 0
        host = 0
        if self.config.offload_optimizer and self._optimizer is not None:
            host = opt + sum(t.numel() * t.element_size() for t in self._optimizer._host_grads + self._optimizer._copies)
            opt = 0
        sent = sum(2 * (self.world - 1) * k * f.element_size() for f, k in zip(self.flat_params, self.shard_numel))
        return ZeroMemory(parameters=params, gradients=grads, optimizer_states=opt, gathered=0, communicated=sent,
                          host_optimizer_states=host)

    _optimizer: ZeroOptimizer | None = None

    def close(self) -> None:
        """Removes the gradient hooks (parameters and gradients stay where they are)."""
        self.wait_for_parameters()
        self.buffer.close()


class ZeroOptimizer(torch.optim.Optimizer):
    """Steps the shards of a ZeroModel: param_groups[0]["params"] are the fp32 masters of this rank's
    bucket shards (schedulers and `lr` work as with any torch optimizer). Implements
    llmkern.optim.ScaledStepOptimizer, so DynamicLossScaler drives it without a host sync."""

    def __init__(self, engine: ZeroModel | Zero3Model, optimizer_class=FusedAdamW, param_groups=None,
                 **optimizer_kwargs):
        offload = engine.config.offload_optimizer
        if offload:
            from llmkern.optim import CPUAdam
            if optimizer_class not in (FusedAdamW, CPUAdam):
                raise ValueError(f"ZeroConfig(offload_optimizer=True) steps with llmkern.optim.CPUAdam; got "
                                 f"optimizer_class={optimizer_class.__name__}")
            optimizer_class = CPUAdam
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, MixedPrecisionOptimizer)):
            raise TypeError(f"apply_zero: optimizer_class must be one of llmkern.optim's fused optimizers (FusedAdamW, "
                            f"FusedAdam, FusedSGD, CPUAdam), got {optimizer_class!r}")
        host = torch.device("cpu") if offload else engine.device
        # The class is built once on a probe parameter: it checks the keyword arguments as it would
        # for the model and hands over its update rule, defaults and rounding seed.
        probe = optimizer_class([nn.Parameter(torch.zeros(1, device=host))], **optimizer_kwargs)
        self.engine, self.offload, self.host = engine, offload, host
        self.fused_update = probe.fused_update
        self.state_dtype = probe.state_dtype
        self.rounding_seed = probe.rounding_seed
        self.optimizer_class = optimizer_class
        self.last_step_skipped: torch.Tensor | None = None
        self._pending_clip: tuple[torch.Tensor, float] | None = None
        self._pieces: list | None = None
        shards = engine.parameter_shards()
        self._copies: list[torch.Tensor] = []
        masters = []
        for shard in shards:
            if offload:
                m = shard.detach().to(host, torch.float32, copy=True)
                if shard.dtype in _HALF:
                    self._copies.append(torch.empty(shard.numel(), dtype=shard.dtype,
                                                    pin_memory=torch.cuda.is_available()))
            elif shard.dtype in _HALF:
                m = shard.detach().float().clone()
                self._copies.append(shard)
            else:
                m = shard  # an fp32 shard is its own master
            masters.append(m)
        if self._copies and len(self._copies) != len(masters):
            raise ValueError(f"apply_zero: the trainable parameters mix 16-bit and fp32 dtypes "
                             f"({sorted({str(s.dtype) for s in shards})}); give them one dtype")
        self._host_grads = [torch.zeros(m.numel(), dtype=torch.float32, device=host) for m in masters] if offload else []
        # Offload: each shard's host gradient copy, as the reduce-scatter that fills it finishes during
        # backward (threading.Event set when copied; None: not streamed since the last step)
        self._down: list[threading.Event | None] = [None] * len(self._host_grads)
        self.streamed_down = 0  # gradient shards copied to the host during backward (tests, the bench)
        self._masters = masters
        # each param group's parameter names (registration order), as torch's get_state_dict names them
        self.group_names, overrides = _param_groups(engine.module, param_groups, probe.defaults)
        collectives.agree(engine.group, "apply_zero: ranks differ", timeout=engine.config.timeout_s,
                          param_groups=[(names, sorted((k, str(v)) for k, v in o.items()))
                                        for names, o in zip(self.group_names, overrides)])
        # Several groups: group g steps the runs of its parameters' elements in every shard (views, so
        # torch's schedulers and param_groups[g]["lr"] work as usual); one group steps whole shards.
        self._runs = self._group_runs() if len(self.group_names) > 1 else [[(t, 0, m.numel()) for t, m in
                                                                            enumerate(masters)]]
        super().__init__([{**o, "params": list(masters) if len(self._runs) == 1 else
                           [masters[t][lo:lo + n] for t, lo, n in runs]}
                          for o, runs in zip(overrides, self._runs)], dict(probe.defaults))
        self.step_count = torch.zeros(1, dtype=torch.float32, device=host)
        for m in masters:
            st = self.state[m]
            for key in self.fused_update.state_keys:
                st[key] = torch.zeros(m.numel(), dtype=self.state_dtype, device=host)
            st["step"] = self.step_count
        engine._optimizer = self

    @property
    def masters(self) -> list[torch.Tensor]:
        """The fp32 master of every trainable shard (the shard itself for fp32 parameters), in shard order."""
        return self._masters

    def _group_runs(self) -> list[list[tuple[int, int, int]]]:
        """Per param group: (shard index, offset, length) of the runs of its parameters' elements in this
        rank's shards (adjacent parameters of one group merged; padding in none)."""
        from llmkern.parallel.checkpoint import _pieces

        group_of = {n: g for g, names in enumerate(self.group_names) for n in names}
        runs: list[list[tuple[int, int, int]]] = [[] for _ in self.group_names]
        flats = [f for f in self.engine.checkpoint_flats() if f["trainable"]]
        for t, flat in enumerate(flats):
            for i, _, lo, n in _pieces(flat["names"], flat["shapes"], flat["offsets"], flat["k"], self.engine.rank):
                g = runs[group_of[flat["names"][i]]]
                if g and g[-1][0] == t and g[-1][1] + g[-1][2] == lo:
                    g[-1] = (t, g[-1][1], g[-1][2] + n)
                else:
                    g.append((t, lo, n))
        return runs

    def state_bytes(self) -> int:
        """Bytes of fp32 masters (separate ones only) and moments this rank holds."""
        total = 0
        for m, shard in zip(self.masters, self.engine.parameter_shards()):
            if m.data_ptr() != shard.data_ptr():
                total += m.numel() * m.element_size()
            total += sum(self.state[m][k].numel() * self.state[m][k].element_size()
                         for k in self.fused_update.state_keys)
        return total

    def stream_down(self, t: int, shard: torch.Tensor, handle: collectives.Handle) -> None:
        """Offload on the CPU: copies gradient shard t to its host fp32 buffer on the collective thread as soon
        as the reduce-scatter `handle` is done, overlapped with the rest of backward; step() waits for it.
        (A CUDA collective's callback runs at launch, before the data is there: step() copies those.)"""
        if not self.offload or shard.is_cuda:
            return
        done = threading.Event()
        self._down[t] = done

        def down(ok: bool, t=t, shard=shard, done=done) -> None:
            try:
                if ok:
                    self._host_grads[t].copy_(shard)
                    self.streamed_down += 1
            finally:
                done.set()
        handle.add_done_callback(down)

    def _items(self):
        """(gradient shard, the groups it is sharded over) pairs for llmkern.optim.step_scalars."""
        return [(g, (self.engine.group,)) for g in self.engine.gradient_shards()]

    def _timed(self) -> bool:
        """Whether the step scalars reduce over this engine's group alone (then under its timeout, see
        _global_sumsq); a subclass whose _items name more groups (tp x dp) reduces them through
        step_scalars."""
        return type(self)._items is ZeroOptimizer._items

    def _global_sumsq(self) -> torch.Tensor:
        """The sum of squares of every gradient element across the group: the local shards' sum, then one
        all-reduce under the group's timeout that also exchanges its signature, so a rank that skipped
        a step (and is at its next backward's reduce-scatter) makes every rank raise a ValueError naming
        both calls instead of pairing this all-reduce with another collective or waiting forever."""
        e = self.engine
        if not self._timed():
            return global_sumsq(self._items(), device=e.device, backend=self.fused_update.backend)
        sumsq = global_sumsq([(g, ()) for g, _ in self._items()], device=e.device, backend=self.fused_update.backend)
        return collectives.all_reduce_(sumsq, e.group, op="sum", backend="torch" if sumsq.is_cuda else "ring",
                                       check=True, timeout=e.config.timeout_s)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, *, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """The global 2-norm of the gradients (each element once across ranks) divided by grad_scale; the
        clip max_norm / (norm + 1e-6), when below 1, applies inside the next step()."""
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        sumsq = self._global_sumsq()
        self._pending_clip = (sumsq, float(max_norm))
        return grad_norm(sumsq, grad_scale)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | float | None = None, overflow_groups=()):
        """Unscale, overflow check (all-reduced: every rank skips together), clip, the update of the
        masters and moments and the 16-bit copy, in one fused launch over every shard; then the
        parameters' all-gather. Whether it was skipped is `last_step_skipped`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        e = self.engine
        e.check_parameters()
        pending, self._pending_clip = self._pending_clip, None
        grads = e.gradient_shards()
        # The overflow flag is read from the global sum of squares (inf/nan on any rank makes it inf on
        # every rank), reduced by _global_sumsq under the timeout: step_scalars gets the shards as local
        # items and reduces the flag only over the caller's other groups (a loss scaler's) besides ours.
        if self._timed():
            sumsq = pending[0] if pending else (self._global_sumsq() if grad_scale is not None else None)
            mine = set(dist.get_process_group_ranks(e.group))
            others = [g for g in overflow_groups
                      if set(dist.get_process_group_ranks(g if g is not None else dist.group.WORLD)) != mine]
            scalars = step_scalars([(g, ()) for g, _ in self._items()], grad_scale=grad_scale,
                                   max_norm=pending[1] if pending else None, sumsq=sumsq, overflow_groups=others,
                                   device=e.device, backend=self.fused_update.backend)
        else:
            scalars = step_scalars(self._items(), grad_scale=grad_scale, max_norm=pending[1] if pending else None,
                                   sumsq=pending[0] if pending else None, overflow_groups=overflow_groups,
                                   device=e.device, backend=self.fused_update.backend)
        device_scalars = scalars
        if self.offload:
            for t, (h, g) in enumerate(zip(self._host_grads, grads)):
                done, self._down[t] = self._down[t], None
                if done is None:
                    h.copy_(g, non_blocking=True)
                elif not done.wait(e.config.timeout_s + 60.0):
                    raise RuntimeError(f"ZeRO offload: gradient shard {t} was not copied to the host within "
                                       f"{e.config.timeout_s + 60.0:g} s of its reduce-scatter")
            grads = self._host_grads
            scalars = dataclasses.replace(scalars, found_inf=scalars.found_inf.to(self.host),
                                          grad_coef=scalars.grad_coef.to(self.host))
        advance_step_(self.step_count, scalars)
        keys = self.fused_update.state_keys
        masters = self.masters
        if getattr(self.fused_update, "state_rounding", "nearest") == "stochastic":
            # Stochastic rounding draws bits keyed by each element's index in the unsharded launch of its
            # group (the group's parameters concatenated in registration order): one launch per contiguous
            # piece of a parameter in a shard, with element_offset = that piece's unsharded index.
            for t, pieces in enumerate(self._unsharded_pieces()):
                for lo, n, index, g in pieces:
                    def cut(x, lo=lo, n=n):
                        return x[lo:lo + n]
                    m = masters[t]
                    self.fused_update(self.param_groups[g], [cut(m)], [cut(grads[t])],
                                      [[cut(self.state[m][k])] for k in keys],
                                      [cut(self._copies[t])] if self._copies else [], self.step_count, scalars,
                                      rounding_seed=launch_seed(self.rounding_seed, g, bool(self._copies)),
                                      element_offset=index)
        else:
            for g, (group, runs) in enumerate(zip(self.param_groups, self._runs)):
                if not runs:
                    continue

                def cut(x, runs=runs):
                    return [x[t][lo:lo + n] for t, lo, n in runs]
                self.fused_update(group, cut(masters), cut(grads),
                                  [cut([self.state[m][k] for m in masters]) for k in keys],
                                  cut(self._copies) if self._copies else [], self.step_count, scalars,
                                  rounding_seed=launch_seed(self.rounding_seed, g, bool(self._copies)))
        if self.offload:
            targets = e.parameter_shards()
            sources = self._copies if self._copies else masters
            for t, s in zip(targets, sources):
                t.copy_(s, non_blocking=True)
        e.gather_parameters_async()
        self.last_step_skipped = device_scalars.found_inf.bool().reshape(())
        return loss

    def _unsharded_pieces(self) -> list[list[tuple[int, int, int, int]]]:
        """Per trainable shard: (offset in the shard, length, index in the unsharded concatenation of its
        param group's parameters in registration order, the group) of every piece of a parameter it holds."""
        if self._pieces is None:
            from llmkern.parallel.checkpoint import _pieces

            e = self.engine
            base, group_of = {}, {}
            for g, names in enumerate(self.group_names):
                n = 0
                for name in names:
                    base[name], group_of[name] = n, g
                    n += math.prod(_shape_of(e, name))
            self._pieces = []
            for flat in e.checkpoint_flats():
                if flat["trainable"]:
                    got = _pieces(flat["names"], flat["shapes"], flat["offsets"], flat["k"], e.rank)
                    self._pieces.append([(slo, n, base[flat["names"][i]] + plo, group_of[flat["names"][i]])
                                         for i, plo, slo, n in got])
        return self._pieces

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradient buckets and shards (the gradients are views into them: set_to_none is
        ignored)."""
        self.engine.zero_grad()

    def state_dict(self):
        raise NotImplementedError("ZeroOptimizer state is saved with llmkern.parallel.save_checkpoint (keyed by "
                                  "parameter names, reshardable)")


def _shape_of(engine, name: str) -> tuple[int, ...]:
    """The shape of parameter `name` as the engine laid it out (stage 3 parameters have 0 elements at rest)."""
    for flat in engine.checkpoint_flats():
        if name in flat["names"]:
            return flat["shapes"][flat["names"].index(name)]
    raise KeyError(name)


def apply_zero(model: nn.Module, config: ZeroConfig | None = None, optimizer_class=FusedAdamW, mesh=None,
               param_groups=None, **optimizer_kwargs) -> tuple[ZeroModel, ZeroOptimizer]:
    """Partitions `model`'s training state across the data-parallel group (`mesh`: a ProcessGroup, a 1-D
    DeviceMesh, a mesh axis name such as "dp", or None for the default group) as `config` says; returns
    (model, optimizer) as deepspeed.initialize does. optimizer_kwargs go to `optimizer_class` (lr,
    betas, weight_decay, state_dtype, ...). param_groups, as torch optimizers take them, e.g.
    [{"params": weights}, {"params": norms_and_biases, "weight_decay": 0.0}]: every trainable parameter
    in exactly one group, each group's keys overriding optimizer_kwargs (None: one group). A collective
    call: every rank of the group must make it."""
    config = config if config is not None else ZeroConfig()
    if not isinstance(config, ZeroConfig):
        raise TypeError(f"apply_zero: config must be a ZeroConfig, got {type(config).__name__}")
    if param_groups is not None:  # checked before anything is built
        cls = optimizer_class
        if config.offload_optimizer:
            from llmkern.optim import CPUAdam
            cls = CPUAdam if optimizer_class in (FusedAdamW, CPUAdam) else optimizer_class
        keys = (cls([nn.Parameter(torch.zeros(1))], **optimizer_kwargs).defaults
                if isinstance(cls, type) and issubclass(cls, MixedPrecisionOptimizer) else None)
        _param_groups(model, param_groups, keys)
    engine = Zero3Model(model, config, mesh) if config.stage == 3 else ZeroModel(model, config, mesh)
    return engine, ZeroOptimizer(engine, optimizer_class, param_groups, **optimizer_kwargs)


def _param_groups(model: nn.Module, param_groups, defaults) -> tuple[list[list[str]], list[dict]]:
    """(parameter names of each group in registration order, each group's hyperparameter overrides) of
    torch-style `param_groups` over `model`'s trainable parameters; None: one group of all of them.
    `defaults` (the optimizer's), when given, are the keys a group may set."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if param_groups is None:
        return [[n for n, _ in trainable]], [{}]
    if isinstance(param_groups, dict) or not all(isinstance(g, dict) and "params" in g for g in param_groups):
        raise TypeError("apply_zero: param_groups must be a list of dicts, each with a 'params' entry (as torch "
                        "optimizers take them)")
    name_of = {id(p): n for n, p in model.named_parameters()}
    group_of: dict[str, int] = {}
    overrides = []
    for g, group in enumerate(param_groups):
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        for p in params:
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(f"apply_zero: param_groups[{g}] holds a tensor of shape {tuple(p.shape)} that is "
                                 f"not a parameter of the model")
            if not p.requires_grad:
                raise ValueError(f"apply_zero: param_groups[{g}] holds {name}, which is frozen (requires_grad=False)")
            if name in group_of:
                raise ValueError(f"apply_zero: {name} is in param_groups[{group_of[name]}] and param_groups[{g}]")
            group_of[name] = g
        extra = {k: v for k, v in group.items() if k != "params"}
        unknown = sorted(set(extra) - set(defaults)) if defaults is not None else []
        if unknown:
            raise ValueError(f"apply_zero: param_groups[{g}] sets {unknown}, which the optimizer does not take "
                             f"(it takes {sorted(defaults)})")
        overrides.append(extra)
    left = [n for n, _ in trainable if n not in group_of]
    if left:
        raise ValueError(f"apply_zero: trainable parameters {left[:5]}{' ...' if len(left) > 5 else ''} are in no "
                         f"param group (every trainable parameter must be in exactly one)")
    return [[n for n, _ in trainable if group_of[n] == g] for g in range(len(param_groups))], overrides


# --- stage 3 -------------------------------------------------------------------------------------------


def stage3_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units stage 3 gathers and frees as one: every child of an nn.ModuleList that has parameters (a
    transformer block; nested ModuleLists inside a block stay in it), then the root ("", model) holding
    every other parameter (embeddings, the final norm, the head), gathered for the whole step."""
    units: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(u + ".") for u, _ in units):
            continue
        for i, child in enumerate(m):
            if next(child.parameters(), None) is not None:
                units.append((f"{name}.{i}" if name else str(i), child))
    return units + [("", model)]


def _unit_params(model: nn.Module, units) -> list[list[tuple[str, nn.Parameter]]]:
    """Each unit's own parameters (those of the root are the ones no block holds), by full name."""
    owner: dict[int, int] = {}
    for u, (_, m) in enumerate(units[:-1]):
        for p in m.parameters():
            owner[id(p)] = u
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in units]
    for name, p in model.named_parameters():
        out[owner.get(id(p), len(units) - 1)].append((name, p))
    return out


def _flat_groups(named: list[tuple[str, nn.Parameter]], persistence_threshold: int = 0):
    """A unit's parameters split by (dtype, trainable, persistent: at most `persistence_threshold` elements),
    each group one flat buffer, in registration order."""
    keyed: dict[tuple[torch.dtype, bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for n, p in named:
        keyed.setdefault((p.dtype, p.requires_grad, p.numel() <= persistence_threshold), []).append((n, p))
    return sorted(keyed.items(), key=lambda kv: (not kv[0][1], kv[0][2], str(kv[0][0])))


class _Flat:
    """One unit's parameters of one dtype, trainable or frozen: a full buffer (storage freed at rest), this
    rank's shard of it, and for trainable ones the full gradient (during backward) and its reduced shard."""

    def __init__(self, named, world: int, rank: int, device, persistent: bool = False):
        self.persistent = persistent  # the full buffer stays allocated; `stale` after a step until gathered
        self.stale = False
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.trainable = self.params[0].requires_grad
        self.dtype = self.params[0].dtype
        self.offsets, n = [], 0
        for p in self.params:
            self.offsets.append(n)
            n += p.numel()
        self.numel = n
        self.padded = -(-n // world) * world
        self.k = self.padded // world
        self.rank = rank
        self.full = torch.zeros(self.padded, dtype=self.dtype, device=device)
        self.grad_full = torch.zeros(self.padded if self.trainable else 0, dtype=self.dtype, device=device)
        _free(self.grad_full)
        self.grad_shard = torch.zeros(self.k if self.trainable else 0, dtype=self.dtype, device=device)
        self.slot = {id(p): i for i, p in enumerate(self.params)}
        self.empty = torch.empty(0, dtype=self.dtype, device=device)

    def view(self, t: torch.Tensor, i: int) -> torch.Tensor:
        shape = self.shapes[i]
        return t[self.offsets[i]:self.offsets[i] + shape.numel()].view(shape)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rank * self.k:(self.rank + 1) * self.k]

    def attach(self) -> None:
        """Every parameter a view into the (gathered) full buffer."""
        for i, p in enumerate(self.params):
            p.data = self.view(self.full, i)

    def detach_params(self) -> None:
        """Every parameter a 0-element tensor: code reading a freed weight gets a shape error, not memory
        that was given back (a view of the freed storage would read out of bounds)."""
        for p in self.params:
            p.data = self.empty


class _Unit:
    __slots__ = ("arrived", "flats", "gathered", "index", "module", "name", "pending", "reduced", "trainable")

    def __init__(self, index: int, name: str, module: nn.Module, flats: list[_Flat]):
        self.index, self.name, self.module, self.flats = index, name, module, flats
        self.trainable = sum(len(f.params) for f in flats if f.trainable)
        self.gathered = False
        self.pending: list[collectives.Handle] = []
        self.arrived: set[int] = set()
        self.reduced: list[collectives.Handle] | None = None


class Zero3Model(nn.Module):
    """Stage 3: every parameter (trainable or frozen) partitioned at rest in units (see stage3_units); a
    unit's shards are all-gathered just before its forward and again before its backward (the next
    `prefetch` units in the order of the last forward are gathered ahead), freed after each; each unit's
    gradients are reduce-scattered into this rank's shard as soon as they are all there."""

    def __init__(self, module: nn.Module, config: ZeroConfig, group=None):
        super().__init__()
        self.module, self.config = module, config
        self.group = groups.resolve(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError("apply_zero: the model has no trainable parameters (requires_grad=True)")
        units = stage3_units(module)
        per_unit = _unit_params(module, units)
        named = list(module.named_parameters())
        buffers.check_devices([p for _, p in named], "apply_zero")
        collectives.agree(
            self.group, "apply_zero: ranks differ", timeout=config.timeout_s, names=[n for n, _ in named],
            shapes=[tuple(p.shape) for _, p in named], dtypes=[str(p.dtype) for _, p in named],
            trainable=[p.requires_grad for _, p in named],
            config={f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)},
            units=[u for u, _ in units])
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                collectives.broadcast_(t.data, 0, self.group, backend="torch" if t.is_cuda else "ring", check=False,
                                       timeout=config.timeout_s)
        self.device = named[0][1].device
        self.units: list[_Unit] = []
        with torch.no_grad():
            for u, ((uname, m), params) in enumerate(zip(units, per_unit)):
                flats = []
                for (_, _, persistent), group_named in _flat_groups(params, config.param_persistence_threshold):
                    f = _Flat(group_named, self.world, self.rank, self.device, persistent)
                    for i, p in enumerate(f.params):
                        f.view(f.full, i).copy_(p.detach())
                    f.shard = f.own(f.full).clone()
                    if persistent:
                        f.attach()
                    else:
                        _free(f.full)
                        f.detach_params()
                    flats.append(f)
                self.units.append(_Unit(u, uname, m, flats))
        self._unit_of_module = {id(u.module): u for u in self.units[:-1]}
        self._where = {id(p): (u, f, f.slot[id(p)]) for u in self.units for f in u.flats for p in f.params}
        self._hooks = []
        for u in self.units[:-1]:
            self._hooks.append(u.module.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._hooks.append(u.module.register_forward_hook(self._post_forward))
        for u in self.units:
            for f in u.flats:
                if f.trainable:
                    self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for p in f.params]
        # state_dict() of the module (or of this wrapper) is whole tensors inside gather_parameters() and an
        # error outside it, where parameters have 0 elements. FSDP2's state_dict() hands back sharded DTensors
        # without communicating; llmkern's shards are 1-D pieces of flat buffers, not a tensor's rows, so
        # the sharded form is save_checkpoint's. Gathering inside state_dict() would make it a collective
        # that hangs when one rank calls it alone (the "save on rank 0" habit).
        # (functions, not bound methods: torch marks the hooks it is given with an attribute)
        self._hooks.append(module.register_state_dict_pre_hook(lambda *args: self._before_state_dict(*args)))
        self._hooks.append(module.register_state_dict_post_hook(lambda *args: self._after_state_dict(*args)))
        self._hooks.append(module.register_load_state_dict_pre_hook(lambda *args: self._before_load_state_dict()))
        self.trainable_flats = [f for u in self.units for f in u.flats if f.trainable]
        self._trainable_index = {id(f): t for t, f in enumerate(self.trainable_flats)}
        self.names = [n for f in self.trainable_flats for n in f.names]
        self.sync = True
        self._order: list[int] = []          # unit indices in the order of the last forward
        self._recording: list[int] = []
        self._backward_queued = False
        self.gathers = 0                      # all-gathers issued (one per flat), for tests and the bench
        self._optimizer = None

    # --- state_dict -----------------------------------------------------------------------------------

    def _before_state_dict(self, module, prefix, keep_vars) -> None:
        sharded = [u.name or "<root>" for u in self.units
                   if (not u.gathered and any(not f.persistent for f in u.flats)) or any(f.stale for f in u.flats)]
        if sharded:
            raise RuntimeError(f"ZeRO-3: state_dict() outside gather_parameters(): units {sharded} hold only this "
                               f"rank's shards (their parameters have 0 elements at rest). On every rank, "
                               f"`with model.gather_parameters(): sd = model.state_dict()` gives whole tensors "
                               f"(copies); llmkern.parallel.save_checkpoint writes the sharded state")

    def _before_load_state_dict(self) -> None:
        raise RuntimeError("ZeRO-3: load_state_dict() would write the whole copies gather_parameters() frees on "
                           "exit, not the shards (and fp32 masters) the optimizer steps; load the weights before "
                           "apply_zero, or a checkpoint with llmkern.parallel.load_checkpoint")

    def _after_state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        for key, value in state_dict.items():  # copies: the gathered buffers are freed on leaving the context
            if key.startswith(prefix) and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                state_dict[key] = value.clone()

    # --- gathering -----------------------------------------------------------------------------------

    def _gather(self, unit: _Unit, wait: bool = True) -> None:
        if not unit.gathered:
            cfg = self.config
            for f in unit.flats:
                if f.persistent:
                    if not f.stale:
                        continue
                    f.stale = False
                else:
                    f.full.untyped_storage().resize_(f.padded * f.full.element_size())
                    f.attach()
                unit.pending.append(collectives.all_gather(f.shard, f.full, self.group, backend=cfg.comm,
                                                           async_op=True, check=unit is self.units[-1],
                                                           timeout=cfg.timeout_s))
                self.gathers += 1
            unit.gathered = True
        if wait:
            handles, unit.pending = unit.pending, []
            for h in handles:
                h.wait()

    def _release(self, unit: _Unit) -> None:
        if unit.gathered:
            self._gather(unit, wait=True)  # an all-gather still writing must finish first
            for f in unit.flats:
                if not f.persistent:
                    f.detach_params()
                    _free(f.full)
            unit.gathered = False

    def _prefetch_after(self, unit: _Unit, backward: bool) -> None:
        if not self.config.prefetch or unit.index not in self._order:
            return
        at = self._order.index(unit.index)
        ahead = self._order[max(0, at - self.config.prefetch):at][::-1] if backward else \
            self._order[at + 1:at + 1 + self.config.prefetch]
        for j in ahead:
            self._gather(self.units[j], wait=False)

    def _pre_forward(self, module, args, kwargs):
        unit = self._unit_of_module[id(module)]
        self._recording.append(unit.index)
        self._gather(unit)
        self._prefetch_after(unit, backward=False)
        if torch.is_grad_enabled():
            inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.requires_grad]
            if inputs:  # the unit's backward is over once its inputs have their gradients
                torch.autograd.graph.register_multi_grad_hook(inputs, lambda grads, unit=unit: self._release(unit))

    def _post_forward(self, module, args, output):
        unit = self._unit_of_module[id(module)]
        if torch.is_grad_enabled():
            tensors = [t for t in torch.utils._pytree.tree_leaves(output)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            fired = []

            def pre_backward(grad, unit=unit, fired=fired):
                if not fired:
                    fired.append(True)
                    self._queue_end_of_backward()
                    self._gather(unit)
                    self._prefetch_after(unit, backward=True)
                return grad

            for t in tensors:
                t.register_hook(pre_backward)
        if self.config.reshard_after_forward:
            self._release(unit)
        return output

    # --- gradients -----------------------------------------------------------------------------------

    def _on_grad(self, p: torch.Tensor) -> None:
        unit, f, i = self._where[id(p)]
        self._queue_end_of_backward()
        if not _allocated(f.grad_full):
            _realloc(f.grad_full)
        f.view(f.grad_full, i).add_(p.grad)
        p.grad = None
        if not self.sync:
            return
        if id(p) in unit.arrived:
            raise RuntimeError(f"ZeRO-3: parameter {f.names[i]} received a gradient twice in one backward")
        unit.arrived.add(id(p))
        if len(unit.arrived) == unit.trainable:
            self._reduce(unit)

    def _reduce(self, unit: _Unit) -> None:
        cfg = self.config
        unit.reduced = []
        for f in unit.flats:
            if f.trainable:
                _realloc(f.grad_full)
                h = collectives.reduce_scatter(f.grad_full, f.grad_shard, self.group, op="avg",
                                               accumulate_dtype=cfg.reduce_dtype, backend=cfg.comm, async_op=True,
                                               check=False, timeout=cfg.timeout_s)
                if self._optimizer is not None:
                    self._optimizer.stream_down(self._trainable_index[id(f)], f.grad_shard, h)
                unit.reduced.append(h)

    def _queue_end_of_backward(self) -> None:
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._backward_queued = False
        error = None
        if self.sync:
            for u in self.units:  # parameters that got no gradient count as zero (every rank reduces)
                if u.trainable and u.reduced is None:
                    self._reduce(u)
        for u in self.units:
            for h in u.reduced or []:
                try:
                    h.wait()
                except BaseException as e:  # noqa: BLE001 - re-raised after every handle was waited for
                    error = error or e
            if self.sync:
                u.reduced = None
                u.arrived.clear()
                for f in u.flats:
                    if f.trainable:
                        _free(f.grad_full)
            self._release(u)
        if error is not None:
            raise error

    # --- the engine interface the optimizer uses ----------------------------------------------------

    def forward(self, *args, **kwargs):
        self._recording = []
        self._gather(self.units[-1])
        try:
            out = self.module(*args, **kwargs)
        except (RuntimeError, IndexError) as e:  # what shape checks raise on a 0-element weight
            if any(not u.gathered for u in self.units):
                raise type(e)(f"ZeRO-3: forward failed while units {[u.name for u in self.units if not u.gathered]} "
                                   f"were not gathered (their parameters have 0 elements): a module that reads "
                                   f"another unit's weight must do it inside model.gather_parameters(). The "
                                   f"error: {e}") from e
            raise
        self._order = self._recording
        if not torch.is_grad_enabled():
            self._release(self.units[-1])
        return out

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate full gradients locally without communicating; the next synced backward reduces once."""
        old, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = old

    @contextlib.contextmanager
    def gather_parameters(self):
        """Every unit gathered (whole weights to read or save), freed on exit."""
        for u in self.units:
            self._gather(u)
        try:
            yield
        finally:
            for u in self.units:
                self._release(u)

    def wait_for_parameters(self) -> None:
        pass

    def check_parameters(self) -> None:
        for f in self.trainable_flats:
            for n, p in zip(f.names, f.params):
                ours = f.empty if p.numel() == 0 else f.full
                if p.untyped_storage().data_ptr() != ours.untyped_storage().data_ptr():
                    raise RuntimeError(f"ZeRO: parameter {n} was replaced or moved after apply_zero (its storage is "
                                       f"no longer the unit's flat buffer, so the optimizer would not update it); "
                                       f"change parameters before apply_zero")

    def parameter_shards(self) -> list[torch.Tensor]:
        return [f.shard for f in self.trainable_flats]

    def gradient_shards(self) -> list[torch.Tensor]:
        return [f.grad_shard for f in self.trainable_flats]

    def gather_parameters_async(self) -> None:
        """After a step: the persistent flats' shards changed; their units gather them when next used."""
        for u in self.units:
            for f in u.flats:
                f.stale |= f.persistent and f.trainable

    def checkpoint_flats(self) -> list[dict]:
        """Each unit's flats as llmkern.parallel.checkpoint reads them (see ZeroModel.checkpoint_flats)."""
        return [{"names": f.names, "shapes": [tuple(sh) for sh in f.shapes], "offsets": f.offsets, "k": f.k,
                 "shard": f.shard, "trainable": f.trainable, "params": f.params}
                for u in self.units for f in u.flats]

    def after_load(self) -> None:
        """A checkpoint wrote this rank's shards; units gathered before it are stale and released."""
        for u in self.units:
            self._release(u)
            for f in u.flats:
                f.stale |= f.persistent

    def zero_grad(self) -> None:
        for f in self.trainable_flats:
            f.grad_shard.zero_()
            if _allocated(f.grad_full):
                f.grad_full.zero_()

    def memory(self) -> ZeroMemory:
        flats = [f for u in self.units for f in u.flats]
        params = sum((f.padded if f.persistent else f.k) * f.shard.element_size() for f in flats)
        grads = sum(f.k * f.shard.element_size() for f in self.trainable_flats)
        opt = self._optimizer.state_bytes() if self._optimizer is not None else 0
        host = 0
        if self.config.offload_optimizer and self._optimizer is not None:
            host = opt + sum(t.numel() * t.element_size() for t in self._optimizer._host_grads + self._optimizer._copies)
            opt = 0
        full = [sum(f.padded * f.full.element_size() for f in u.flats if not f.persistent) for u in self.units]
        gathered = full[-1] + sum(sorted(full[:-1], reverse=True)[:1 + self.config.prefetch])
        sent = 0
        for u in self.units:
            times = 1 if (u is self.units[-1] or not self.config.reshard_after_forward) else 2
            for f in u.flats:
                e = f.shard.element_size()
                gathers = (1 if f.trainable else 0) if f.persistent else times  # persistent: once after a step
                sent += (self.world - 1) * f.k * e * (gathers + (1 if f.trainable else 0))
        return ZeroMemory(parameters=params, gradients=grads, optimizer_states=opt, gathered=gathered,
                          communicated=sent, host_optimizer_states=host)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
