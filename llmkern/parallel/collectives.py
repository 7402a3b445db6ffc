"""Collectives on one tensor over a process group, a mesh axis or a 1-D mesh, and the one counter.

    all_reduce_(t, group, op="sum")             t summed (averaged, maxed) over the group, in place
    reduce_scatter(x, out=None, group)          rank r gets the reduction of chunk r of x (len(x) = world*k)
    all_gather(shard, out=None, group)          out = the shards of ranks 0..world-1, back to back
    broadcast_(t, src, group)                   t = src's t
    send(t, dst, group) / recv(t, src, group)   point to point

`group` is anything `llmkern.parallel.groups.resolve` takes (None: the default group). Ranks (src, dst)
are ranks within the group.

Backends. "ring": llmkern's ring (llmkern.parallel.ring over gloo isend/irecv for CPU tensors; the
NCCL ring of csrc/comm/nccl_comm.cu with our reduction kernel for CUDA tensors, through one NCCL
communicator per group and device bootstrapped from the group's store). "torch": torch.distributed's
own collective on the group (the baseline). Broadcast and send/recv have no ring algorithm: "ring"
broadcasts with one send from src to each peer, send/recv always use torch.distributed.

op: "sum", "avg" or "max". accumulate_dtype (sum/avg on floating-point tensors): reduce in this wider
floating-point dtype, e.g. torch.float32 for bf16/fp16 data, so partial sums never round to 16 bits.
This is the one place it is handled: the NCCL ring keeps fp32 partial sums inside its reduce-scatter
(1.33x the bytes at 4 ranks, 1x at 2); everywhere else the tensor is widened, reduced and copied
back once (2x the bytes). A maximum is exact in any dtype, so op="max" ignores it.

check (default True): before moving data, the ranks exchange what they are about to do (collective,
op, dtype, element count, accumulate dtype, backend, root; one small message to every peer) and every
rank raises the same ValueError naming the ranks and fields that differ, instead of gloo aborting
the process (different sizes) or silently mixing bytes (equal sizes, different dtypes or ops). Engines
whose layout was agreed at construction (DDP buckets) pass check=False.

timeout (seconds, default groups.DEFAULT_TIMEOUT_S): a peer that does not answer in time, dies or
fails raises groups.CollectiveError on every rank of the group within about the timeout (see
llmkern/parallel/groups.py); the group is unusable afterwards.

async_op=True returns a Handle: CPU collectives run on the group's collective thread in call order
(a synchronous call on a group with queued work waits its turn); CUDA collectives are enqueued on the
current stream at once. handle.wait() blocks until a CPU collective is done, or makes the current CUDA
stream wait for a CUDA one; it re-raises the collective's error and returns the result tensor.

The counter: every call records (calls, elements, bytes this rank sent) under its group's label (the
mesh axis name, "world", or torch's group name) and kind. `COUNTER` holds the totals of the process;
`with counting() as c:` counts one block. Code outside this module that communicates on its own (an
autograd collective calling torch.distributed directly) records with `record_collective`. Bytes of
the "torch" backend are those llmkern's ring (or flat broadcast) would send for the same call.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal, Self

import torch
import torch.distributed as dist

from llmkern.parallel import groups, ring

Backend = Literal["ring", "torch"]
ReduceOp = Literal["sum", "avg", "max"]
Kind = Literal["all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv"]

BACKENDS = ("ring", "torch")
OPS = ("sum", "avg", "max")

# --- the counter ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class CollectiveCount:
    """What some calls of one kind on one group did on this rank."""

    calls: int = 0
    """Calls made."""
    elements: int = 0
    """Elements of the buffers they covered (the whole buffer of an all-reduce or reduce-scatter input,
    the gathered output of an all-gather)."""
    bytes_sent: int = 0
    """Bytes this rank put on the wire."""

    def __iadd__(self, other: CollectiveCount) -> Self:
        self.calls += other.calls
        self.elements += other.elements
        self.bytes_sent += other.bytes_sent
        return self


class CommCounter:
    """Calls, elements and bytes sent, keyed by (group label, kind), on this rank. Thread-safe."""

    def __init__(self):
        self._counts: dict[tuple[str, str], CollectiveCount] = {}
        self._lock = threading.Lock()

    def add(self, group_label: str, kind: str, *, calls: int = 1, elements: int = 0, bytes_sent: int = 0) -> None:
        with self._lock:
            c = self._counts.setdefault((group_label, kind), CollectiveCount())
            c += CollectiveCount(calls, elements, bytes_sent)

    def get(self, kind: str | None = None, group=None) -> CollectiveCount:
        """The sum over the entries of `kind` (all kinds when None) on `group` (a label such as "tp", or
        anything groups.resolve takes; all groups when None)."""
        want = None
        if group is not None:
            want = group if isinstance(group, str) and group not in groups._AXES else groups.label(
                groups.resolve(group))
        total = CollectiveCount()
        with self._lock:
            for (g, k), c in self._counts.items():
                if (kind is None or k == kind) and (want is None or g == want):
                    total += c
        return total

    def snapshot(self) -> dict[tuple[str, str], CollectiveCount]:
        with self._lock:
            return {k: dataclasses.replace(c) for k, c in self._counts.items()}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        rows = [f"{g}/{k}: {c.calls} calls, {c.elements} elements, {c.bytes_sent} bytes sent"
                for (g, k), c in sorted(self.snapshot().items())]
        return "CommCounter(" + ("; ".join(rows) or "empty") + ")"


COUNTER = CommCounter()
"""Every collective of this process since it started (or since COUNTER.reset())."""

_ACTIVE: list[CommCounter] = [COUNTER]
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def counting() -> Iterator[CommCounter]:
    """Counts the collectives recorded while the block runs (any thread) in a fresh CommCounter."""
    c = CommCounter()
    with _ACTIVE_LOCK:
        _ACTIVE.append(c)
    try:
        yield c
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.remove(c)


def record_collective(kind: str, group=None, *, elements: int, bytes_sent: int, calls: int = 1) -> None:
    """Records one collective (or `calls` of them) on `group` in every active counter: for code that
    communicates without going through this module, e.g. an autograd function calling
    torch.distributed directly."""
    name = group if isinstance(group, str) and group not in groups._AXES else groups.label(groups.resolve(group))
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    for c in active:
        c.add(name, kind, calls=calls, elements=elements, bytes_sent=bytes_sent)


# --- handles ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Outcome:
    """What an asynchronous collective did, filled in when it has run."""

    bytes_sent: int | None = None
    """Bytes this rank sent (None until done)."""
    started: float | None = None
    """time.perf_counter() when a CPU collective started on the collective thread (None for CUDA)."""
    finished: float | None = None
    """time.perf_counter() when it finished (None for CUDA: the GPU's work is timed by events)."""


class Handle:
    """An asynchronous collective (async_op=True). wait() returns the result tensor and re-raises the
    collective's error in the calling thread; `outcome` holds its bytes and times once done."""

    def __init__(self, result: torch.Tensor, outcome: Outcome, *, future=None, event=None, timeout_s: float = 0.0):
        self._result, self.outcome = result, outcome
        self._future, self._event, self._timeout_s = future, event, timeout_s

    def wait(self) -> torch.Tensor:
        if self._future is not None:
            # The collective gives up after timeout_s (and reports); the margin covers its error
            # handling, so this fires only if the collective thread itself is stuck.
            margin = self._timeout_s + 60.0
            try:
                self._future.result(timeout=margin)
            except concurrent.futures.TimeoutError as e:
                raise groups.CollectiveError(f"an asynchronous collective did not finish within {margin:g} s (its "
                                             f"own timeout is {self._timeout_s:g} s)", rank=-1, world=-1) from e
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        return self._result

    def add_done_callback(self, fn: Callable[[bool], object]) -> None:
        """fn(succeeded) once the collective is done: on the collective thread right after it (CPU),
        or now for a CUDA one (its work is ordered by the stream, not finished: the caller frees CUDA
        memory after wait() instead)."""
        if self._future is not None:
            self._future.add_done_callback(lambda f: fn(f.exception() is None))
        elif self._event is None:
            fn(True)

    def is_completed(self) -> bool:
        if self._future is not None:
            return self._future.done()
        if self._event is not None:
            return self._event.query()
        return True


# --- checks --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)
_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
_SIG_FIELDS = ("collective", "op", "dtype", "elements", "accumulate_dtype", "backend", "root")
_MAGIC = 0x4C4B


def _code(seq, value) -> int:
    return seq.index(value) if value in seq else len(seq)


def _decode(field: str, value: int):
    table = {"collective": _KINDS, "op": OPS + ("none",), "dtype": _DTYPES, "accumulate_dtype": _DTYPES + (None,),
             "backend": BACKENDS}.get(field)
    if table is None:
        return value
    return table[value] if 0 <= value < len(table) else f"<{value}>"


_NO_GROUP = object()


def _check_tensor(t, what: str, name: str = "tensor", group=_NO_GROUP) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{what}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type == "meta" and group is not _NO_GROUP and dist.get_backend(groups.resolve(group)) == "fake":
        return  # torch's fake process group plans layouts too large to run: meta tensors, no data moved
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: {name} must be on the CPU or a CUDA device, got {t.device}")


def _check_op(op, t: torch.Tensor, what: str) -> None:
    if op not in OPS:
        raise ValueError(f"{what}: op must be one of {OPS}, got {op!r}")
    if op == "avg" and not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{what}: op='avg' needs a floating-point tensor (an integer average would round), got "
                         f"{t.dtype}")
    if op == "max" and t.is_complex():
        raise ValueError(f"{what}: op='max' needs a real tensor, got {t.dtype}")


def _wide_dtype(t: torch.Tensor, accumulate_dtype, op: str, what: str) -> torch.dtype | None:
    """The dtype to reduce in when it differs from t's, after refusing accumulate dtypes that lose
    precision; None when t is reduced in its own dtype."""
    if accumulate_dtype is None or accumulate_dtype == t.dtype or op == "max":
        return None
    if not isinstance(accumulate_dtype, torch.dtype):
        raise TypeError(f"{what}: accumulate_dtype must be a torch.dtype or None, got {accumulate_dtype!r}")
    if not t.is_floating_point():
        raise ValueError(f"{what}: accumulate_dtype is for floating-point data; {t.dtype} tensors are reduced "
                         f"exactly in their own dtype (got accumulate_dtype={accumulate_dtype})")
    if not accumulate_dtype.is_floating_point:
        raise ValueError(f"{what}: accumulate_dtype={accumulate_dtype} is not a floating-point dtype: {t.dtype} "
                         f"values would be truncated (1.5 + 1.5 would give 2)")
    if torch.finfo(accumulate_dtype).bits < torch.finfo(t.dtype).bits or (
            torch.finfo(accumulate_dtype).eps > torch.finfo(t.dtype).eps):
        raise ValueError(f"{what}: accumulate_dtype={accumulate_dtype} is narrower than the data's {t.dtype}: "
                         f"partial sums would lose precision; pass a wider dtype (e.g. torch.float32) or None")
    return accumulate_dtype


def _check_backend(backend, t: torch.Tensor, st: groups.GroupState, what: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ring" and t.device.type == "cpu" and torch.device("cpu") not in getattr(
            st.pg, "_device_types", [torch.device("cpu")]):
        raise ValueError(f"{what}: the gloo ring needs a group with a CPU backend (gloo) for CPU tensors; group "
                         f"{st.name!r} has device types {st.pg._device_types}; use backend='torch' or a gloo group")
    if backend == "ring" and t.device.type == "cuda":
        from llmkern.parallel import nccl

        if t.dtype not in nccl.DTYPES:
            raise ValueError(f"{what}: llmkern's NCCL ring reduces {[str(d) for d in nccl.DTYPES]} (its reduction "
                             f"kernel's types), got {t.dtype}; use backend='torch' for it")


def _exchange(st: groups.GroupState, seq: int, mine: torch.Tensor, msg: int, timeout_s: float,
              what: str) -> list[torch.Tensor]:
    """Every rank sends `mine` to every peer and receives theirs (equal sizes): rows indexed by rank."""
    rows = [mine if r == st.rank else torch.empty_like(mine) for r in range(st.world)]
    works = []
    t = groups.tag(seq, msg)
    try:
        for r in range(st.world):
            if r != st.rank:
                works.append((dist.irecv(rows[r], group=st.pg, group_src=r, tag=t), r, "receive"))
        for r in range(st.world):
            if r != st.rank:
                works.append((dist.isend(mine, group=st.pg, group_dst=r, tag=t), r, "send"))
    except Exception as e:
        raise groups.PeerFailure(None, f"exchanging the layout of {what}", e) from e
    for w, r, how in works:
        groups.wait(w, timeout_s, r, f"exchanging the layout of {what} ({how})")
    return rows


def _sig(kind: str, op: str, dtype: torch.dtype, elements: int, accumulate: torch.dtype | None, backend: str,
         root: int = -1) -> dict[str, int]:
    return {"collective": _code(_KINDS, kind), "op": _code((*OPS, "none"), op), "dtype": _code(_DTYPES, dtype),
            "elements": elements, "accumulate_dtype": _code(_DTYPES, accumulate),
            "backend": _code(BACKENDS, backend), "root": root}


def _check_signature(st: groups.GroupState, seq: int, fields: dict[str, int], timeout_s: float, what: str) -> None:
    mine = torch.tensor([_MAGIC, seq & 0xFFFFFFFF] + [fields[k] for k in _SIG_FIELDS], dtype=torch.int64,
                        device=st.p2p_device)
    rows = [r.cpu().tolist() for r in _exchange(st, seq, mine, groups.SIGNATURE_MSG, timeout_s, what)]
    diffs = []
    for r, row in enumerate(rows):
        if row == rows[0]:
            continue
        if row[0] != _MAGIC or row[1] != rows[0][1]:
            diffs.append(f"rank {r} is at a different call (its message does not describe call #{seq})")
            continue
        fields_r = dict(zip(_SIG_FIELDS, row[2:]))
        fields_0 = dict(zip(_SIG_FIELDS, rows[0][2:]))
        bad = [f"{k} {_decode(k, fields_r[k])} (rank 0: {_decode(k, fields_0[k])})" for k in _SIG_FIELDS
               if fields_r[k] != fields_0[k]]
        diffs.append(f"rank {r} called it with " + ", ".join(bad))
    if diffs:
        raise ValueError(f"{what}: the ranks of group {st.name!r} disagree on call #{seq}: " + "; ".join(diffs)
                         + ". Every rank must make the same collective calls with the same sizes, dtypes and "
                           "ops in the same order; nothing was sent.")


def agree(group=None, what: str = "llmkern.parallel", *, timeout: float | None = None,
          describe: Callable[[int, dict, dict], str] | None = None, **fields) -> None:
    """Checks that every rank of `group` passes equal `fields` (picklable values: sizes, dtypes, configs,
    a bucket plan); raises ValueError on every rank naming the ranks and what differs. A collective
    call (every rank must make it), for what an engine builds once. describe(rank, theirs, rank_0s)
    words one rank's difference (default: each differing field with both values)."""
    pg = groups.resolve(group)
    st = groups.state(pg)
    st.check_usable(what)
    timeout_s = _timeout(timeout)
    seq = st.next_seq()
    payload = pickle.dumps(fields)
    try:
        sizes = _exchange(st, seq, torch.tensor([len(payload)], dtype=torch.int64, device=st.p2p_device), 0,
                          timeout_s, what)
        sizes = [int(s.item()) for s in sizes]
        mine = torch.zeros(max(sizes), dtype=torch.uint8)
        mine[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = _exchange(st, seq, mine.to(st.p2p_device), 1, timeout_s, what)
    except groups.PeerFailure as f:
        raise groups.fail(st, what, f) from f.cause
    everyone = [pickle.loads(bytes(r.cpu()[:n].tolist())) for r, n in zip(rows, sizes)]
    diffs = []
    for r, theirs in enumerate(everyone):
        if theirs == everyone[0]:
            continue
        if describe is not None:
            diffs.append(describe(r, theirs, everyone[0]))
        else:
            bad = [f"{k}={_short(theirs.get(k))} (rank 0: {_short(everyone[0].get(k))})" for k in fields
                   if theirs.get(k) != everyone[0].get(k)]
            diffs.append(f"rank {r} has " + ", ".join(bad))
    if diffs:
        raise ValueError(f"{what}: " + "; ".join(diffs))


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- execution ---------------------------------------------------------------------------------------


def _timeout(timeout) -> float:
    if timeout is None:
        return groups.DEFAULT_TIMEOUT_S
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _wait_torch(work, timeout_s: float, cuda: bool, what: str) -> None:
    """Waits for a torch.distributed Work of the "torch" backend. NCCL work is waited for on the stream
    (work.wait() without a timeout makes the current stream wait and returns at once; with one, the
    host would block until the GPU is done): its hangs are NCCL's watchdog's, after the group's
    timeout. Gloo work is waited for on the host, at most timeout_s."""
    if cuda:
        work.wait()
    else:
        groups.wait(work, timeout_s, None, what)


def _execute(st: groups.GroupState, what: str, job: Callable[[], int], result: torch.Tensor, *, cuda: bool,
             async_op: bool, timeout_s: float):
    """Runs job() (which returns the bytes it sent) now (CUDA, or CPU with nothing queued on the group)
    or on the group's collective thread, turning a PeerFailure into a CollectiveError on every rank."""
    outcome = Outcome()

    def guarded():
        outcome.started = time.perf_counter()
        try:
            outcome.bytes_sent = job()
        except groups.PeerFailure as f:
            raise groups.fail(st, what, f) from f.cause
        finally:
            outcome.finished = time.perf_counter()

    if cuda:
        guarded()
        outcome.started = outcome.finished = None
        if not async_op:
            return result
        event = torch.cuda.Event()
        event.record()
        return Handle(result, outcome, event=event)
    if not async_op and st.idle():
        guarded()
        return result
    handle = Handle(result, outcome, future=st.submit(guarded), timeout_s=timeout_s)
    return handle if async_op else handle.wait()


def _torch_op(op: str):
    return dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM


def _record(st: groups.GroupState, kind: str, elements: int, sent: int) -> None:
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    for c in active:
        c.add(st.name, kind, elements=elements, bytes_sent=sent)


def _prepare(t: torch.Tensor, what: str, wide: torch.dtype | None) -> tuple[torch.Tensor, Callable[[], None]]:
    """A contiguous 1-D buffer standing for t (t's own memory when it is contiguous and needs no
    widening) and the function that copies it back into t."""
    if t.is_contiguous() and wide is None:
        return t.view(-1), lambda: None
    buf = t.reshape(-1).to(dtype=wide or t.dtype, copy=True).contiguous()
    return buf, lambda: t.copy_(buf.view(t.shape))


def _comm(st: groups.GroupState, device: torch.device):
    from llmkern.parallel import nccl

    return nccl.communicator_for(st.pg, device)


def all_reduce_(tensor: torch.Tensor, group=None, *, op: ReduceOp = "sum", accumulate_dtype: torch.dtype | None = None,
                backend: Backend = "ring", async_op: bool = False, check: bool = True,
                timeout: float | None = None):
    """Reduces `tensor` in place across the group (see the module docstring); returns it, or a Handle."""
    what = "all_reduce_"
    _check_tensor(tensor, what, group=group)
    _check_op(op, tensor, what)
    st = groups.state(groups.resolve(group))
    st.check_usable(what)
    _check_backend(backend, tensor, st, what)
    wide = _wide_dtype(tensor, accumulate_dtype, op, what)
    timeout_s = _timeout(timeout)
    cuda = tensor.device.type == "cuda"
    fp32_partials = (cuda and backend == "ring" and wide == torch.float32
                     and tensor.dtype in (torch.float16, torch.bfloat16))
    flat, copy_back = _prepare(tensor, what, None if fp32_partials else wide)
    seq = st.next_seq()
    desc = f"{what} #{seq} of {tensor.numel()} {tensor.dtype} (op={op}, backend={backend})"
    sig = _sig("all_reduce", op, tensor.dtype, tensor.numel(), wide, backend)

    def job():
        if check:
            _check_signature(st, seq, sig, timeout_s, desc)
        n, size = flat.numel(), flat.element_size()
        if backend == "ring" and not cuda:
            sent = ring.run(flat, st, seq, "all_reduce", op, timeout_s)
        elif backend == "ring":
            sent = _comm(st, flat.device).all_reduce_(flat, op=op, algo="ring", accumulate_fp32=fp32_partials)
        else:
            w = dist.all_reduce(flat, op=_torch_op(op), group=st.pg, async_op=True)
            _wait_torch(w, timeout_s, cuda, "torch.distributed.all_reduce")
            if op == "avg":
                flat.div_(st.world)
            sent = ring.elements_sent(n, st.rank, st.world) * size
        copy_back()
        _record(st, "all_reduce", tensor.numel(), sent)
        return sent

    return _execute(st, desc, job, tensor, cuda=cuda, async_op=async_op, timeout_s=timeout_s)


def _shard_view(flat: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    return flat[rank * k:(rank + 1) * k]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.numel() == b.numel() and a.dtype == b.dtype and a.device == b.device and b.is_contiguous()
            and a.is_contiguous() and a.data_ptr() == b.data_ptr())


def reduce_scatter(input: torch.Tensor, output: torch.Tensor | None = None, group=None, *, op: ReduceOp = "sum",
                   accumulate_dtype: torch.dtype | None = None, backend: Backend = "ring", async_op: bool = False,
                   check: bool = True, timeout: float | None = None):
    """Rank r gets, in `output` (k elements), the reduction over the ranks of chunk r of `input`
    (world*k elements: pad with ring.padded_numel). Without `output` the result is returned as the
    view of chunk r of a contiguous `input`, which serves as the workspace and holds partial sums
    elsewhere afterwards (a non-contiguous input gets a new output tensor). Returns the output, or a
    Handle."""
    what = "reduce_scatter"
    _check_tensor(input, what, "input", group)
    _check_op(op, input, what)
    st = groups.state(groups.resolve(group))
    st.check_usable(what)
    _check_backend(backend, input, st, what)
    n, world = input.numel(), st.world
    if n % world:
        raise ValueError(f"{what}: input must hold a multiple of the group's world size ({world}) elements so that "
                         f"every rank's shard has the same length, got {n}; pad it to {ring.padded_numel(n, world)} "
                         f"(llmkern.parallel.ring.padded_numel)")
    k = n // world
    if output is not None:
        _check_tensor(output, what, "output")
        if output.numel() != k or output.dtype != input.dtype or output.device != input.device:
            raise ValueError(f"{what}: output must hold input.numel() / world = {k} elements of {input.dtype} on "
                             f"{input.device}, got {output.numel()} of {output.dtype} on {output.device}")
    wide = _wide_dtype(input, accumulate_dtype, op, what)
    timeout_s = _timeout(timeout)
    cuda = input.device.type == "cuda"
    fp32_partials = (cuda and backend == "ring" and wide == torch.float32
                     and input.dtype in (torch.float16, torch.bfloat16))
    work_dtype = None if fp32_partials else wide
    if input.is_contiguous() and work_dtype is None:
        flat = input.view(-1)
    else:
        flat = input.reshape(-1).to(dtype=work_dtype or input.dtype, copy=True).contiguous()
    if output is None:
        output = _shard_view(input.view(-1), st.rank, k) if input.is_contiguous() else input.new_empty(k)
    seq = st.next_seq()
    desc = f"{what} #{seq} of {n} {input.dtype} (op={op}, backend={backend})"
    sig = _sig("reduce_scatter", op, input.dtype, n, wide, backend)

    def job():
        if check:
            _check_signature(st, seq, sig, timeout_s, desc)
        shard = _shard_view(flat, st.rank, k)
        if backend == "ring" and not cuda:
            sent = ring.run(flat, st, seq, "reduce_scatter", op, timeout_s)
        elif backend == "ring":
            sent = _comm(st, flat.device).reduce_scatter_(flat, op=op, algo="ring", accumulate_fp32=fp32_partials)
        else:
            tmp = torch.empty_like(shard)
            w = dist.reduce_scatter_single(tmp, flat, op=_torch_op(op), group=st.pg, async_op=True)
            _wait_torch(w, timeout_s, cuda, "torch.distributed.reduce_scatter_single")
            if op == "avg":
                tmp.div_(world)
            shard.copy_(tmp)
            sent = (world - 1) * k * flat.element_size()
        if not _same_memory(shard, output.view(-1) if output.is_contiguous() else output):
            output.copy_(shard.view(output.shape))
        _record(st, "reduce_scatter", n, sent)
        return sent

    return _execute(st, desc, job, output, cuda=cuda, async_op=async_op, timeout_s=timeout_s)


def all_gather(shard: torch.Tensor, output: torch.Tensor | None = None, group=None, *, backend: Backend = "ring",
               async_op: bool = False, check: bool = True, timeout: float | None = None):
    """`output` (world*k elements; a new 1-D tensor when None) = the k-element shards of ranks 0..world-1,
    back to back. When `shard` is already chunk r of a contiguous `output` (a flat parameter buffer and
    its shard view), nothing is copied. Returns the output, or a Handle."""
    what = "all_gather"
    _check_tensor(shard, what, "shard", group)
    st = groups.state(groups.resolve(group))
    st.check_usable(what)
    _check_backend(backend, shard, st, what)
    k, world = shard.numel(), st.world
    if output is None:
        output = shard.new_empty(world * k)
    else:
        _check_tensor(output, what, "output")
        if output.numel() != world * k or output.dtype != shard.dtype or output.device != shard.device:
            raise ValueError(f"{what}: output must hold world * shard.numel() = {world * k} elements of {shard.dtype} "
                             f"on {shard.device}, got {output.numel()} of {output.dtype} on {output.device}")
    timeout_s = _timeout(timeout)
    cuda = shard.device.type == "cuda"
    flat, copy_back = _prepare(output, what, None)
    mine = _shard_view(flat, st.rank, k)
    in_place = _same_memory(mine, shard.view(-1) if shard.is_contiguous() else shard)
    seq = st.next_seq()
    desc = f"{what} #{seq} of {world} x {k} {shard.dtype} (backend={backend})"
    sig = _sig("all_gather", "none", shard.dtype, k, None, backend)

    def job():
        if check:
            _check_signature(st, seq, sig, timeout_s, desc)
        if not in_place:
            mine.copy_(shard.reshape(-1))
        if backend == "ring" and not cuda:
            sent = ring.run(flat, st, seq, "all_gather", "sum", timeout_s)
        elif backend == "ring":
            sent = _comm(st, flat.device).all_gather_(flat, algo="ring")
        else:
            w = dist.all_gather_single(flat, mine.clone(), group=st.pg, async_op=True)
            _wait_torch(w, timeout_s, cuda, "torch.distributed.all_gather_single")
            sent = (world - 1) * k * flat.element_size()
        copy_back()
        _record(st, "all_gather", world * k, sent)
        return sent

    return _execute(st, desc, job, output, cuda=cuda, async_op=async_op, timeout_s=timeout_s)


def broadcast_(tensor: torch.Tensor, src: int = 0, group=None, *, backend: Backend = "ring", async_op: bool = False,
               check: bool = True, timeout: float | None = None):
    """Every rank's `tensor` becomes rank `src`'s (a rank of the group), in place; returns it, or a Handle.
    "ring": src sends the tensor to each peer; "torch": torch.distributed.broadcast."""
    what = "broadcast_"
    _check_tensor(tensor, what)
    st = groups.state(groups.resolve(group))
    st.check_usable(what)
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= src < st.world:
        raise ValueError(f"{what}: src must be a rank of the group, in [0, {st.world}), got {src}")
    timeout_s = _timeout(timeout)
    cuda = tensor.device.type == "cuda"
    flat, copy_back = _prepare(tensor, what, None)
    seq = st.next_seq()
    desc = f"{what} #{seq} of {tensor.numel()} {tensor.dtype} from rank {src} (backend={backend})"
    sig = _sig("broadcast", "none", tensor.dtype, tensor.numel(), None, backend, src)

    def job():
        if check:
            _check_signature(st, seq, sig, timeout_s, desc)
        n, size = flat.numel(), flat.element_size()
        sent = 0
        if st.world > 1 and n > 0:
            if backend == "ring":
                t = groups.tag(seq, 0)
                if st.rank == src:
                    works = []
                    for r in range(st.world):
                        if r != src:
                            try:
                                works.append((dist.isend(flat, group=st.pg, group_dst=r, tag=t), r))
                            except Exception as e:
                                raise groups.PeerFailure(r, "broadcast send", e) from e
                    for w, r in works:
                        groups.wait(w, timeout_s, r, "broadcast send")
                    sent = (st.world - 1) * n * size
                else:
                    try:
                        w = dist.irecv(flat, group=st.pg, group_src=src, tag=t)
                    except Exception as e:
                        raise groups.PeerFailure(src, "broadcast receive", e) from e
                    groups.wait(w, timeout_s, src, "broadcast receive")
            else:
                w = dist.broadcast(flat, group=st.pg, group_src=src, async_op=True)
                _wait_torch(w, timeout_s, cuda, "torch.distributed.broadcast")
                sent = (st.world - 1) * n * size if st.rank == src else 0
        copy_back()
        _record(st, "broadcast", n, sent)
        return sent

    return _execute(st, desc, job, tensor, cuda=cuda, async_op=async_op, timeout_s=timeout_s)


def _p2p(kind: str, tensor: torch.Tensor, peer: int, group, tag: int, async_op: bool, timeout) -> object:
    what = kind
    _check_tensor(tensor, what)
    st = groups.state(groups.resolve(group))
    st.check_usable(what)
    if not 0 <= peer < st.world or peer == st.rank:
        raise ValueError(f"{what}: the peer must be another rank of the group, in [0, {st.world}) and not "
                         f"{st.rank}, got {peer}")
    if not 0 <= tag < groups.USER_TAG_LIMIT:
        raise ValueError(f"{what}: tag must be in [0, 2^30) (higher tags are llmkern's own), got {tag}")
    if not tensor.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous (it is sent or received as one message), got strides "
                         f"{tuple(tensor.stride())}")
    timeout_s = _timeout(timeout)
    desc = f"{what} of {tensor.numel()} {tensor.dtype} {'to' if kind == 'send' else 'from'} rank {peer}"
    try:
        if kind == "send":
            w = dist.isend(tensor, group=st.pg, group_dst=peer, tag=tag)
        else:
            w = dist.irecv(tensor, group=st.pg, group_src=peer, tag=tag)
    except Exception as e:
        raise groups.fail(st, desc, groups.PeerFailure(peer, kind, e)) from e
    sent = tensor.numel() * tensor.element_size() if kind == "send" else 0

    def finish():
        try:
            groups.wait(w, timeout_s, peer, kind)
        except groups.PeerFailure as f:
            raise groups.fail(st, desc, f) from f.cause
        _record(st, kind, tensor.numel(), sent)
        return tensor

    if not async_op:
        return finish()
    return _P2PHandle(tensor, finish)


class _P2PHandle(Handle):
    def __init__(self, result, finish):
        super().__init__(result, Outcome())
        self._finish, self._finished = finish, False

    def wait(self) -> torch.Tensor:
        if not self._finished:
            self._finish()
            self._finished = True
        return self._result

    def is_completed(self) -> bool:
        return self._finished


def send(tensor: torch.Tensor, dst: int, group=None, *, tag: int = 0, async_op: bool = False,
         timeout: float | None = None):
    """Sends `tensor` (contiguous) to rank `dst` of the group; with async_op a Handle (wait() before
    reusing the tensor)."""
    return _p2p("send", tensor, dst, group, tag, async_op, timeout)


def recv(tensor: torch.Tensor, src: int, group=None, *, tag: int = 0, async_op: bool = False,
         timeout: float | None = None):
    """Receives into `tensor` (contiguous; the sender's size and dtype) from rank `src` of the group;
    returns it, or a Handle whose wait() returns it."""
    return _p2p("recv", tensor, src, group, tag, async_op, timeout)
