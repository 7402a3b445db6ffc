"""Faults become errors on every rank, quickly, and processes exit cleanly (exit code 0: run_distributed
checks it for every rank not named in allow_dead).

Each case was an abort (gloo's EnforceNotMet ends in std::terminate), garbage or a 30-minute hang
before: ranks calling the ring with different sizes, dtypes, ops or numbers of calls; a peer that
stalls or dies; an exception inside DDP's backward; DDP replicas that differ only in dtype.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from llmkern.parallel import CollectiveError, DDPConfig, DistributedDataParallel
from llmkern.parallel import collectives as C
from llmkern.testing import run_distributed

pytestmark = pytest.mark.distributed


def _mismatch(rank, world, case):
    x = {
        "sizes": lambda: torch.ones(10 if rank == 0 else 12),
        "large sizes": lambda: torch.ones(100000 if rank == 0 else 100003),
        "dtypes, equal bytes": lambda: torch.ones(8, dtype=torch.float32 if rank == 0 else torch.int32),
        "ops": lambda: torch.ones(8),
    }[case]()
    op = "avg" if case == "ops" and rank == 1 else "sum"
    try:
        C.all_reduce_(x, op=op, timeout=30)
        msg = None
    except ValueError as e:
        msg = str(e)
    ok = torch.ones(3)
    C.all_reduce_(ok, timeout=30)  # nothing was sent: the group is still in step
    return msg, ok.tolist()


@pytest.mark.parametrize("case,named", [
    ("sizes", "rank 1 called it with elements 12 (rank 0: 10)"),
    ("large sizes", "elements 100003 (rank 0: 100000)"),
    ("dtypes, equal bytes", "dtype torch.int32 (rank 0: torch.float32)"),
    ("ops", "op avg (rank 0: sum)"),
])
def test_ranks_that_disagree_raise_on_every_rank(case, named):
    for msg, ok in run_distributed(_mismatch, 3, (case,), timeout=60):
        assert msg is not None and named in msg and "nothing was sent" in msg, msg
        assert ok == [3.0] * 3


def _extra_call(rank, world, follow):
    errors = []
    try:
        C.all_reduce_(torch.ones(4), timeout=3)
        if rank == 0:
            C.all_reduce_(torch.ones(4), timeout=3)  # one call more than the others
        if follow:
            C.broadcast_(torch.ones(4), 0, timeout=3)
    except (ValueError, CollectiveError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_different_numbers_of_calls():
    # rank 0's extra all_reduce_ meets the others' broadcast_: named; without a next call, rank 0 waits
    # out its 3 s timeout and names the ranks that never came.
    results = run_distributed(_extra_call, 2, (True,), timeout=60)
    for errors in results:
        assert len(errors) == 1, errors
        assert "rank 1 called it with collective broadcast (rank 0: all_reduce)" in errors[0], errors
    t0 = time.monotonic()
    results = run_distributed(_extra_call, 2, (False,), timeout=60)
    assert time.monotonic() - t0 < 40
    assert results[1] == []
    assert len(results[0]) == 1 and "CollectiveError" in results[0][0] and "ranks [1] reported nothing" in \
        results[0][0], results[0]


def _peer_stops(rank, world, how, timeout):
    torch.manual_seed(0)
    x = torch.ones(1 << 16)
    C.all_reduce_(x, timeout=timeout)  # one good call: connections are up
    if rank == world - 1:
        if how == "dies":
            os._exit(3)
        time.sleep(timeout + 5)  # stalls past everyone's timeout and the 2 s grace, then leaves
        return "stalled"
    t0 = time.monotonic()
    try:
        C.all_reduce_(x, timeout=timeout)
    except CollectiveError as e:
        seconds = time.monotonic() - t0
        try:
            C.all_reduce_(x, timeout=timeout)
            again = "no error"
        except CollectiveError as e2:
            again = str(e2)
        return seconds, e.stopped, str(e), again
    return "no error"


@pytest.mark.parametrize("how,timeout", [("dies", 60.0), ("stalls", 2.0)])
def test_a_peer_that_stops_fails_every_survivor_quickly(how, timeout):
    """3 ranks, the last one dies (or stalls past the 2 s timeout). Both survivors raise, also the one
    that is not next to it in the ring, well within the timeout for a death (60 s here; the process
    group's own is 30 min), and name the rank that stopped. The failed group refuses later calls."""
    world = 3
    results = run_distributed(_peer_stops, world, (how, timeout), timeout=90, allow_dead=(2,) if how == "dies" else ())
    for rank in range(world - 1):
        seconds, stopped, msg, again = results[rank]
        limit = 10.0 if how == "dies" else timeout + 6.0
        assert seconds < limit, (rank, seconds, msg)
        assert stopped == (2,), msg
        assert "ranks [2] reported nothing" in msg
        assert "failed earlier" in again
    if how == "stalls":
        assert results[2] == "stalled"


# --- DDP ------------------------------------------------------------------------------------------------


def _ddp_dies(rank, world):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    ddp = DistributedDataParallel(m, DDPConfig(bucket_cap_mb=0.01, timeout_s=60))
    ddp(torch.ones(2, 64)).sum().backward()  # one good step
    if rank == world - 1:
        os._exit(3)  # dies before the second step's reductions
    t0 = time.monotonic()
    try:
        ddp(torch.ones(2, 64)).sum().backward()
    except CollectiveError as e:
        return time.monotonic() - t0, str(e)
    return None, "no error"


def test_dead_rank_during_ddp_backward_fails_the_others_quickly():
    results = run_distributed(_ddp_dies, 3, timeout=90, allow_dead=(2,))
    for seconds, msg in results[:2]:
        assert seconds is not None and seconds < 10, msg
        assert "reducing gradient bucket" in msg and "ranks [2] reported nothing" in msg


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ValueError("planted failure in backward")


def _ddp_raises_in_backward(rank, world):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    ref = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    ref.load_state_dict(m.state_dict())
    ddp = DistributedDataParallel(m, DDPConfig(bucket_cap_mb=0.0005, timeout_s=30))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    # The failure comes after the last layer's gradients (two buckets) were launched on every rank.
    h = m[1](m[0](x[rank * 2:rank * 2 + 2]))
    try:
        (m[2](_Boom.apply(h))).sum().backward()
        raised = "no error"
    except ValueError as e:
        raised = str(e)
    for p in m.parameters():
        p.grad = None
    ddp(x[rank * 2:rank * 2 + 2]).sum().backward()  # usable again
    ref(x).sum().backward()
    diff = max((p.grad - q.grad / world).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
    return raised, diff


def test_ddp_is_usable_after_an_exception_in_backward():
    for raised, diff in run_distributed(_ddp_raises_in_backward, 2, timeout=60):
        assert raised == "planted failure in backward"
        assert diff < 1e-6


def _dtype_replicas(rank, world):
    m = nn.Linear(8, 8).to(torch.float32 if rank == 0 else torch.bfloat16)
    try:
        DistributedDataParallel(m, DDPConfig(timeout_s=30))
    except ValueError as e:
        return str(e)
    return "constructed"


def test_ddp_replicas_with_equal_shapes_but_different_dtypes():
    for msg in run_distributed(_dtype_replicas, 2, timeout=60):
        assert "replicas differ" in msg and "differs in dtype: torch.bfloat16 on rank 1, torch.float32 on rank 0" \
            in msg, msg


@pytest.mark.parametrize("field,value,msg", [
    ("comm", "foo", "DDPConfig.comm must be 'ring' or 'all_reduce', got 'foo'"),
    ("unused_parameters", "ignore", "DDPConfig.unused_parameters must be 'error' or 'zero', got 'ignore'"),
    ("bucket_cap_mb", 0, "DDPConfig.bucket_cap_mb must be > 0"),
    ("reduce_dtype", torch.int32, "DDPConfig.reduce_dtype must be a floating-point torch.dtype"),
    ("timeout_s", -1, "DDPConfig.timeout_s must be > 0"),
])
def test_ddp_config_is_validated(field, value, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        DDPConfig(**{field: value})


def _leaves_a_collective_in_flight(rank, world):
    if rank == 0:
        C.all_reduce_(torch.ones(1 << 16), async_op=True, timeout=120)  # rank 1 never joins
    else:
        time.sleep(14)  # alive, connections open, longer than run_distributed's 10 s exit grace
    return rank


def test_a_process_exits_promptly_with_a_collective_in_flight():
    """Rank 0 returns with an asynchronous all-reduce that rank 1 (alive) never joins: at exit its wait
    is cut short (its connections closed) instead of holding the process until the 120 s timeout.
    run_distributed fails a rank that reported but has not exited with code 0 within 10 s."""
    assert run_distributed(_leaves_a_collective_in_flight, 2, timeout=60) == [0, 1]
