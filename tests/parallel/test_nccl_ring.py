"""The NCCL ring of csrc/comm/nccl_comm.cu run under the CUDA emulation: llmkern._C_emu compiles that
file against csrc/emu's fake nccl.h, whose ranks are threads of one process. Each test starts one
Python thread per rank; they bootstrap through a shared torch.distributed.HashStore exactly as real
ranks do through the group's store, and block inside NCCL calls waiting for each other, which only
works because the custom-class methods release the GIL. The reduction kernel runs under the
emulator's forward, reverse and random block schedules.
"""
from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from llmkern import _ext
from llmkern.parallel import ring as C
from llmkern.parallel.nccl import NcclCommunicator
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.skipif(not _ext.available("_C_emu"),
                                reason=f"llmkern._C_emu: {_ext.status('_C_emu')}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCHEDULES = ["forward", "reverse", "random:7"]


@pytest.fixture(autouse=True)
def _short_nccl_timeout(monkeypatch):
    # A wrong schedule that leaves a receive unmatched fails in 20 s instead of the default 60.
    monkeypatch.setenv("LLMKERN_EMU_NCCL_TIMEOUT_S", "20")


def run_ranks(world, fn, *, backend="emu", ranks=None, store_timeout=20.0, join_timeout=60.0):
    """Runs fn(rank, communicator) on one thread per rank in `ranks` (all by default); returns
    (results, errors), both indexed by rank."""
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=store_timeout))
    results, errors = [None] * world, [None] * world

    def body(rank):
        try:
            comm = NcclCommunicator(store, rank, world, backend=backend)
            results[rank] = fn(rank, comm)
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides whether it was expected
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in (ranks or range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    assert not any(t.is_alive() for t in threads), f"ranks still running after {join_timeout} s (hang)"
    return results, errors


def all_reduced(world, inputs, method="all_reduce_", **kw):
    """Every rank runs comm.<method> on a clone of inputs[rank] in place; returns the buffers and the
    bytes sent."""

    def fn(rank, comm):
        x = inputs[rank].clone()
        sent = getattr(comm, method)(x, **kw)
        return x, sent

    results, errors = run_ranks(world, fn)
    for e in errors:
        if e is not None:
            raise e
    return [r[0] for r in results], [r[1] for r in results]


def make_inputs(world, n, dtype, *, integer=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if integer:
        return [torch.randint(-64, 64, (n,), generator=g).to(dtype) for _ in range(world)]
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(world)]


def naive_sum(inputs, average):
    """Plain PyTorch in the inputs' dtype: add rank by rank, each add rounded, then divide."""
    acc = inputs[0].clone()
    for x in inputs[1:]:
        acc = acc + x
    return acc / len(inputs) if average else acc


def ref_sum(inputs, average):
    acc = torch.stack([x.double() for x in inputs]).sum(0)
    return acc / len(inputs) if average else acc


def ref_reduce(inputs, op):
    if op == "max":
        return torch.stack([x.double() for x in inputs]).amax(0)
    return ref_sum(inputs, op == "avg")


# --- correctness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ring", "nccl"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [0, 1, 3, 97, 1025])
def test_fp32_sum_is_exact_on_integers(world, n, algo):
    # Integer-valued fp32 sums are exact in any order: any wrong chunk, offset or step shows as a mismatch.
    # n = 1 and 3 are shorter than most worlds: some chunks are empty and their sends are skipped.
    inputs = make_inputs(world, n, torch.float32, integer=True, seed=world * 1000 + n)
    outs, _ = all_reduced(world, inputs, algo=algo)
    expected = ref_sum(inputs, False).float()
    for rank, out in enumerate(outs):
        assert torch.equal(out, expected), f"rank {rank}: max diff {(out - expected).abs().max()}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exact_under_every_block_schedule(schedule, monkeypatch):
    # The kernel's vector loop, head and tail split the work differently per thread; whatever order the
    # emulator runs blocks and threads in, the sums stay exact. 4099 elements over 3 ranks: chunks of
    # 1367/1366 elements start at odd offsets, so every chunk has a scalar head and tail.
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)
    for dtype in (torch.float32, torch.float16):
        inputs = make_inputs(3, 4099, dtype, integer=True, seed=5)
        outs, _ = all_reduced(3, inputs, algo="ring", op="sum")
        for out in outs:
            assert torch.equal(out, ref_sum(inputs, False).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("algo", ["ring", "nccl"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_matches_fp64_reference(world, algo, op, dtype):
    """Random data in every dtype, against the fp64 sum; the allowance is 2x the error of plain PyTorch
    adding the ranks' tensors one by one in the same dtype (backend="emu": the kernel on CPU threads)."""
    inputs = make_inputs(world, 1025, dtype, seed=world)
    outs, _ = all_reduced(world, inputs, algo=algo, op=op)
    ref, base = ref_sum(inputs, op == "avg"), naive_sum(inputs, op == "avg")
    for rank, out in enumerate(outs):
        assert out.dtype == dtype
        assert_close_to_ref(out, ref, base, name=f"rank {rank} {algo} {op} backend=emu")
        assert torch.equal(out, outs[0]), "ranks disagree"  # every rank gathers the same reduced chunks


# --- reduce-scatter and all-gather: rank r owns chunk r ------------------------------------------------


@pytest.mark.parametrize("algo", ["ring", "nccl"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("k", [0, 1, 97, 205])
def test_reduce_scatter_gives_rank_r_chunk_r(world, k, algo):
    # Integer-valued fp32: exact in any order. Rank r's shard [r*k, (r+1)*k) must be the sum of every
    # rank's chunk r, as torch.distributed.reduce_scatter_tensor gives it.
    inputs = make_inputs(world, world * k, torch.float32, integer=True, seed=world * 100 + k)
    outs, sent = all_reduced(world, inputs, method="reduce_scatter_", algo=algo)
    expected = ref_sum(inputs, False).float()
    for rank, out in enumerate(outs):
        assert torch.equal(out[rank * k:(rank + 1) * k], expected[rank * k:(rank + 1) * k]), f"rank {rank}"
    assert sent == [(world - 1) * k * 4] * world


@pytest.mark.parametrize("algo", ["ring", "nccl"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("k", [0, 1, 97, 205])
def test_all_gather_fills_every_chunk_with_its_owner(world, k, algo):
    shards = make_inputs(world, k, torch.bfloat16, seed=world + k)
    expected = torch.cat(shards)
    inputs = []
    for rank in range(world):
        buf = torch.full((world * k,), float("nan"), dtype=torch.bfloat16)  # only chunk `rank` is set
        buf[rank * k:(rank + 1) * k] = shards[rank]
        inputs.append(buf)
    outs, sent = all_reduced(world, inputs, method="all_gather_", algo=algo)
    for out in outs:
        assert torch.equal(out, expected)
    assert sent == [(world - 1) * k * 2] * world


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_reduce_scatter_then_all_gather_is_all_reduce(schedule, dtype, op, monkeypatch):
    """The two phases run separately compose to the all-reduce, bit for bit, under every block schedule;
    both match the fp64 reference within the 2x rule (max: exactly)."""
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)
    world, k = 3, 1367  # odd shard length: every chunk has a scalar head and tail in the kernel
    inputs = make_inputs(world, world * k, dtype, seed=17)

    def fn(rank, comm):
        a = inputs[rank].clone()
        comm.all_reduce_(a, op=op)
        b = inputs[rank].clone()
        comm.reduce_scatter_(b, op=op)
        comm.all_gather_(b)
        return a, b

    results, errors = run_ranks(world, fn)
    assert errors == [None] * world
    ref = ref_reduce(inputs, op)
    base = ref.to(dtype) if op == "max" else naive_sum(inputs, op == "avg")
    for rank, (a, b) in enumerate(results):
        assert torch.equal(a, b), f"rank {rank}: all_reduce_ and reduce_scatter_ + all_gather_ differ"
        if op == "max":
            assert torch.equal(a, ref.to(dtype))
        else:
            assert_close_to_ref(a, ref, base, name=f"rank {rank} {op} schedule={schedule}")


def test_max_propagates_nan():
    inputs = [torch.tensor([1.0, float("nan"), 3.0, -1.0]), torch.tensor([2.0, 0.0, float("nan"), -2.0])]
    outs, _ = all_reduced(2, inputs, op="max")
    for out in outs:
        assert out[0] == 2.0 and out[1].isnan() and out[2].isnan() and out[3] == -1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_reduce_scatter_fp32_partials_round_once(dtype):
    world, k = 4, 1025
    inputs = make_inputs(world, world * k, dtype, seed=23)
    outs, sent = all_reduced(world, inputs, method="reduce_scatter_", accumulate_fp32=True)
    ref = ref_sum(inputs, False)
    for rank, out in enumerate(outs):
        assert torch.equal(out[rank * k:(rank + 1) * k], ref[rank * k:(rank + 1) * k].to(dtype))
        # step 0 sends 16-bit inputs, steps 1..world-2 fp32 partial sums
        assert sent[rank] == k * 2 + (world - 2) * k * 4


def test_shards_must_be_equal():
    def fn(rank, comm):
        for method in ("reduce_scatter_", "all_gather_"):
            with pytest.raises(RuntimeError, match=r"multiple of the world size \(2\) elements.*got 7.*pad the buffer to 8"):
                getattr(comm, method)(torch.ones(7))
        return True

    results, errors = run_ranks(2, fn)
    assert errors == [None, None] and results == [True, True]


def test_storage_offset_and_multidimensional_buffers():
    # A contiguous view that starts one element into its storage (no chunk is 16-byte aligned where the
    # kernel expects it) and a 2-D buffer: both are reduced as flat memory; the elements just outside
    # the view are left alone.
    base = make_inputs(2, 1 + 6 * 41 + 1, torch.bfloat16, integer=True, seed=3)
    views = [b[1:-1].view(6, 41) for b in base]
    expected = (base[0][1:-1].double() + base[1][1:-1].double()).to(torch.bfloat16)
    guards = [b[[0, -1]].clone() for b in base]

    def fn(rank, comm):
        comm.all_reduce_(views[rank])
        return base[rank]

    results, errors = run_ranks(2, fn)
    assert errors == [None, None]
    for r, guard in zip(results, guards):
        assert torch.equal(r[1:-1], expected) and torch.equal(r[[0, -1]], guard)


# --- fp32 accumulation of 16-bit buffers --------------------------------------------------------------


def test_fp32_accumulation_beats_fp16_partial_sums():
    """1 + 3 * 2^-9 in bf16 is 1.0078125 rounded once. Chunk 0 starts its trip round the ring at rank 0
    (1.0); with 16-bit partial sums every 2^-9 added after that is a quarter ulp and rounds away."""
    world = 4
    inputs = [torch.full((1001,), 1.0 if r == 0 else 2.0**-9, dtype=torch.bfloat16) for r in range(world)]
    wide, _ = all_reduced(world, inputs, accumulate_fp32=True)
    narrow, _ = all_reduced(world, inputs)
    for w, n16 in zip(wide, narrow):
        assert (w == 1.0078125).all()
        assert (n16 == 1.0).any() and (n16 == 1.0078125).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_fp32_accumulation_is_correctly_rounded(dtype, op):
    # 4 ranks of 16-bit randn: the fp32 sum (and the exact /4) of 4 values with 8-11 bit mantissas is
    # exact, so with fp32 partial sums the result is the fp64 sum rounded once; 16-bit partial sums
    # round at every step and end up measurably further away.
    world = 4
    inputs = make_inputs(world, 4097, dtype, seed=11)
    ref = ref_sum(inputs, op == "avg")
    wide, _ = all_reduced(world, inputs, op=op, accumulate_fp32=True)
    narrow, _ = all_reduced(world, inputs, op=op)
    naive = naive_sum(inputs, op == "avg")
    for w, n16 in zip(wide, narrow):
        assert torch.equal(w, ref.to(dtype))
        err_wide, err_narrow = (w.double() - ref).abs(), (n16.double() - ref).abs()
        err_naive = (naive.double() - ref).abs()
        assert err_wide.max() < err_narrow.max() and err_wide.max() < err_naive.max()
        assert err_wide.mean() < err_naive.mean() and err_wide.mean() < err_narrow.mean()


# --- bytes sent -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 97, 1025])
def test_bytes_sent_per_rank(world, n):
    inputs = make_inputs(world, n, torch.float16, integer=True)
    _, sent = all_reduced(world, inputs)
    assert sent == [C.elements_sent(n, r, world) * 2 for r in range(world)]
    assert sum(sent) == 2 * (world - 1) * n * 2  # 2(n-1)/n of the buffer per rank, exactly in total
    _, sent_nccl = all_reduced(world, inputs, algo="nccl")
    assert sent_nccl == sent  # reported as the ring-equivalent count
    # fp32 partial sums: step 0 in 16 bits, steps 1..world-2 in 32, the all-gather in 16.
    _, sent32 = all_reduced(world, inputs, accumulate_fp32=True)
    for r in range(world):
        expect = 0
        for s in range(C.ring_steps(world)):
            count = C.chunk_range(n, world, C.reduce_scatter_step(r, world, s)[0])[1]
            expect += count * (2 if s == 0 else 4)
            expect += C.chunk_range(n, world, C.all_gather_step(r, world, s)[0])[1] * 2
        assert sent32[r] == expect


# --- failures: clear errors, no hangs -------------------------------------------------------------


def test_rank_that_never_joins_fails_the_others(monkeypatch):
    monkeypatch.setenv("LLMKERN_EMU_NCCL_TIMEOUT_S", "1")
    _, errors = run_ranks(3, lambda rank, comm: None, ranks=[0, 1])
    for e in errors[:2]:
        assert isinstance(e, RuntimeError) and "ncclCommInitRank failed on rank" in str(e), e


def test_missing_rank_0_fails_at_the_store():
    _, errors = run_ranks(3, lambda rank, comm: None, ranks=[1, 2], store_timeout=1.0)
    for e in errors[1:]:
        assert isinstance(e, RuntimeError) and "waited 1 s for rank 0's NCCL unique id" in str(e), e


def test_rank_that_skips_a_call_times_out_and_poisons_the_communicator(monkeypatch):
    monkeypatch.setenv("LLMKERN_EMU_NCCL_TIMEOUT_S", "1")

    def fn(rank, comm):
        if rank == 2:
            return "skipped"
        x = torch.ones(10)
        with pytest.raises(RuntimeError, match=r"ncclGroupEnd \(reduce-scatter step \d\) failed on rank"):
            comm.all_reduce_(x)
        assert "timed out" in comm.error
        with pytest.raises(RuntimeError, match="unusable after an earlier error"):
            comm.all_reduce_(x)
        return "failed cleanly"  # the communicator is aborted, not destroyed, when it goes away

    results, errors = run_ranks(3, fn)
    assert errors == [None, None, None]
    assert results == ["failed cleanly", "failed cleanly", "skipped"]


def test_bad_input():
    def fn(rank, comm):
        cases = [
            (torch.ones(4, 4).t(), "contiguous"),
            (torch.ones(4, dtype=torch.int32), "float32, float16, bfloat16 or float64"),
            (torch.ones(4, device="meta"), "must be on cpu"),
        ]
        for x, msg in cases:
            with pytest.raises(RuntimeError, match=msg):
                comm.all_reduce_(x)
        with pytest.raises(RuntimeError, match="algo must be 'ring' or 'nccl'"):
            comm.all_reduce_(torch.ones(4), algo="tree")
        with pytest.raises(RuntimeError, match="op must be 'sum', 'avg' or 'max'"):
            comm.all_reduce_(torch.ones(4), op="prod")
        with pytest.raises(RuntimeError, match="op must be 'sum', 'avg' or 'max'"):
            comm.reduce_scatter_(torch.ones(4), op="min")
        with pytest.raises(RuntimeError, match="accumulate_fp32 needs algo='ring'"):
            comm.all_reduce_(torch.ones(4, dtype=torch.float16), algo="nccl", accumulate_fp32=True)
        comm.abort()
        with pytest.raises(RuntimeError, match="aborted"):
            comm.all_reduce_(torch.ones(4))
        return True

    results, errors = run_ranks(1, fn)
    assert errors == [None] and results == [True]


def test_unique_id_of_wrong_size_is_refused():
    from llmkern.parallel.nccl import comm_class

    with pytest.raises(RuntimeError, match="128 bytes"):
        comm_class("emu")(torch.zeros(5, dtype=torch.uint8), 0, 1, -1)
    with pytest.raises(RuntimeError, match=r"rank must be in \[0, 2\)"):
        comm_class("emu")(torch.zeros(128, dtype=torch.uint8), 2, 2, -1)


@pytest.mark.skipif(_ext.available("_C_cuda"), reason="llmkern._C_cuda is built here")
def test_missing_cuda_extension_is_explained():
    from llmkern.parallel.nccl import comm_class

    with pytest.raises(RuntimeError, match=r"llmkern\._C_cuda is not built"):
        comm_class("cuda")


# --- the store a process group's communicator bootstraps from --------------------------------------


def _store_roundtrip(rank, world):
    from llmkern.parallel.nccl import group_store

    sub = dist.new_group([0, 1])
    got = []
    for group in (None, sub):
        store = dist.PrefixStore("llmkern_nccl/test/", group_store(group))
        if rank == 0:
            store.set("id", f"{group is None}".encode())
        got.append(store.get("id"))
    return got


@pytest.mark.distributed
def test_group_store_is_shared_by_the_ranks_of_each_group():
    # The default group's and a subgroup's stores are distinct PrefixStores over the same TCPStore.
    assert run_distributed(_store_roundtrip, 2, timeout=60) == [[b"True", b"False"]] * 2
