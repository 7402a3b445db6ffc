"""The pipeline runtime: `apply_pipeline` cuts a model into stages, `Pipeline.train_step` runs one
schedule (`llmkern.parallel.pipeline.schedules`) over the micro-batches of a batch.

Every rank of the pipeline group calls `train_step(inputs, labels)` with the same batch (only the
first stage reads `inputs`, only the last reads `labels`; the others may pass None). The batch is
cut into `microbatches` slices along dim 0 (`torch.tensor_split`: sizes differ by at most one).
Each rank executes its own list of actions; activations and gradients go between ranks with
asynchronous point-to-point sends and receives (gloo on CPU, NCCL on GPU), posted ahead so that
transfers overlap compute. Gradients accumulate in `.grad` across micro-batches, the loss of each
micro-batch weighted so that the sum is the loss of the whole batch; the step returns that loss on
every rank. The optimizer steps afterwards as usual, over `pipe.parameters()` (this rank's stages).

Shapes are agreed once per step before any activation of that step moves: the first stage
describes its input in a small header, each stage derives its output shape (running itself once on
zeros when the shapes differ from the last step's) and passes a header on. A stage that receives a
tensor it cannot take (its layers reject the shape, labels that do not match the batch) fails the
pipeline group with its message (`llmkern.parallel.groups.fail`): every rank raises a
`PipelineError` carrying it, before any rank has blocked on a receive whose size it got wrong.
Every wait on a peer has a timeout (`PipelineConfig.timeout_s`): a dead or stalled stage becomes
an error that names the stage, the rank and the tensor waited for. After an error the pipeline
(and, for a failed group, the group) refuses further steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from llmkern.parallel import collectives, groups
from llmkern.parallel import mesh as mesh_lib
from llmkern.parallel.pipeline import partition as part
from llmkern.parallel.pipeline.backward import SplitBackward, run_backward
from llmkern.parallel.pipeline.schedules import Action, Schedule, ScheduleName, make_schedule


@dataclasses.dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How `apply_pipeline` splits a model and which schedule `train_step` runs."""

    stages: int
    """Pipeline ranks p: the size of the pipeline group (the "pp" axis of the mesh)."""
    microbatches: int
    """Micro-batches m per step. More shrink the bubble, (p - 1)/(m + p - 1) of the step for gpipe
    and 1f1b, at the cost of smaller matmuls."""
    schedule: ScheduleName = "1f1b"
    """"gpipe": all forwards then all backwards; holds m micro-batches of activations per stage.
    "1f1b": one forward one backward in the steady state; holds at most p - r on rank r, same
    bubble as gpipe; needs m >= p. "interleaved_1f1b": v stages per rank (`virtual_stages`),
    bubble divided by v, more messages. "zero_bubble": ZB-H1, the backward split into input- and
    weight-gradient passes, the latter filling the bubble; needs m >= p."""
    virtual_stages: int = 1
    """Stages per rank v (>= 2 for interleaved_1f1b, 1 otherwise). Rank r holds stages r, r + p, ..."""
    rematerialize: Literal["none", "full", "layer"] = "none"
    """"full": a stage's forward runs without storing activations and is recomputed in its backward,
    so a micro-batch in flight costs only its stage input. "layer": each layer is checkpointed
    (torch.utils.checkpoint), storing every layer's input and recomputing one layer at a time.
    "none": activations are stored."""
    partition: Literal["uniform", "parameters", "time"] | list[int] = "uniform"
    """How layers are cut into stages: equal counts, balanced parameter counts, balanced measured
    forward+backward time (needs `example_inputs`), or the layer count of every stage."""
    timeout_s: float = 120.0
    """Seconds a rank waits for a peer's message or a pipeline collective before raising an error
    naming the peer."""
    measure_activations: bool = False
    """Count the bytes of activations each stage keeps for backward (autograd's saved tensors and
    the stage inputs the runtime holds), per micro-batch and at peak, in `pipe.stats`. Costs a
    Python call per saved tensor."""
    verbose: bool = True
    """Print the partition (stage, rank, layers, parameters) on global rank 0."""

    def __post_init__(self):
        if self.stages < 1 or self.microbatches < 1 or self.virtual_stages < 1:
            raise ValueError(f"PipelineConfig: stages, microbatches and virtual_stages must be >= 1, got "
                             f"stages={self.stages}, microbatches={self.microbatches}, "
                             f"virtual_stages={self.virtual_stages}")
        if self.rematerialize not in ("none", "full", "layer"):
            raise ValueError(f"PipelineConfig: rematerialize must be 'none', 'full' or 'layer', got "
                             f"{self.rematerialize!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"PipelineConfig: timeout_s must be > 0, got {self.timeout_s}")


class PipelineError(RuntimeError):
    """A pipeline step failed: a stage rejected its input, a peer died or stopped, or ranks diverged."""


@dataclasses.dataclass(slots=True)
class PipelineStats:
    """What the last `train_step` did on this rank."""

    steps: int = 0
    """train_step calls completed."""
    peak_in_flight: dict[int, int] = dataclasses.field(default_factory=dict)
    """Stage -> most micro-batches whose forward state it held at once (F done, backward not)."""
    saved_bytes_per_microbatch: dict[int, int] = dataclasses.field(default_factory=dict)
    """Stage -> largest activation bytes one micro-batch kept for backward (measure_activations)."""
    peak_saved_bytes: dict[int, int] = dataclasses.field(default_factory=dict)
    """Stage -> most activation bytes kept for backward at once (measure_activations)."""
    messages: int = 0
    """Activations and gradients this rank sent in the step."""
    bytes_sent: int = 0
    """Their bytes."""
    seconds: float = 0.0
    """Wall time of the step on this rank."""


class CausalLMLoss:
    """Next-token cross-entropy of a causal LM, summed over the tokens of a micro-batch; the pipeline
    divides by the number of predicted tokens of the whole batch (labels != ignore_index after the
    shift), so the step's loss equals `transformers`' `model(input_ids, labels=labels).loss`."""

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=self.ignore_index, reduction="sum")

    def count(self, labels: torch.Tensor) -> int:
        return int((labels[:, 1:] != self.ignore_index).sum())


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8, torch.int16]
_MAGIC = 0x50495045
_MAX_DIMS = 8
_HEADER = 7 + _MAX_DIMS  # the last field is a flag


class _Meter:
    """Live bytes of the activations one stage keeps for backward: each storage once, parameters
    excluded. Autograd's saved tensors are counted from pack to the release of the graph that holds
    them (a holder object in the graph), the runtime's own held inputs from hold() to release()."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [count, bytes]
        self.live = 0
        self.peak = 0

    def _add(self, t: torch.Tensor) -> int | None:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.exclude or t.device.type == "meta":
            return None
        ref = self.refs.get(ptr)
        if ref is None:
            self.refs[ptr] = [1, s.nbytes()]
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            ref[0] += 1
        return ptr

    def _drop(self, ptr: int | None) -> None:
        ref = self.refs.get(ptr)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]

    def pack(self, t: torch.Tensor):
        # detached: a saved output holds its grad_fn, whose saved variable would hold this holder, a
        # cycle through C++ that Python's collector cannot see (the graph would never be freed)
        return _Saved(t.detach(), self, self._add(t))

    @staticmethod
    def unpack(h):
        return h.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("t", "meter", "ptr")

    def __init__(self, t, meter, ptr):
        self.t, self.meter, self.ptr = t, meter, ptr

    def __del__(self):
        self.meter._drop(self.ptr)


@dataclasses.dataclass(slots=True)
class _Held:
    """What a stage keeps for one micro-batch between its forward and its backward."""

    x: torch.Tensor
    out: torch.Tensor | None
    labels: torch.Tensor | None = None
    rng: tuple | None = None
    split: SplitBackward | None = None
    held_ptr: int | None = None


@dataclasses.dataclass(slots=True)
class _StepPlan:
    rows: list[int]
    in_meta: dict[int, tuple[torch.dtype, tuple]]  # stage -> (dtype, shape without dim 0)
    out_meta: dict[int, tuple[torch.dtype, tuple]]


def _resolve_groups(mesh):
    """(pipeline group, data-parallel group or None) from None (the default group), a ProcessGroup or
    a mesh axis name (the pipeline group), or a DeviceMesh with a "pp" dimension and optionally "dp"
    (llmkern.parallel.init_mesh's ("pp", "dp", "tp") mesh, or any other)."""
    if hasattr(mesh, "get_group") and getattr(mesh, "mesh_dim_names", None) and mesh.ndim > 1:
        names = mesh.mesh_dim_names
        if "pp" not in names:
            raise ValueError(f"apply_pipeline: the mesh needs a 'pp' dimension, it has {names}")
        dp = mesh.get_group("dp") if "dp" in names and mesh.size(names.index("dp")) > 1 else None
        return mesh.get_group("pp"), dp
    return groups.resolve(mesh), None


def _to_meta(module: nn.Module) -> None:
    """Frees `module`'s parameters and buffers by replacing them with meta tensors of the same
    shapes. New objects are assigned, never `.data` of the old ones, so a parameter it shares with
    a stage that stays on this rank (a tied embedding) keeps its storage there."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")


class Pipeline:
    """One rank's share of a pipelined model; made by `apply_pipeline`.

    `stage_modules` maps each of this rank's stages to its module (inside its data-parallel wrapper
    when there is one). `parameters()` / `named_parameters()` give this rank's parameters, named
    as in the original model. `model` is the original model, with the other ranks' layers moved to
    the meta device (their memory freed).
    """

    def __init__(self, model: nn.Module, config: PipelineConfig, *, mesh=None, loss_fn=None,
                 data_parallel=None, example_inputs: torch.Tensor | None = None):
        if not dist.is_initialized():
            raise RuntimeError("apply_pipeline: torch.distributed is not initialized (launch with torchrun and "
                               "call dist.init_process_group first)")
        self.config = config
        self.model = model
        self.group, self.dp_group = _resolve_groups(mesh)
        self.rank = dist.get_rank(self.group)
        self.ranks = dist.get_world_size(self.group)
        if self.ranks != config.stages:
            raise ValueError(f"apply_pipeline: PipelineConfig(stages={config.stages}) but the pipeline group has "
                             f"{self.ranks} ranks (world size {dist.get_world_size()}); stages must equal the "
                             f"group size (the mesh's 'pp' dimension)")
        p, v = self.ranks, config.virtual_stages
        self.num_stages = p * v
        self.schedule: Schedule = make_schedule(config.schedule, p, config.microbatches, v)
        self._actions: tuple[Action, ...] = self.schedule.actions[self.rank]
        self.stages: list[int] = self.schedule.stages_of(self.rank)

        parts = part.model_parts(model)
        self._parts = parts
        if parts.kind == "sequential" and loss_fn is None:
            raise ValueError("apply_pipeline: an nn.Sequential needs loss_fn(output, labels) -> scalar mean loss "
                             "of a micro-batch")
        self.loss_fn = loss_fn if loss_fn is not None else CausalLMLoss()
        if config.rematerialize == "layer" and config.schedule == "zero_bubble":
            raise ValueError("apply_pipeline: rematerialize='layer' with schedule='zero_bubble' is not supported "
                             "(checkpointed layers would be recomputed in both the I and the W pass); use "
                             "rematerialize='full'")
        times = (0.0, None, 0.0)
        if config.partition == "time":
            if example_inputs is None:
                raise ValueError("apply_pipeline: partition='time' needs example_inputs= (one micro-batch of "
                                 "inputs) to time the layers")
            devices = [example_inputs.device] if example_inputs.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # timing runs dropout: keep the RNG of training
                t_pre, t_layers, t_post = part.time_layers(parts, example_inputs)
            # every rank measured; all agree on the mean (replicas must cut the model identically)
            vec = torch.tensor([t_pre, *t_layers, t_post], dtype=torch.float64)
            collectives.all_reduce_(vec, None, op="avg", backend="torch", check=False, timeout=config.timeout_s)
            times = (float(vec[0]), [float(t) for t in vec[1:-1]], float(vec[-1]))
        counts = part.layer_counts(parts, self.num_stages, config.partition, times[1], times[0], times[2])
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
        self.partition: list[tuple[int, int]] = bounds
        # every pipeline rank must cut the same model the same way and run the same schedule
        collectives.agree(self.group, "apply_pipeline: the pipeline ranks differ", timeout=config.timeout_s,
                          config={f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                  if f.name != "verbose"},
                          model=f"{type(model).__name__} ({parts.kind}, {len(parts.layers)} layers)",
                          partition=bounds)
        self._layer_times = times

        names: dict[int, str] = {}
        for n, prm in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(prm), n)
        modules = {s: part.build_stage(parts, *bounds[s], s == 0, s == self.num_stages - 1,
                                       config.rematerialize == "layer") for s in range(self.num_stages)}
        # parameters used by stages on different ranks (tied embeddings): their gradients are summed
        users: dict[int, set[int]] = {}
        for s, m in modules.items():
            for prm in m.parameters():
                users.setdefault(id(prm), set()).add(s % p)
        self._ties: list[tuple[nn.Parameter, list[int]]] = []
        seen = set()
        for s in self.stages:
            for prm in modules[s].parameters():
                rk = users[id(prm)]
                if len(rk) > 1 and id(prm) not in seen:
                    seen.add(id(prm))
                    self._ties.append((prm, sorted(rk)))
        self._ties.sort(key=lambda t: names.get(id(t[0]), ""))
        self._names = {id(prm): names.get(id(prm), f"stage{s}.{n}")
                       for s in self.stages for n, prm in modules[s].named_parameters()}
        self._report = self._format_partition(modules)
        local = {id(m) for s in self.stages for m in modules[s].modules()}
        if p > 1:
            for _, m in parts.pre + parts.layers + parts.post:
                if id(m) not in local:
                    _to_meta(m)
        self._local_modules = {s: modules[s] for s in self.stages}
        self._sync_tied_values()
        self.stage_modules: dict[int, nn.Module] = {}
        for s in self.stages:
            self.stage_modules[s] = self._wrap_data_parallel(modules[s], data_parallel)
        self._final_backward = {}
        for i, a in enumerate(self._actions):
            if a.kind in ("B", "W"):
                self._final_backward[a.stage] = i
        self._params = {s: [q for q in modules[s].parameters() if q.requires_grad] for s in self.stages}
        if p > 1:
            # A global gradient norm (FusedAdamW.clip_grad_norm_) sums every stage's squares over the
            # pipeline group: each parameter lives on one rank. A tied parameter lives on two and is
            # counted on both, so that both compute the same clip coefficient and stay equal.
            for q in self.parameters():
                if q.requires_grad and self.group not in mesh_lib.sharded_over(q):
                    mesh_lib.mark_sharded(q, *mesh_lib.sharded_over(q), self.group)
        self.device = next(self.parameters(), torch.empty(0)).device
        # headers and the loss travel where the group's small messages live (CPU for gloo, the GPU
        # for NCCL, which carries no CPU tensors)
        self._ctl = groups.state(self.group).p2p_device
        self._shape_cache: dict[tuple, tuple] = {}
        self._plans: dict[tuple, _StepPlan] = {}  # step key (stage 0's input dtype, shape, rows) -> shapes
        self._step = 0
        self._broken: str | None = None
        self.stats = PipelineStats()
        if config.verbose and dist.get_rank() == 0:
            print(self._report, flush=True)

    # --- construction helpers -------------------------------------------------------------------------

    def _format_partition(self, modules: dict[int, nn.Module]) -> str:
        parts, S = self._parts, self.num_stages
        t_pre, t_layers, t_post = self._layer_times
        lines = [f"pipeline: {len(parts.layers)} layers in {S} stages on {self.ranks} ranks "
                 f"({self.config.schedule}, m={self.config.microbatches}, partition={self.config.partition})"]
        for s, (a, b) in enumerate(self.partition):
            extra = []
            if s == 0 and parts.pre:
                extra.append("+ " + ", ".join(n.split(".")[-1] for n, _ in parts.pre))
            if s == S - 1 and parts.post:
                extra.append("+ " + ", ".join(n.split(".")[-1] for n, _ in parts.post))
            n = sum(q.numel() for q in {id(q): q for q in modules[s].parameters()}.values())
            t = ""
            if t_layers is not None:
                ms = sum(t_layers[a:b]) + (t_pre if s == 0 else 0.0) + (t_post if s == S - 1 else 0.0)
                t = f", {ms * 1e3:.1f} ms fwd+bwd"
            layers = f"layer {a}" if b - a == 1 else f"layers {a}..{b - 1}"
            lines.append(f"  stage {s} (rank {s % self.ranks}): {' '.join([layers, *extra])}, "
                         f"{n / 1e6:.3f} M parameters{t}")
        return "\n".join(lines)

    def _wrap_data_parallel(self, module: nn.Module, data_parallel):
        if self.dp_group is None:
            return module
        if callable(data_parallel) and not dataclasses.is_dataclass(data_parallel):
            wrapped = data_parallel(module, self.dp_group)
        else:
            from llmkern.parallel.ddp import DDPConfig, DistributedDataParallel
            wrapped = DistributedDataParallel(module, data_parallel or DDPConfig(), group=self.dp_group)
        if not hasattr(wrapped, "no_sync"):
            raise TypeError(f"apply_pipeline: the data_parallel wrapper {type(wrapped).__name__} has no no_sync(); "
                            f"the pipeline reduces gradients only in each stage's last backward of a step")
        return wrapped

    @torch.no_grad()
    def _sync_tied_values(self) -> None:
        """Copies every tied parameter from its lowest rank to the others, so they start equal."""
        for prm, rks in self._ties:
            src = rks[0]
            if self.rank == src:
                works = [self._isend(prm.data, r) for r in rks[1:]]
                for w in works:
                    self._wait(w, f"sending tied parameter {self._names[id(prm)]}", rks[1])
            else:
                buf = torch.empty_like(prm.data)
                self._wait(self._irecv(buf, src), f"receiving tied parameter {self._names[id(prm)]}", src)
                prm.data.copy_(buf)

    # --- public ---------------------------------------------------------------------------------------

    def parameters(self):
        """This rank's parameters (each once)."""
        return iter({id(q): q for s in self.stages for q in self._local_modules[s].parameters()}.values())

    def named_parameters(self):
        """(name in the original model, parameter) for this rank's parameters."""
        return iter((self._names[id(q)], q) for q in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers, keyed by their names in the original model (the other
        ranks' entries are absent): the shard a torch.distributed.checkpoint save takes from this
        rank, which a load re-cuts by name whatever the number of stages."""
        return {k: v for k, v in self.model.state_dict().items() if v.device.type != "meta"}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Copies the entries of this rank's `state_dict()` from `state_dict` (keys of the original
        model; entries for other ranks are ignored). strict: every one of this rank's entries must be
        there. Returns the keys that were missing."""
        mine = self.state_dict()
        missing = [k for k in mine if k not in state_dict]
        if strict and missing:
            raise KeyError(f"Pipeline.load_state_dict: rank {self.rank} (stages {self.stages}) needs "
                           f"{len(missing)} entries that are not in the state dict: {missing[:5]}")
        for k, v in mine.items():
            if k in state_dict:
                if tuple(state_dict[k].shape) != tuple(v.shape):
                    raise ValueError(f"Pipeline.load_state_dict: {k} has shape {tuple(state_dict[k].shape)}, "
                                     f"the model's is {tuple(v.shape)}")
                v.copy_(state_dict[k])
        return missing

    def train(self, mode: bool = True) -> "Pipeline":
        for m in self.stage_modules.values():
            m.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.parameters():
            if set_to_none:
                q.grad = None
            elif q.grad is not None:
                q.grad.zero_()

    def __repr__(self) -> str:
        return f"Pipeline(rank {self.rank} of {self.ranks}, stages {self.stages})\n{self._report}"

    # --- communication: llmkern.parallel.collectives, counted per group in its COUNTER -----------------

    def _isend(self, t: torch.Tensor, rank: int):
        return collectives.send(t, rank, self.group, async_op=True, timeout=self.config.timeout_s)

    def _irecv(self, t: torch.Tensor, rank: int):
        return collectives.recv(t, rank, self.group, async_op=True, timeout=self.config.timeout_s)

    def _wait(self, handle, what: str, peer: int) -> None:
        """Waits for a send or receive with `peer` (a pipeline rank), at most timeout_s. A failure
        closes this rank's connections to the group (llmkern.parallel.groups.fail), so the other
        ranks' pending waits fail at once instead of each waiting out its own timeout."""
        try:
            handle.wait()
        except Exception as e:
            raise PipelineError(f"pipeline rank {self.rank} (stages {self.stages}): {what} failed within "
                                f"{self.config.timeout_s:g} s: rank {peer} died, stopped or diverged "
                                f"({type(e).__name__}: {_first_line(e)}){_reports(e)}") from e

    def _collective(self, fn, what: str):
        try:
            return fn()
        except Exception as e:
            raise PipelineError(f"pipeline rank {self.rank}: {what} over the pipeline group failed within "
                                f"{self.config.timeout_s:g} s: a rank died or is not in the same step "
                                f"({type(e).__name__}: {_first_line(e)}){_reports(e)}") from e

    # --- the step -------------------------------------------------------------------------------------

    def train_step(self, inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                   scaler=None) -> torch.Tensor:
        """Runs forward and backward of every micro-batch of (inputs, labels) through the pipeline;
        returns the batch loss (a 0-dim fp32 tensor, the same on every rank, averaged over data-
        parallel replicas). Gradients are accumulated into `.grad` of this rank's parameters.
        `scaler` (a DynamicLossScaler) scales each micro-batch loss before its backward."""
        if self._broken is not None:
            raise PipelineError(f"pipeline rank {self.rank}: unusable after an earlier failure: {self._broken}")
        t0 = time.perf_counter()
        try:
            loss = self._step_impl(inputs, labels, scaler)
        except PipelineError as e:
            self._broken = str(e).splitlines()[0]
            raise
        self.stats.steps += 1
        self.stats.seconds = time.perf_counter() - t0
        return loss

    def _step_impl(self, inputs, labels, scaler) -> torch.Tensor:
        m, S = self.config.microbatches, self.num_stages
        first, last = 0 in self.stages, S - 1 in self.stages
        self._step += 1
        err = None
        mb_in = mb_lab = None
        rows_total = None
        if first:
            if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] < m:
                err = (f"stage 0 needs inputs as a tensor with at least microbatches={m} rows in dim 0, got "
                       f"{_describe(inputs)}")
            else:
                rows_total = inputs.shape[0]
                mb_in = torch.tensor_split(inputs, m)
                if self.config.measure_activations:  # own storages, so a micro-batch counts its own bytes
                    mb_in = [t.clone() for t in mb_in]
        if last and err is None:
            if not isinstance(labels, torch.Tensor) or labels.dim() < 1 or labels.shape[0] < m:
                err = (f"stage {S - 1} needs labels as a tensor with at least microbatches={m} rows in dim 0, got "
                       f"{_describe(labels)}")
            else:
                mb_lab = torch.tensor_split(labels, m)
        plan, header_sends = self._agree_shapes(mb_in, labels, rows_total, err)
        if last:
            if isinstance(self.loss_fn, CausalLMLoss):
                count = self.loss_fn.count(labels)
                weights = [1.0 / max(count, 1)] * m
            else:
                weights = [r / sum(plan.rows) for r in plan.rows]
        else:
            weights = None
        self.stats.peak_in_flight = {s: 0 for s in self.stages}
        self.stats.messages = self.stats.bytes_sent = 0
        if self.config.measure_activations:
            self.stats.saved_bytes_per_microbatch = {s: 0 for s in self.stages}
            self.stats.peak_saved_bytes = {s: 0 for s in self.stages}
        loss_sum = self._run(plan, mb_in, mb_lab, weights, scaler, header_sends)
        self._sync_tied_grads()
        return self._reduce_loss(loss_sum)

    # --- shapes ---------------------------------------------------------------------------------------

    def _agree_shapes(self, mb_in, labels, rows_total, err):
        """The shapes every local stage receives and sends this step, agreed with the other ranks.

        The rank of stage 0 sends every other rank a key: the micro-batch input's dtype and shape,
        and whether this input is new. All ranks see the same inputs in the same steps, so they all
        know the same keys: for a known one each takes its stages' shapes from its cache, and no
        stage waits for another (one message from stage 0's rank per step). A new key (the first step,
        a new sequence length) runs the chain: stage by stage, each derives its output shape from its
        input's (running itself once on zeros, `_infer`) and passes it on in a header."""
        m, S = self.config.microbatches, self.num_stages
        sends = []
        first_rank = 0  # stage 0 lives on rank 0
        if self.rank == first_rank:
            key = None if err else (mb_in[0].dtype, tuple(mb_in[0].shape[1:]), rows_total)
            new = err is None and key not in self._plans
            hdr = self._header(error=err is not None, rows=rows_total or 0,
                               meta=None if err else key[:2], flag=new)
            sends += [(self._isend(hdr, r), r) for r in range(self.ranks) if r != self.rank]
        else:
            hdr = torch.zeros(_HEADER, dtype=torch.int64, device=self._ctl)
            self._wait(self._irecv(hdr, first_rank), "receiving the step's input description from stage 0",
                       first_rank)
            h = hdr.tolist()
            key, new = None, False
            if h[0] != _MAGIC:
                err = err or f"rank {self.rank} got a malformed step header from stage 0 (rank {first_rank})"
            elif h[4]:
                err = err or "upstream"
            elif h[1] != self._step or h[2] != m:
                err = err or (f"stages {self.stages} (rank {self.rank}) are at step {self._step} with microbatches={m}, "
                              f"but stage 0 (rank {first_rank}) is at step {h[1]} with microbatches={h[2]}: the "
                              f"ranks diverged")
            else:
                key, new = (_DTYPES[h[5]], tuple(h[7:7 + h[6]]), h[3]), bool(h[_HEADER - 1])
        if err is None:
            if new:
                plan, chain_sends, err = self._chain(mb_in, labels, key)
                sends += chain_sends
                if err is None:
                    self._plans[key] = plan
            else:
                plan = self._plans[key]
                if S - 1 in self.stages:  # the labels may change without the inputs: checked here
                    try:
                        self._check_labels(plan, labels)
                    except _Rejected as e:
                        err = str(e)
        if err is not None:
            # Tell every rank, fast: the rejecting rank records its message in the group's store and
            # closes its connections (llmkern.parallel.groups.fail); ranks already running the schedule
            # fail on their next wait with this rank, the others on the header they wait for, and each
            # error carries the reports. (An all-reduce of an error flag before every step would do it
            # too, but it would hold every rank until the last one has its shapes: a barrier at the
            # start of each step that this way costs nothing when all is well.)
            if err == "upstream":
                failure = groups.PeerFailure(first_rank, "receiving the shape header",
                                             _Rejected("an upstream stage rejected its input"))
            else:
                failure = groups.PeerFailure(None, "the shape agreement", _Rejected(err))
            ce = groups.fail(groups.state(self.group), f"pipeline step {self._step}", failure)
            mine = err if err != "upstream" else "an upstream stage rejected its input"
            raise PipelineError(f"pipeline step {self._step}: {mine}{_reports(ce)}")
        return plan, sends

    def _header(self, *, error: bool, rows: int, meta, flag: bool = False) -> torch.Tensor:
        """[magic, step, microbatches, rows, error, dtype, ndim, dims..., flag] as int64."""
        hdr = torch.zeros(_HEADER, dtype=torch.int64, device=self._ctl)
        hdr[0], hdr[1], hdr[2], hdr[3], hdr[4] = _MAGIC, self._step, self.config.microbatches, rows, int(error)
        if meta is not None:
            dt, shp = meta
            if len(shp) > _MAX_DIMS - 1:
                raise ValueError(f"pipeline: activations of at most {_MAX_DIMS} dimensions, got shape {shp}")
            hdr[5], hdr[6] = _DTYPES.index(dt), len(shp)
            hdr[7:7 + len(shp)] = torch.tensor(shp, dtype=torch.int64)
        hdr[_HEADER - 1] = int(flag)
        return hdr

    def _chain(self, mb_in, labels, key):
        """Derives the shapes stage by stage (see `_agree_shapes`); returns (plan, sends, error)."""
        m, S = self.config.microbatches, self.num_stages
        in_meta, out_meta, sends, err = {}, {}, [], None
        rows = [r.numel() for r in torch.tensor_split(torch.empty(key[2], device="meta"), m)]
        for s in self.stages:
            if s == 0:
                meta = key[:2]
            else:
                prev = (s - 1) % self.ranks
                hdr = torch.zeros(_HEADER, dtype=torch.int64, device=self._ctl)
                self._wait(self._irecv(hdr, prev), f"receiving the shape header of stage {s - 1}", prev)
                h = hdr.tolist()
                if h[0] != _MAGIC:
                    err = err or f"stage {s} got a malformed shape header from stage {s - 1} (rank {prev})"
                elif h[4] and not err:
                    err = "upstream"
                if not err:
                    meta = (_DTYPES[h[5]], tuple(h[7:7 + h[6]]))
            if not err:
                in_meta[s] = meta
                try:
                    out_meta[s] = self._infer(s, meta, rows, None)
                except _Rejected as e:
                    err = str(e)
            if s < S - 1:
                hdr = self._header(error=err is not None, rows=key[2], meta=None if err else out_meta[s])
                sends.append((self._isend(hdr, (s + 1) % self.ranks), (s + 1) % self.ranks))
        plan = _StepPlan(rows, in_meta, out_meta)
        if err is None and S - 1 in self.stages:
            try:
                self._check_labels(plan, labels)
            except _Rejected as e:
                err = str(e)
        return plan, sends, err

    def _check_labels(self, plan: _StepPlan, labels) -> None:
        """The last stage: labels with the batch's rows that loss_fn accepts (checked once per shape)."""
        S = self.num_stages
        if labels.shape[0] != sum(plan.rows):
            raise _Rejected(f"the last stage {S - 1} got labels with {labels.shape[0]} rows for a batch of "
                            f"{sum(plan.rows)} rows (the inputs on stage 0)")
        self._infer(S - 1, plan.in_meta[S - 1], plan.rows, labels)

    def _infer(self, s: int, meta, rows: list[int], labels) -> tuple:
        """(dtype, shape without dim 0) of stage s's output for inputs described by `meta`. Found by
        running the stage on zeros of each distinct micro-batch size, without autograd, in eval mode
        and with the RNG state restored afterwards, so training is unchanged; cached per shape, so it
        runs on the first step and when shapes change. (Fake or meta tensors would not compute, but
        their first use imports torch's symbolic-shape machinery: 4.7 s per process measured here,
        against milliseconds for one micro-batch of a stage.) Raises _Rejected naming the stages."""
        distinct = sorted(set(rows), reverse=True)
        key = (s, meta, tuple(distinct), None if labels is None else (labels.dtype, tuple(labels.shape[1:])))
        hit = self._shape_cache.get(key)
        if hit is not None:
            return hit
        module = self._local_modules[s]
        was_training = module.training
        dtype, rest = meta
        src = "the micro-batch input" if s == 0 else f"stage {s - 1}'s output"
        out_meta = None
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            module.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for r in distinct:
                    x = torch.zeros((r, *rest), dtype=dtype, device=self.device)
                    try:
                        y = module(x)
                    except Exception as e:
                        raise _Rejected(f"stage {s} (rank {self.rank}) cannot take {src}, a {dtype} tensor of shape "
                                        f"{(r, *rest)}: {type(e).__name__}: {_first_line(e)}") from None
                    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != r:
                        raise _Rejected(f"stage {s} must return one tensor with the micro-batch ({r} rows) as dim 0, "
                                        f"got {_describe(y)}")
                    if out_meta is not None and out_meta != (y.dtype, tuple(y.shape[1:])):
                        raise _Rejected(f"stage {s}'s output shape depends on the micro-batch size beyond dim 0")
                    out_meta = (y.dtype, tuple(y.shape[1:]))
                    if labels is not None:
                        lab = torch.zeros((r, *labels.shape[1:]), dtype=labels.dtype, device=labels.device)
                        try:
                            loss = self.loss_fn(y, lab)
                        except Exception as e:
                            raise _Rejected(f"the loss on the last stage {s} rejects output {tuple(y.shape)} with "
                                            f"labels {(r, *labels.shape[1:])}: {type(e).__name__}: "
                                            f"{_first_line(e)}") from None
                        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                            raise _Rejected(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
        finally:
            module.train(was_training)
        self._shape_cache[key] = out_meta
        return out_meta

    # --- running the schedule ---------------------------------------------------------------------------

    def _run(self, plan: _StepPlan, mb_in, mb_lab, weights, scaler, header_sends) -> torch.Tensor | None:
        cfg = self.config
        S, p, me = self.num_stages, self.ranks, self.rank
        recv: dict[tuple, tuple] = {}
        handoff: dict[tuple, torch.Tensor] = {}
        to_send: dict[tuple, torch.Tensor] = {}
        sends: list[tuple] = [(w, None, peer) for w, peer in header_sends]  # waited at the end of the step
        held: dict[tuple[int, int], _Held] = {}
        in_flight = {s: 0 for s in self.stages}
        meters = {}
        if cfg.measure_activations:
            for s in self.stages:
                meters[s] = _Meter({q.untyped_storage().data_ptr() for q in self._local_modules[s].parameters()})
        dev = self.device
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev) if S - 1 in self.stages else None

        def shape(s, mb, meta):
            return (plan.rows[mb], *meta[s][1])

        def take_input(s, mb) -> torch.Tensor:
            if s == 0:
                return mb_in[mb]
            if (s - 1) % p == me:
                x = handoff.pop(("F", s, mb))
            else:
                work, x = recv.pop(("F", s, mb))
                self._wait(work, f"receiving the activation of micro-batch {mb} from stage {s - 1}", (s - 1) % p)
            return x.detach().requires_grad_(x.is_floating_point())

        def take_grad(s, mb) -> torch.Tensor | None:
            if s == S - 1:
                return None
            if (s + 1) % p == me:
                return handoff.pop(("B", s, mb))
            work, g = recv.pop(("B", s, mb))
            self._wait(work, f"receiving the gradient of micro-batch {mb} from stage {s + 1}", (s + 1) % p)
            return g

        def give_input_grad(s, mb, x, gx) -> None:
            if s == 0:
                return
            if gx is None:
                gx = torch.zeros_like(x)
            if (s - 1) % p == me:
                handoff[("B", s - 1, mb)] = gx
            else:
                to_send[("B", s, mb)] = gx.contiguous()

        def forward(s, mb, grad: bool):
            nonlocal loss_sum
            module = self.stage_modules[s]
            h = held[(s, mb)]
            ctx = meters[s].hooks() if s in meters else contextlib.nullcontext()
            with ctx, torch.set_grad_enabled(grad):
                out = module(h.x)
                if s == S - 1:
                    loss = self.loss_fn(out, h.labels) * weights[mb]
                    if not grad or cfg.rematerialize != "full":
                        loss_sum = loss_sum + loss.detach().float()
                    if grad and scaler is not None:
                        loss = scaler.scale(loss)
                    out = loss
            return out

        def recompute(s, mb):
            h = held[(s, mb)]
            if cfg.rematerialize != "full":
                return h.out
            with torch.random.fork_rng(devices=[] if h.x.device.type == "cpu" else [h.x.device]):
                _set_rng(h.rng)
                return forward(s, mb, True)

        def sync_ctx(s, pos):
            module = self.stage_modules[s]
            if module is self._local_modules[s] or self._final_backward[s] == pos:
                return contextlib.nullcontext()
            return module.no_sync()

        for pos, a in enumerate(self._actions):
            s, mb, k = a.stage, a.microbatch, a.kind
            if k == "RECV_F":
                src = (s - 1) % p
                buf = torch.empty(shape(s, mb, plan.in_meta), dtype=plan.in_meta[s][0], device=dev)
                recv[("F", s, mb)] = (self._irecv(buf, src), buf)
            elif k == "RECV_B":
                src = (s + 1) % p
                buf = torch.empty(shape(s, mb, plan.out_meta), dtype=plan.out_meta[s][0], device=dev)
                recv[("B", s, mb)] = (self._irecv(buf, src), buf)
            elif k in ("SEND_F", "SEND_B"):
                t = to_send.pop((k[-1], s, mb))
                dst = (s + 1) % p if k == "SEND_F" else (s - 1) % p
                sends.append((self._isend(t, dst), t, dst))
                self.stats.messages += 1
                self.stats.bytes_sent += t.numel() * t.element_size()
            elif k == "F":
                x = take_input(s, mb)
                h = held[(s, mb)] = _Held(x, None, mb_lab[mb] if s == S - 1 else None)
                before = meters[s].live if s in meters else 0
                if cfg.rematerialize == "full":
                    h.rng = _get_rng(x.device)
                    if s in meters:
                        h.held_ptr = meters[s]._add(x)
                out = forward(s, mb, cfg.rematerialize != "full")
                if s in meters:
                    kept = meters[s].live - before
                    self.stats.saved_bytes_per_microbatch[s] = max(self.stats.saved_bytes_per_microbatch[s], kept)
                if cfg.rematerialize != "full":
                    h.out = out
                if s < S - 1:
                    y = out.detach()
                    if (s + 1) % p == me:
                        handoff[("F", s + 1, mb)] = y
                    else:
                        to_send[("F", s, mb)] = y.contiguous()
                in_flight[s] += 1
                self.stats.peak_in_flight[s] = max(self.stats.peak_in_flight[s], in_flight[s])
            elif k == "B":
                out = recompute(s, mb)
                g = take_grad(s, mb)
                h = held.pop((s, mb))
                if out.requires_grad:
                    with sync_ctx(s, pos):
                        run_backward([out], [torch.ones_like(out) if g is None else g])
                give_input_grad(s, mb, h.x, h.x.grad if s > 0 else None)
                self._release(meters, s, h)
                in_flight[s] -= 1
            elif k == "I":
                out = recompute(s, mb)
                g = take_grad(s, mb)
                h = held[(s, mb)]
                h.out = None
                h.split = SplitBackward(out, g, [h.x] if s > 0 else [], self._params[s])
                gx = h.split.input_grad() if out.requires_grad else []
                give_input_grad(s, mb, h.x, gx[0] if gx else None)
            elif k == "W":
                h = held.pop((s, mb))
                merged = self.stage_modules[s] is not self._local_modules[s] and self._final_backward[s] == pos
                with sync_ctx(s, pos):
                    h.split.weight_grad(merged=merged)
                self._release(meters, s, h)
                in_flight[s] -= 1
        for w, _, dst in sends:
            self._wait(w, "sending an activation or gradient", dst)
        for s in meters:
            self.stats.peak_saved_bytes[s] = meters[s].peak
        return loss_sum

    @staticmethod
    def _release(meters, s, h: _Held) -> None:
        if s in meters and h.held_ptr is not None:
            meters[s]._drop(h.held_ptr)
        h.x = h.out = h.split = None

    # --- after the schedule -------------------------------------------------------------------------------

    @torch.no_grad()
    def _sync_tied_grads(self) -> None:
        """Sums the gradient of every parameter used on several ranks (a tied embedding on the first
        and last stage), in rank order so that every holder gets the same bits."""
        for prm, rks in self._ties:
            if prm.grad is None:
                continue
            works, bufs = [], {}
            for r in rks:
                if r == self.rank:
                    continue
                works.append((self._isend(prm.grad.contiguous(), r), r))
                bufs[r] = torch.empty_like(prm.grad)
                works.append((self._irecv(bufs[r], r), r))
            for w, r in works:
                self._wait(w, f"exchanging the gradient of tied parameter {self._names[id(prm)]}", r)
            total = None
            for r in rks:
                g = prm.grad if r == self.rank else bufs[r]
                total = g.clone() if total is None else total.add_(g)
            prm.grad.copy_(total)

    def _reduce_loss(self, loss_sum) -> torch.Tensor:
        last_rank = (self.num_stages - 1) % self.ranks
        loss = (loss_sum.detach().to(self._ctl, copy=True) if loss_sum is not None
                else torch.zeros((), dtype=torch.float32, device=self._ctl))
        self._collective(lambda: collectives.broadcast_(loss, last_rank, self.group, backend="torch", check=False,
                                                        timeout=self.config.timeout_s), "the loss broadcast")
        if self.dp_group is not None:
            self._collective(lambda: collectives.all_reduce_(loss, self.dp_group, op="avg", backend="torch",
                                                             check=False, timeout=self.config.timeout_s),
                             "the loss average over data-parallel replicas")
        return loss


class _Rejected(Exception):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _reports(e: BaseException) -> str:
    """What the other ranks of a failed group reported (llmkern.parallel.groups.CollectiveError)."""
    reports = getattr(e, "reports", None) or {}
    return "".join(f"\n  rank {r} reported: {text}" for r, text in sorted(reports.items()))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def _get_rng(device: torch.device):
    if device.type == "cuda":
        return torch.get_rng_state(), torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), None


def _set_rng(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def apply_pipeline(model: nn.Module, config: PipelineConfig, mesh=None, *, loss_fn=None, data_parallel=None,
                   example_inputs: torch.Tensor | None = None) -> Pipeline:
    """Cuts `model` into `config.stages × config.virtual_stages` stages and returns this rank's
    `Pipeline` (call on every rank, each holding the same whole model).

    model:          an nn.Sequential, or a transformers causal LM like Llama or GPT-2 (embedding on the
                    first stage, final norm + LM head on the last).
    mesh:           None (the default group is the pipeline), a ProcessGroup (the pipeline group), or a
                    DeviceMesh with a "pp" dimension and optionally "dp": then every stage module is
                    wrapped for data parallelism over "dp".
    loss_fn:        loss_fn(last stage output, labels micro-batch) -> scalar, the micro-batch mean
                    (weighted by its share of the rows). Default for causal LMs: `CausalLMLoss`.
    data_parallel:  with a "dp" mesh dimension: a DDPConfig for llmkern's DistributedDataParallel
                    (default DDPConfig()), or a callable (module, dp_group) -> wrapper with no_sync()
                    (the seam for a ZeRO-1 wrapper). Gradients are reduced in each stage's last
                    backward of the step, the others run under no_sync().
    example_inputs: one micro-batch of inputs, for partition="time".
    """
    return Pipeline(model, config, mesh=mesh, loss_fn=loss_fn, data_parallel=data_parallel,
                    example_inputs=example_inputs)
