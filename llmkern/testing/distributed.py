"""Run a function on N real torch.distributed ranks (gloo on localhost) from one test.

Each rank is a fresh process that joins a process group, calls `fn(rank, world_size, *args)` and
sends its return value back through a pipe. The parent watches all ranks at once, so a rank that
raises is reported with its own traceback as soon as it fails, and a rank that hangs is killed at
the timeout instead of hanging the test run.

Start method: forkserver with torch preloaded, not spawn. Both give ranks that share no threads or
CUDA state with the pytest process (the server is a fresh single-threaded interpreter; a forked
rank has 1 OS thread, checked). But spawn imports torch once per rank: measured here at 3 s idle
and 5 s at load 5, so 4 ranks on the 2 shared cores took 13-20 s per call, against 0.2 s for 4
ranks forked from the server after its one-time 4 s start. With dozens of distributed tests that
is minutes against seconds. Spawn semantics are kept where they matter: each rank gets the
parent's os.environ as it is at the call (the server's own environment is the one it started
with), and sys.path and the main module are prepared as for spawn. Environment variables read
only when torch is imported (MKL_*, OMP_* tuning) come from the first call.

Ports: the parent hosts the rendezvous TCPStore itself on port 0, so the kernel picks a port that
is already bound and held for the whole run. Picking a "free" port, closing it and letting rank 0
bind it later races with concurrent test runs on the same machine; this cannot.

Exit: a rank that sent its result must also exit cleanly (code 0) within _EXIT_GRACE_S; a rank that
reports and then dies by a signal (a SIGABRT from gloo's teardown, say) fails the call. Fault tests
name the ranks they kill (`allow_dead`): those may die without reporting and get None as result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import time
import traceback

import torch
import torch.distributed as dist

_HOST = "127.0.0.1"

# A rank that has sent its result still has to exit; gloo teardown takes well under a second
# here, so 10 s only matters for a rank wedged in an atexit hook, which is then killed.
_EXIT_GRACE_S = 10.0


class RankFailedError(RuntimeError):
    """A rank raised (or died). `rank` is the first rank that failed, `remote_traceback` its text."""

    def __init__(self, rank: int, remote_traceback: str, message: str):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    fn: object
    args: tuple
    rank: int
    world_size: int
    port: int
    backend: str
    timeout_s: float
    environ: dict


def _worker(job: _Job, conn) -> None:
    """Body of one rank (runs in the child)."""
    os.environ.clear()
    os.environ.update(job.environ)
    # One intra-op thread per rank: N ranks share 2 cores here, and oversubscribed OpenMP pools
    # turn a 1 s test into a 30 s one. Inter-op threads are not used by these tests.
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(_HOST, job.port, world_size=None, is_master=False,
                              timeout=datetime.timedelta(seconds=job.timeout_s))
        dist.init_process_group(job.backend, store=store, rank=job.rank, world_size=job.world_size,
                                timeout=datetime.timedelta(seconds=job.timeout_s))
        conn.send_bytes(pickle.dumps(("started", None)))
        result = job.fn(job.rank, job.world_size, *job.args)
        dist.destroy_process_group()
        # Plain pickle, not the Connection's ForkingPickler: torch registers reductions there that
        # move tensors to shared memory served by this process, which is about to exit.
        payload = pickle.dumps(result)
        conn.send_bytes(pickle.dumps(("ok", payload)))
    except BaseException:  # noqa: BLE001 - every failure, SystemExit included, is reported to the parent
        with contextlib.suppress(Exception):
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        conn.close()


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=_EXIT_GRACE_S)


def run_distributed(fn, world_size: int, args: tuple = (), *, timeout: float = 120.0,
                    backend: str = "gloo", startup_timeout: float = 120.0, allow_dead=()) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return the results ordered by rank.

    fn must be picklable: a function defined at module level (not a lambda, closure or nested
    function), because the ranks import it by name. Its arguments and return value
    must be picklable too (return CPU tensors, numbers, dicts of them).

    Each rank runs in its own process (forked from a torch-preloaded forkserver, see the module
    docstring) with the parent's current environment plus RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT set as torchrun sets them, GLOO_SOCKET_IFNAME=lo and one torch thread. The default
    process group is initialized before fn and destroyed after it.

    timeout:         seconds fn may run, counted from the moment every rank has joined the
                     group. The clock excludes startup (the forkserver's first start imports
                     torch: 3-5 s on these machines, more under load), which would otherwise
                     make hang tests flaky.
    startup_timeout: seconds allowed for all ranks to start and join the group.
    allow_dead:      ranks that may die without reporting (fault tests kill them): their result is
                     None and their death is not an error.

    Raises RankFailedError (a RuntimeError) carrying the first failing rank's traceback when any
    rank raises or dies (or reports and then does not exit with code 0), and TimeoutError naming the
    ranks still running when time runs out. In all cases every rank is killed before the call
    returns.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        pickle.dumps((fn, tuple(args)))
    except Exception as e:
        raise TypeError(f"run_distributed needs a picklable fn and args (fn must be defined at module level, "
                        f"not a lambda or nested function): {type(e).__name__}: {e}") from e

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])  # used when the server first starts
    # wait_for_workers=False: the store only serves; the ranks rendezvous through it themselves.
    store = dist.TCPStore(_HOST, 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=startup_timeout + timeout))
    port = store.port
    procs, conns = [], {}
    try:
        environ = dict(os.environ, WORLD_SIZE=str(world_size), MASTER_ADDR=_HOST, MASTER_PORT=str(port),
                       GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            job = _Job(fn, tuple(args), rank, world_size, port, backend, startup_timeout + timeout,
                       dict(environ, RANK=str(rank), LOCAL_RANK=str(rank)))
            p = ctx.Process(target=_worker, args=(job, send), name=f"llmkern-rank{rank}", daemon=True)
            p.start()
            send.close()  # the child holds the only write end now: EOF on recv means it died
            procs.append(p)
            conns[rank] = recv
        return _collect(procs, conns, world_size, timeout, startup_timeout, frozenset(allow_dead))
    finally:
        _stop(procs)
        for c in conns.values():
            c.close()
        del store


def _exited_silently(conn) -> bool:
    """True when a finished rank's pipe holds no result or error before its EOF ("started" does
    not count as a report)."""
    try:
        while conn.poll():
            kind, _ = pickle.loads(conn.recv_bytes())
            if kind != "started":
                return False
    except (EOFError, OSError):
        return True
    return False


def _dead_without_report(procs, pending, failed_rank, grace, allow_dead=frozenset()):
    """The first other rank whose process exited without sending its result or error, if any
    does within `grace` seconds (ranks in allow_dead are expected to die and are not named)."""
    end = time.monotonic() + grace
    while True:
        for r, conn in pending.items():
            # Exit code 0 is a rank that finished its own protocol; a crash exits non-zero or by signal.
            if r == failed_rank or r in allow_dead or procs[r].is_alive() or procs[r].exitcode == 0:
                continue
            if _exited_silently(conn):
                return r
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def _exit_text(code) -> str:
    if code is None:
        return f"still running {_EXIT_GRACE_S:g} s after reporting (killed)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _collect(procs, conns, world_size, timeout, startup_timeout, allow_dead=frozenset()) -> list:
    results: dict[int, object] = {}
    started: set[int] = set()
    pending = dict(conns)  # rank -> connection still expected to speak
    exiting: dict[int, float] = {}  # rank -> when it must have exited (it reported its result)
    deadline = time.monotonic() + startup_timeout
    phase = "start"
    while pending:
        _check_exits(procs, exiting, world_size)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            running = sorted(pending)
            if phase == "start":
                missing = sorted(set(range(world_size)) - started)
                raise TimeoutError(f"ranks {missing} of {world_size} did not join the process group within "
                                   f"startup_timeout={startup_timeout:g} s; ranks {running} still running "
                                   f"(killed)")
            raise TimeoutError(f"ranks {running} of {world_size} still running after timeout={timeout:g} s "
                               f"(killed); finished: {sorted(results)}")
        soonest = min(exiting.values(), default=deadline) - time.monotonic()
        ready = mpc.wait(list(pending.values()), timeout=max(0.05, min(remaining, soonest)))
        for conn in ready:
            rank = next(r for r, c in pending.items() if c is conn)
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                p = procs[rank]
                p.join(timeout=1.0)
                if rank in allow_dead:
                    results[rank] = None
                    del pending[rank]
                    started.add(rank)
                    if phase == "start" and len(started) == world_size:
                        phase, deadline = "run", time.monotonic() + timeout
                    continue
                raise RankFailedError(rank, "", f"rank {rank} of {world_size} died without reporting "
                                                f"(exit code {p.exitcode})") from None
            if kind == "started":
                started.add(rank)
                if phase == "start" and len(started) == world_size:
                    phase, deadline = "run", time.monotonic() + timeout
            elif kind == "ok":
                results[rank] = pickle.loads(payload)
                del pending[rank]
                exiting[rank] = time.monotonic() + _EXIT_GRACE_S
            else:
                # A rank that raised because a peer vanished ("Connection reset by peer") is a
                # symptom; the peer that died is the cause. Give the others a moment to be seen.
                dead = _dead_without_report(procs, pending, rank, _EXIT_GRACE_S, allow_dead)
                if dead is not None:
                    raise RankFailedError(dead, "", f"rank {dead} of {world_size} died without reporting "
                                                    f"(exit code {procs[dead].exitcode}); rank {rank} then "
                                                    f"raised:\n{payload}")
                raise RankFailedError(rank, payload, f"rank {rank} of {world_size} raised:\n{payload}")
    for r, by in exiting.items():
        procs[r].join(timeout=max(0.0, by - time.monotonic()))
    _check_exits(procs, exiting, world_size, final=True)
    return [results[r] for r in range(world_size)]


def _check_exits(procs, exiting, world_size, final=False) -> None:
    """Each rank that reported must exit with code 0 within _EXIT_GRACE_S of its report (a rank held
    up at exit by a collective still waiting for peers, or killed by a signal in gloo's teardown,
    fails the call)."""
    now = time.monotonic()
    for r, by in exiting.items():
        p = procs[r]
        if p.is_alive() and (final or now >= by):
            raise RankFailedError(r, "", f"rank {r} of {world_size} reported its result but had not exited "
                                         f"{_EXIT_GRACE_S:g} s later")
        if not p.is_alive() and p.exitcode != 0:
            raise RankFailedError(r, "", f"rank {r} of {world_size} reported its result but did not exit cleanly: "
                                         f"{_exit_text(p.exitcode)}")
