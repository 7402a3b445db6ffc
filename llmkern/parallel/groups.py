"""Process groups as llmkern's collectives and engines see them: resolution, names, call order, faults.

- `resolve(group)` turns what an engine is given (None for the default group, a `ProcessGroup`, a 1-D
  `DeviceMesh`, or a mesh axis name such as "tp" registered by `llmkern.parallel.mesh`) into the
  `ProcessGroup` to talk over.
- `label(group)` is the name a group's traffic is counted under: its mesh axis name, "world" for
  the default group, else torch's group name.
- `state(group)` holds what llmkern keeps per group on this rank: the sequence number of the next
  collective (every rank counts its calls on a group in the same order, so the number is part of
  every message's tag and a rank that is one call ahead or behind never pairs messages of different
  calls), a one-thread executor for asynchronous ring collectives, and whether the group failed.
- `fail(...)` turns a failed or timed-out wait into a `CollectiveError` on every rank of the group,
  quickly. The failing rank writes what it saw under the group's store, then closes its gloo
  connections to every peer: a gloo receive that times out closes its pair ("Application timeout
  caused pair closure"), so one 1 ms receive per peer makes each peer's pending operation with this
  rank fail at once ("Connection closed by peer") instead of waiting for its own timeout. Measured
  here on 3 gloo ranks with one killed: without it the survivor that was not next to the dead rank
  waited until the other survivor exited; with it, both raised within 10 ms of each other. Every rank
  that fails reports, so after a short grace the ranks that reported nothing are named: the ones
  that stalled, hung or died. A failed group refuses every later call (its connections are closed).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

DEFAULT_TIMEOUT_S = 300.0
"""Seconds any llmkern collective or engine waits for a peer before it raises: minutes, not the 30
minutes of torch.distributed's default process-group timeout."""

# Tags of llmkern's own point-to-point messages: bit 30 set, then 10 bits of the call's sequence
# number and 20 bits of the message within the call. User tags (send/recv) must stay below 2^30.
TAG_BASE = 1 << 30
USER_TAG_LIMIT = 1 << 30
_SEQ_BITS, _MSG_BITS = 10, 20
SIGNATURE_MSG = (1 << _MSG_BITS) - 1
_POISON_TAG = TAG_BASE - 1


def tag(seq: int, msg: int) -> int:
    """The tag of message `msg` of collective call `seq` (both wrap: gloo matches a pair's messages of
    one tag in order, so the tag only has to tell apart calls that can be in flight together)."""
    return TAG_BASE | ((seq & ((1 << _SEQ_BITS) - 1)) << _MSG_BITS) | (msg & ((1 << _MSG_BITS) - 1))


_AXES: dict[str, ProcessGroup] = {}
_AXIS_OF: dict[str, str] = {}  # torch group name -> mesh axis name


def register_axis(name: str, group: ProcessGroup) -> None:
    """Makes `name` resolve to `group` on this rank and count its traffic under `name`
    (llmkern.parallel.mesh registers "dp", "tp", "pp" when it builds a mesh)."""
    _AXES[name] = group
    _AXIS_OF[group.group_name] = name


def resolve(group=None) -> ProcessGroup:
    """The ProcessGroup that `group` names: None (the default group), a ProcessGroup, a 1-D DeviceMesh,
    or a mesh axis name registered by llmkern.parallel.mesh."""
    if not dist.is_initialized():
        raise RuntimeError("llmkern.parallel: torch.distributed is not initialized (launch with torchrun and "
                           "call torch.distributed.init_process_group first)")
    if group is None:
        return dist.distributed_c10d._get_default_group()
    if isinstance(group, ProcessGroup):
        return group
    if isinstance(group, str):
        if group not in _AXES:
            raise ValueError(f"llmkern.parallel: no mesh axis named {group!r} on this rank; known axes: "
                             f"{sorted(_AXES) or 'none (build a mesh with llmkern.parallel.init_mesh)'}")
        return _AXES[group]
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"llmkern.parallel: a {group.ndim}-D DeviceMesh {group.mesh_dim_names} names no "
                             f"single group; pass one dimension, e.g. mesh['{(group.mesh_dim_names or ('dp',))[0]}']")
        return group.get_group()
    raise TypeError(f"llmkern.parallel: group must be None, a ProcessGroup, a 1-D DeviceMesh or a mesh axis name, "
                    f"got {type(group).__name__}")


def label(pg: ProcessGroup) -> str:
    """The name `pg`'s traffic is counted under: its mesh axis, "world" for the default group, else
    torch's group name."""
    name = pg.group_name
    if name in _AXIS_OF:
        return _AXIS_OF[name]
    if pg is dist.distributed_c10d._get_default_group():
        return "world"
    return name


def group_store(pg: ProcessGroup) -> dist.Store:
    """The group's own store: torch keeps (backend, PrefixStore("<group name>/", default store)) per
    group in _world.pg_map, for the default group too. Falls back to the default store."""
    entry = dist.distributed_c10d._world.pg_map.get(pg)
    if entry is not None:
        return entry[1]
    return dist.distributed_c10d._get_default_store()


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died, stalled past the timeout, or called something
    else. `stopped` holds the group ranks that reported nothing (stalled, hung or dead), `reports`
    what the other failing ranks saw."""

    def __init__(self, message: str, *, rank: int, world: int, peer: int | None = None,
                 stopped: tuple[int, ...] = (), reports: dict[int, str] | None = None):
        super().__init__(message)
        self.rank, self.world, self.peer = rank, world, peer
        self.stopped = stopped
        self.reports = reports or {}


class PeerFailure(Exception):
    """Raised by a transport when waiting on `peer` failed; turned into a CollectiveError by `fail`."""

    def __init__(self, peer: int | None, where: str, cause: BaseException):
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.peer, self.where, self.cause = peer, where, cause


@dataclasses.dataclass(eq=False)
class GroupState:
    """What this rank keeps per process group (see the module docstring)."""

    pg: ProcessGroup
    rank: int
    world: int
    name: str
    seq: int = 0
    failure: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    pending: int = 0
    """Calls submitted to the collective thread and not finished yet."""
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def p2p_device(self) -> torch.device:
        """Where this group's small control messages live: the CPU when the group has a CPU backend
        (gloo), else the current CUDA device."""
        if torch.device("cpu") in getattr(self.pg, "_device_types", [torch.device("cpu")]):
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def check_usable(self, what: str) -> None:
        if self.failure is not None:
            raise CollectiveError(f"{what}: the process group {self.name!r} failed earlier on rank {self.rank} "
                                  f"({self.failure}); its connections are closed. Destroy it and create a new "
                                  f"one (or restart the job).", rank=self.rank, world=self.world)

    def idle(self) -> bool:
        """Nothing queued or running on the collective thread (a synchronous call may run inline)."""
        with self.lock:
            return self.pending == 0

    def submit(self, fn) -> concurrent.futures.Future:
        """Runs fn() on this group's collective thread; calls run in submission order."""

        def counted():
            try:
                return fn()
            finally:
                with self.lock:
                    self.pending -= 1

        with self.lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"llmkern-collectives-{self.name}")
            self.pending += 1
            return self._executor.submit(counted)


_STATES: dict[str, GroupState] = {}
_STATES_LOCK = threading.Lock()


def state(pg: ProcessGroup) -> GroupState:
    """This rank's GroupState of `pg` (created on first use)."""
    key = pg.group_name
    with _STATES_LOCK:
        st = _STATES.get(key)
        if st is None or st.pg is not pg:  # a destroyed and recreated group may reuse the name
            st = _STATES[key] = GroupState(pg, dist.get_rank(pg), dist.get_world_size(pg), label(pg))
        return st


def _fail_busy_groups_at_exit() -> None:
    """At interpreter exit, a collective thread still waiting for peers would keep the process alive
    until its timeout (the executor's threads are joined at exit): its groups' connections are closed
    so that the wait fails at once and the process exits."""
    with _STATES_LOCK:
        busy = [st for st in _STATES.values() if st.pending > 0 and st.failure is None]
    for st in busy:
        st.failure = "the process exited with collectives in flight"
        _close_connections(st)


# threading's exit hooks run in reverse order of registration, so this one runs before
# concurrent.futures' hook (registered when it was imported, above) joins the collective threads.
threading._register_atexit(_fail_busy_groups_at_exit)


def wait(work, timeout_s: float, peer: int | None, where: str) -> None:
    """Waits for a torch.distributed Work for at most timeout_s; a failure or timeout becomes a
    PeerFailure naming the peer (a gloo point-to-point wait that times out closes the pair)."""
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise PeerFailure(peer, where, e) from e


def _close_connections(st: GroupState) -> None:
    if torch.device("cpu") not in getattr(st.pg, "_device_types", []):
        # No gloo pairs to close: NCCL groups are aborted (their peers then fail at NCCL's timeout).
        with contextlib.suppress(Exception):  # best effort on a group that is failing anyway
            st.pg.abort()
        return
    dummy = torch.empty(1, device="cpu")
    for peer in range(st.world):
        if peer == st.rank:
            continue
        with contextlib.suppress(Exception):  # the expected outcome: the timeout closes the pair
            w = dist.irecv(dummy, group=st.pg, group_src=peer, tag=_POISON_TAG)
            w.wait(datetime.timedelta(milliseconds=1))


def _report_key(rank: int) -> str:
    return f"llmkern_fault/{rank}"


def fail(st: GroupState, what: str, failure: PeerFailure, *, grace_s: float = 2.0) -> CollectiveError:
    """Marks the group failed, tells the peers (store + closed connections), waits up to grace_s for
    the other ranks' reports and returns the CollectiveError to raise."""
    if st.failure is not None:  # a second wait of the same failed call, or a call racing the first
        return CollectiveError(f"{what} failed on rank {st.rank} of {st.world} ({st.name}): {failure}; the group "
                               f"had already failed: {st.failure}", rank=st.rank, world=st.world, peer=failure.peer)
    peer_text = f"rank {failure.peer}" if failure.peer is not None else "a peer"
    mine = f"{what}: {failure.where} with {peer_text}: {type(failure.cause).__name__}: {_first_line(failure.cause)}"
    st.failure = mine
    store = None
    try:
        store = group_store(st.pg)
        store.set(_report_key(st.rank), mine.encode())
    except Exception as e:  # noqa: BLE001 - the store host may be the rank that died
        mine += f" (could not reach the store to tell the peers: {type(e).__name__}: {_first_line(e)})"
    _close_connections(st)
    reports: dict[int, str] = {}
    others = [r for r in range(st.world) if r != st.rank]
    deadline = time.monotonic() + grace_s
    while store is not None and others:
        try:
            for r in list(others):
                if store.check([_report_key(r)]):
                    reports[r] = store.get(_report_key(r)).decode(errors="replace")
                    others.remove(r)
        except Exception:  # noqa: BLE001
            break
        if not others or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    stopped = tuple(others)
    lines = [(f"{what} failed on rank {st.rank} of {st.world} (group {st.name!r}): {failure.where} with "
              f"{peer_text}: {type(failure.cause).__name__}: {_first_line(failure.cause)}")]
    if stopped:
        lines.append(f"ranks {list(stopped)} reported nothing within {grace_s:g} s: they stopped (stalled, hung "
                     f"or died)")
    for r, text in sorted(reports.items()):
        lines.append(f"rank {r} reported: {text}")
    return CollectiveError("\n  ".join(lines), rank=st.rank, world=st.world, peer=failure.peer, stopped=stopped,
                           reports=reports)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
