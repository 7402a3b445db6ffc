"""NCCL communicators of llmkern's own ring collectives (csrc/comm/nccl_comm.cu), bootstrapped from a
torch.distributed Store.

    comm = NcclCommunicator(store, rank, world, device=torch.device("cuda", local_rank))
    sent = comm.all_reduce_(flat, op="avg")              # our ring: ncclSend/ncclRecv + our kernel
    comm.all_reduce_(flat, algo="nccl")                   # ncclAllReduce, the baseline
    comm.reduce_scatter_(flat)                            # rank r's result in chunk r of flat
    comm.all_gather_(flat)                                # rank r's shard in chunk r -> every chunk filled

backend="cuda" uses llmkern._C_cuda (real NCCL, CUDA tensors); backend="emu" uses llmkern._C_emu, the
same C++ compiled against csrc/emu's fake nccl.h, where the ranks are threads of one process and the
tensors are on the CPU (how the tests run this code without a GPU).

The bootstrap: rank 0 calls ncclGetUniqueId and `store.set(key, id)`; the others `store.get(key)`,
which waits up to the store's timeout and then raises (rank 0 never came); then every rank calls
ncclCommInitRank, which waits for all ranks (under emulation it gives up after
LLMKERN_EMU_NCCL_TIMEOUT_S, default 60). The Store half is here, in Python, because torch.distributed
Stores are pybind objects that a TorchScript custom class cannot take (see csrc/comm/nccl_comm.h).
"""
from __future__ import annotations

import atexit
import datetime
from typing import Literal

import torch
import torch.distributed as dist

from llmkern import _ext

Algo = Literal["ring", "nccl"]
Op = Literal["sum", "avg", "max"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_EXT = {"cuda": ("_C_cuda", "llmkern"), "emu": ("_C_emu", "llmkern_emu")}


def comm_class(backend: Literal["cuda", "emu"] = "cuda"):
    """torch.classes.<ns>.NcclComm of the extension, or a RuntimeError saying why it is missing."""
    if backend not in _EXT:
        raise ValueError(f"NcclCommunicator: backend must be 'cuda' or 'emu', got {backend!r}")
    ext, ns = _EXT[backend]
    if not _ext.available(ext):
        what = "the CUDA extension (nvcc + NCCL)" if backend == "cuda" else "the emulated extension"
        raise RuntimeError(f"llmkern NCCL ring ({backend}): llmkern.{ext} is {_ext.status(ext)}; it holds "
                           f"{what}. Rebuild with `pip install --no-build-isolation -e .`"
                           + (" on a machine with nvcc (LLMKERN_CUDA=1 makes a missing nvcc an error)"
                              if backend == "cuda" else ""))
    try:
        return getattr(torch.classes, ns).NcclComm
    except RuntimeError as e:  # torch.classes raises "Tried to instantiate class ... does not exist"
        raise RuntimeError(f"llmkern NCCL ring ({backend}): llmkern.{ext} was built without the NCCL "
                           f"communicator (csrc/comm/nccl_comm.cu); it is an older build: rebuild with "
                           f"`pip install --no-build-isolation -e .`") from e


class NcclCommunicator:
    """One rank's NCCL communicator (see the module docstring for the bootstrap)."""

    def __init__(self, store: dist.Store, rank: int, world: int, *, device: torch.device | None = None,
                 key: str = "llmkern_nccl_id", backend: Literal["cuda", "emu"] = "cuda"):
        cls = comm_class(backend)
        if not 0 <= rank < world:
            raise ValueError(f"NcclCommunicator: rank must be in [0, {world}), got {rank}")
        self.backend, self.rank, self.world, self.key = backend, rank, world, key
        if backend == "cuda":
            device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(
                device)
            if device.type != "cuda" or device.index is None:
                raise ValueError(f"NcclCommunicator: device must be a CUDA device with an index, "
                                 f"got {device}")
            self.device = device
        else:
            self.device = torch.device("cpu")
        if rank == 0:
            uid = cls.unique_id()
            store.set(key, bytes(uid.tolist()))
        else:
            try:
                raw = store.get(key)
            except Exception as e:  # torch raises DistStoreError (a RuntimeError) on timeout
                timeout = getattr(store, "timeout", None)
                waited = (f"{timeout.total_seconds():g} s" if isinstance(timeout, datetime.timedelta)
                          else "the store's timeout")
                raise RuntimeError(f"NcclCommunicator: rank {rank} of {world} waited {waited} for rank 0's "
                                   f"NCCL unique id under store key {key!r} and gave up; did rank 0 create "
                                   f"its communicator? ({type(e).__name__}: {e})") from e
            uid = torch.tensor(list(raw), dtype=torch.uint8)
        self._comm = cls(uid, rank, world, self.device.index if self.device.index is not None else -1)

    def all_reduce_(self, flat: torch.Tensor, *, op: Op = "sum", algo: Algo = "ring",
                    accumulate_fp32: bool = False) -> int:
        """Sums, averages or maxes `flat` (contiguous, float32/16, bfloat16 or float64) in place across
        the ranks, on the current CUDA stream; returns the bytes this rank sent.

        accumulate_fp32 (algo="ring", fp16/bf16, sum/avg): partial sums travel and are added in fp32 and
        are rounded once; costs 1.33x the bytes at 4 ranks, nothing extra at 2 (csrc/comm/nccl_comm.cu).
        """
        return self._comm.all_reduce_(flat, algo, op, accumulate_fp32)

    def reduce_scatter_(self, flat: torch.Tensor, *, op: Op = "sum", algo: Algo = "ring",
                        accumulate_fp32: bool = False) -> int:
        """`flat` holds world*k elements: afterwards chunk `rank` ([rank*k, (rank+1)*k)) holds the
        reduction of every rank's chunk `rank`; the other chunks hold partial results. Returns the bytes
        this rank sent."""
        return self._comm.reduce_scatter_(flat, algo, op, accumulate_fp32)

    def all_gather_(self, flat: torch.Tensor, *, algo: Algo = "ring") -> int:
        """`flat` holds world*k elements with this rank's shard in chunk `rank`: afterwards every chunk
        holds its owner's shard. Returns the bytes this rank sent."""
        return self._comm.all_gather_(flat, algo)

    def abort(self) -> None:
        """Frees the communicator without waiting for peers; any later call raises."""
        self._comm.abort()

    @property
    def error(self) -> str:
        """The first error this communicator hit ("" while healthy)."""
        return self._comm.error()


# --- one communicator per process group and device, for llmkern.parallel.collectives ---------------

_COMMS: dict[tuple[str, int], NcclCommunicator] = {}


def group_store(group) -> dist.Store:
    """The group's own store (see llmkern.parallel.groups.group_store)."""
    from llmkern.parallel import groups

    return groups.group_store(groups.resolve(group))


def communicator_for(group, device: torch.device) -> NcclCommunicator:
    """The cached communicator of (group, device), created on first use (a collective call: every
    rank of the group must reach it, as for any torch.distributed collective)."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    name = dist.distributed_c10d._get_process_group_name(pg)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cache_key = (name, index)
    comm = _COMMS.get(cache_key)
    if comm is None or comm.error:
        # A fresh store key per communicator of a group, counted the same on every rank: a group that
        # replaces a failed communicator must not read the old unique id.
        generation = _GENERATION[name] = _GENERATION.get(name, -1) + 1
        store = dist.PrefixStore(f"llmkern_nccl/{name}/{generation}/", group_store(group))
        comm = _COMMS[cache_key] = NcclCommunicator(store, dist.get_rank(group), dist.get_world_size(group),
                                                    device=torch.device("cuda", index), backend="cuda")
    return comm


_GENERATION: dict[str, int] = {}


def destroy_communicators() -> None:
    """Destroys the cached communicators (while CUDA is still up; registered with atexit)."""
    _COMMS.clear()


atexit.register(destroy_communicators)
