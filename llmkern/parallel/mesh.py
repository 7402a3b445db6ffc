"""The device mesh of a parallel run: data, tensor and pipeline parallel degrees over the world.

    mesh = llmkern.parallel.init_mesh(ParallelConfig(tp=2, pp=2))     # dp = world / 4
    ddp = DistributedDataParallel(model, group=mesh["dp"])             # or group="dp"
    mark_sharded(layer.weight, "tp")                                    # its gradient is split over tp

`ParallelDims` checks the degrees against the world size and builds the mesh with
`torch.distributed.device_mesh.init_device_mesh` (gloo on CPU, NCCL on CUDA), so its groups are
torch's own and interoperate with DTensor, FSDP2 and torch.distributed.checkpoint. The dimensions
are ("pp", "dp", "tp"), outermost first: tp ranks are adjacent (one node's GPUs share the most
traffic), pipeline stages are farthest apart, as in torchtitan's mesh. Every dimension exists, size
1 included, so `mesh["tp"]` works whatever the degrees. Building a mesh registers each axis name with
llmkern.parallel.groups on this rank: engines and collectives then take "dp", "tp" or "pp" wherever
they take a group, and the collective counter counts traffic per axis.

Parameters say how their gradients are laid out across the mesh. `mark_sharded(p, *axes)` records
the process groups across which p's gradient elements are partitioned (a tensor-parallel shard, a
ZeRO shard) in the attribute llmkern.optim.SHARDED_OVER: the optimizer's global gradient norm
(FusedAdamW.clip_grad_norm_, llmkern.optim.global_sumsq) all-reduces p's sum of squares over exactly
those groups and counts an unmarked parameter once, locally, because its gradient is replicated (a
LayerNorm weight or a row-parallel bias under TP).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.distributed as dist

from llmkern.optim.step_scalars import SHARDED_OVER, sharded_over
from llmkern.parallel import groups

__all__ = ["DIMS", "SHARDED_OVER", "ParallelConfig", "ParallelDims", "init_mesh", "mark_sharded", "sharded_over"]

DIMS = ("pp", "dp", "tp")


@dataclasses.dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """The parallel degrees of a run; their product is the world size."""

    dp: int = -1
    """Data-parallel replicas. -1: the world size divided by tp * pp."""

    tp: int = 1
    """Tensor-parallel ranks that split each weight matrix (adjacent ranks)."""

    pp: int = 1
    """Pipeline stages."""


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelDims:
    """Degrees checked against the world size (use `from_config`)."""

    dp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelDims:
        for name in ("tp", "pp"):
            v = getattr(config, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(config.dp, int) or (config.dp < 1 and config.dp != -1):
            raise ValueError(f"ParallelConfig.dp must be a positive integer or -1 (the rest of the world), "
                             f"got {config.dp!r}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        inner = config.tp * config.pp
        if config.dp == -1:
            if world_size % inner:
                raise ValueError(f"ParallelConfig(tp={config.tp}, pp={config.pp}): tp * pp = {inner} does not divide "
                                 f"the world size {world_size}, so dp = world / (tp * pp) is not an integer")
            dp = world_size // inner
        else:
            dp = config.dp
            if dp * inner != world_size:
                raise ValueError(f"ParallelConfig(dp={dp}, tp={config.tp}, pp={config.pp}): dp * tp * pp = "
                                 f"{dp * inner} ranks, but the world size is {world_size}")
        return cls(dp=dp, tp=config.tp, pp=config.pp, world_size=world_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Sizes of ("pp", "dp", "tp")."""
        return (self.pp, self.dp, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{"pp": stage, "dp": replica, "tp": tp rank} of a global rank (row-major over DIMS)."""
        pp, rest = divmod(rank, self.dp * self.tp)
        dp, tp = divmod(rest, self.tp)
        return {"pp": pp, "dp": dp, "tp": tp}

    def build_mesh(self, device_type: str | None = None):
        """The DeviceMesh over DIMS (a collective: every rank calls it), with each axis registered."""
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh: torch.distributed is not initialized (launch with "
                               "torchrun and call torch.distributed.init_process_group first)")
        world = dist.get_world_size()
        if world != self.world_size:
            raise ValueError(f"ParallelDims for world size {self.world_size} (dp={self.dp}, tp={self.tp}, pp={self.pp}),"
                             f" but torch.distributed's world size is {world}")
        device_type = device_type or _default_device_type()
        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=DIMS)
        for name in DIMS:
            groups.register_axis(name, mesh.get_group(name))
        return mesh


def _default_device_type() -> Literal["cpu", "cuda"]:
    pg = dist.distributed_c10d._get_default_group()
    has_cuda_backend = torch.device("cuda") in getattr(pg, "_device_types", [])
    return "cuda" if has_cuda_backend and torch.cuda.is_available() else "cpu"


def init_mesh(config: ParallelConfig | None = None, *, device_type: str | None = None):
    """Builds and returns the ("pp", "dp", "tp") DeviceMesh of `config` (all data parallel by default)
    over the default process group; device_type defaults to "cuda" when the default group has a CUDA
    backend, else "cpu"."""
    dims = ParallelDims.from_config(config or ParallelConfig(), dist.get_world_size() if dist.is_initialized() else 0)
    return dims.build_mesh(device_type)


def mark_sharded(param: torch.Tensor, *axes, mesh=None) -> torch.Tensor:
    """Records that `param`'s gradient elements are partitioned across `axes` (mesh axis names, groups or
    1-D meshes; names are looked up in `mesh` when given, else among the registered axes). Returns
    param."""
    if not axes:
        raise ValueError("mark_sharded: name at least one axis (e.g. 'tp') the parameter is sharded over")
    found = []
    for axis in axes:
        found.append(mesh.get_group(axis) if mesh is not None and isinstance(axis, str) else groups.resolve(axis))
    setattr(param, SHARDED_OVER, tuple(found))
    return param
