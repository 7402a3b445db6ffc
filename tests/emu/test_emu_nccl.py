"""The fake nccl.h: 4 ranks as threads of one process."""
import pytest


@pytest.fixture(scope="module")
def nccl(program):
    return program("nccl_ring")


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:7"])
def test_ring_allreduce_from_send_recv(nccl, schedule):
    # Send/recv pairs in one group per step must not deadlock; the add kernel runs on 4 rank threads
    # at once, so the emulator's per-thread state is exercised concurrently.
    (r,) = nccl.results("ring_allreduce", schedule)
    assert float(r["err"]) < 1e-5


def test_allreduce_types_and_ops(nccl):
    rows = nccl.results("allreduce")
    assert len(rows) == 6 * 5
    bad = [r for r in rows if r["ok"] != "1"]
    assert not bad, bad


def test_in_place_reduce_scatter_and_all_gather(nccl):
    (r,) = nccl.results("reduce_scatter_all_gather")
    assert r["bad_shard"] == "0" and r["bad_gather"] == "0"


def test_unmatched_recv_times_out_with_an_error(nccl):
    out = nccl.run("recv_timeout").stdout
    assert "RESULT case=recv_timeout result=2" in out  # ncclSystemError
    assert "ncclRecv from rank 1 timed out" in out
