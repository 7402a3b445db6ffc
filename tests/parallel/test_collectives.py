"""llmkern.parallel.collectives on real gloo ranks against torch.distributed and an fp64 oracle.

Every collective x backend ("ring", "torch") x dtype x world 1-4 x length (0, 1, 97, 1025, 4099) runs
inside one run_distributed call per world size (starting ranks costs more than the calls). Integer
and fp64 results must equal torch.distributed's exactly (the fp64 inputs are multiples of 2^-10 whose
sums are exact in any order); low-precision results must be as close to the fp64 sum as plain PyTorch
adding the ranks' tensors in the same dtype is, within the 2x rule; maxima are exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmkern.parallel import collectives as C
from llmkern.parallel import groups, ring
from llmkern.parallel.mesh import ParallelConfig, init_mesh
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.distributed

LENGTHS = (0, 1, 97, 1025, 4099)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64)


def _data(rank: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 131 + rank)
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)
    if dtype == torch.float64:  # exactly summable in any order
        return torch.randint(-2**20, 2**20, (n,), generator=g).double() / 1024
    if n < 1025:
        # A maximum over a few elements says little about rounding (one element summed in another
        # order lands 3x further off by chance: gloo's own bf16 reduce-scatter did on 25 elements);
        # short lengths test the chunking, with small integers that every dtype sums exactly.
        # Precision is judged on 1025 and 4099 elements.
        return torch.randint(-8, 9, (n,), generator=g).to(dtype)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _ops(dtype):
    return ("sum", "avg", "max") if dtype.is_floating_point else ("sum", "max")


def _reduce_all(xs, op, dtype):
    """(fp64 oracle, plain PyTorch in dtype adding rank by rank)."""
    if op == "max":
        m = torch.stack(xs).amax(0)
        return m.double(), m
    ref = torch.stack([x.double() for x in xs]).sum(0)
    base = xs[0].clone()
    for x in xs[1:]:
        base = base + x
    if op == "avg":
        ref, base = ref / len(xs), base / len(xs)
    return ref, base


def _judge(out, xs, op, dtype, name, failures):
    ref, base = _reduce_all(xs, op, dtype)
    try:
        if op == "max" or dtype in (torch.float64, torch.int64):
            exact = ref.to(dtype) if dtype.is_floating_point else ref.round().to(dtype)
            assert torch.equal(out, exact if op != "max" else base), f"{name}: not exact"
        else:
            assert_close_to_ref(out, ref, base, name=name)
    except AssertionError as e:
        failures.append(str(e)[:300])


def _sweep(rank, world):
    failures, checked = [], 0
    seed = 0
    for backend in ("ring", "torch"):
        for dtype in DTYPES:
            for n in LENGTHS:
                seed += 1
                xs = [_data(r, n, dtype, seed) for r in range(world)]
                for op in _ops(dtype):
                    name = f"world {world} {backend} {dtype} n={n} op={op}"
                    # all_reduce_, and torch.distributed itself on the same data for exact dtypes
                    out = xs[rank].clone()
                    C.all_reduce_(out, op=op, backend=backend)
                    _judge(out, xs, op, dtype, f"all_reduce_ {name}", failures)
                    if dtype in (torch.float64, torch.int64) and op == "sum":
                        theirs = xs[rank].clone()
                        dist.all_reduce(theirs)
                        if not torch.equal(out, theirs):
                            failures.append(f"all_reduce_ {name}: differs from dist.all_reduce")
                    # reduce_scatter on the padded buffer: rank r owns chunk r, as reduce_scatter_tensor
                    padded = ring.padded_numel(n, world)
                    ys = [torch.cat([x, x.new_zeros(padded - n)]) for x in xs]
                    k = padded // world
                    shard = C.reduce_scatter(ys[rank].clone(), op=op, backend=backend)
                    full = torch.empty(padded, dtype=dtype)  # every rank's shard, judged as a whole
                    dist.all_gather_single(full, shard.clone())
                    _judge(full, ys, op, dtype, f"reduce_scatter {name}", failures)
                    if dtype == torch.int64 and op == "sum":
                        theirs = torch.empty(k, dtype=dtype)
                        dist.reduce_scatter_single(theirs, ys[rank].clone())
                        if not torch.equal(shard, theirs):
                            failures.append(f"reduce_scatter {name}: differs from dist.reduce_scatter_single")
                    checked += 2
                # all_gather of this rank's k-element shard, and broadcast from the last rank
                k = ring.padded_numel(n, world) // world
                shards = [x[:k] if x.numel() >= k else torch.cat([x, x.new_zeros(k - x.numel())]) for x in xs]
                gathered = C.all_gather(shards[rank].clone(), backend=backend)
                if not torch.equal(gathered, torch.cat(shards)):
                    failures.append(f"all_gather world {world} {backend} {dtype} k={k}")
                b = xs[rank].clone()
                C.broadcast_(b, world - 1, backend=backend)
                if not torch.equal(b, xs[world - 1]):
                    failures.append(f"broadcast_ world {world} {backend} {dtype} n={n}")
                checked += 2
    return failures, checked


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_collective_matches_torch_distributed(world):
    for failures, checked in run_distributed(_sweep, world, timeout=300):
        assert checked > 200
        assert not failures, failures[:5]


def _bytes_and_counts(rank, world):
    n = 1025
    with C.counting() as c:
        C.all_reduce_(torch.ones(n))
        C.reduce_scatter(torch.ones(ring.padded_numel(n, world)))
        C.all_gather(torch.ones(7))
        C.all_reduce_(torch.ones(n, dtype=torch.bfloat16), backend="torch")
    return ({k: (v.calls, v.elements, v.bytes_sent) for k, v in c.snapshot().items()},
            C.COUNTER.get("all_reduce").calls)


def test_counter_bytes_per_rank_sum_to_the_ring_formula():
    world = 3
    results = run_distributed(_bytes_and_counts, world, timeout=60)
    n, padded = 1025, ring.padded_numel(1025, 3)
    for counts, total_all_reduce_calls in results:
        assert counts[("world", "all_reduce")][:2] == (2, 2 * n)
        assert counts[("world", "reduce_scatter")][:2] == (1, padded)
        assert counts[("world", "all_gather")][:2] == (1, 21)
        assert total_all_reduce_calls >= 2
        assert counts[("world", "reduce_scatter")][2] == (world - 1) * padded // world * 4
        assert counts[("world", "all_gather")][2] == (world - 1) * 7 * 4
    # an all-reduce sends 2(w-1)/w of the buffer per rank: exactly 2(w-1)·bytes over the ring
    fp32, bf16 = 2 * (world - 1) * n * 4, 2 * (world - 1) * n * 2
    assert sum(r[0][("world", "all_reduce")][2] for r in results) == fp32 + bf16


def _axes(rank, world):
    mesh = init_mesh(ParallelConfig(tp=2))
    with C.counting() as c:
        C.all_reduce_(torch.ones(10), "tp")
        C.all_reduce_(torch.ones(10), mesh["dp"])
        C.all_reduce_(torch.ones(10), mesh["tp"])
        C.record_collective("all_reduce", "tp", elements=5, bytes_sent=3)  # as an autograd collective would
        tp = torch.full((4,), float(rank))
        C.all_reduce_(tp, "tp")
    return (c.get("all_reduce", "tp").calls, c.get("all_reduce", "dp").calls, c.get(group="tp").bytes_sent,
            tp.tolist(), mesh["tp"].get_group().group_name != mesh["dp"].get_group().group_name)


def test_counter_per_mesh_axis():
    for rank, (tp_calls, dp_calls, tp_bytes, tp_sum, distinct) in enumerate(run_distributed(_axes, 4, timeout=60)):
        assert (tp_calls, dp_calls) == (4, 1) and distinct
        # a 2-rank all-reduce sends 2(2-1)/2 = all of its bytes: 2 x 40 + 16, plus the recorded 3
        assert tp_bytes == 2 * 10 * 4 + 4 * 4 + 3
        pair = [2 * (rank // 2), 2 * (rank // 2) + 1]  # tp groups are adjacent ranks
        assert tp_sum == [float(sum(pair))] * 4


def _async_and_noncontiguous(rank, world):
    out = {}
    hs = [C.all_reduce_(torch.full((1000,), float(rank + i)), async_op=True) for i in range(4)]
    hs.append(C.reduce_scatter(torch.arange(8.0) + rank, async_op=True))
    hs.append(C.all_gather(torch.full((3,), float(rank)), async_op=True))
    synced = torch.ones(5)
    C.all_reduce_(synced)  # a synchronous call queued behind the asynchronous ones
    out["async"] = [h.wait()[:3].tolist() for h in reversed(hs)]
    out["sync"] = synced.tolist()
    out["completed"] = all(h.is_completed() for h in hs)
    out["bytes"] = hs[0].outcome.bytes_sent
    t = (torch.arange(12.0).view(3, 4) + rank).t()  # non-contiguous
    C.all_reduce_(t, op="max")
    out["max_t"] = t.tolist()
    x = (torch.arange(16.0) + 100 * rank)[::2]  # non-contiguous input of 8 elements
    out["rs_nc"] = C.reduce_scatter(x).tolist()
    big = torch.zeros(4, 3)
    C.all_gather(torch.full((6,), float(rank)), big.t())  # non-contiguous output
    out["ag_nc"] = big.t().reshape(-1).tolist()
    empty = torch.zeros(0, 5)
    out["empty"] = tuple(C.all_reduce_(empty).shape)
    return out


def test_async_handles_noncontiguous_and_empty_tensors():
    results = run_distributed(_async_and_noncontiguous, 2, timeout=60)
    for rank, out in enumerate(results):
        assert out["sync"] == [2.0] * 5 and out["completed"]
        gathered, rs = out["async"][0], out["async"][1]
        assert gathered == [0.0, 0.0, 0.0]  # rank 0's shard comes first
        assert rs == [float(2 * (4 * rank + i) + 1) for i in range(3)]  # chunk `rank` of the summed arange
        assert out["async"][2:] == [[7.0] * 3, [5.0] * 3, [3.0] * 3, [1.0] * 3]
        assert out["bytes"] == 1000 * 4  # 2(w-1)/w of 4000 bytes at w = 2
        assert out["max_t"] == (torch.arange(12.0).view(3, 4) + 1).t().tolist()
        both = torch.stack([torch.arange(16.0)[::2], (torch.arange(16.0) + 100)[::2]]).sum(0)
        assert out["rs_nc"] == both[rank * 4:(rank + 1) * 4].tolist()
        assert out["ag_nc"] == [0.0] * 6 + [1.0] * 6
        assert out["empty"] == (0, 5)


def _accumulate(rank, world):
    x = torch.full((1001,), 1.0 if rank == 0 else 2**-9, dtype=torch.bfloat16)
    lo = x.clone()
    C.all_reduce_(x, accumulate_dtype=torch.float32)
    C.all_reduce_(lo)
    y = torch.full((8,), 1.0 if rank == 0 else 2**-9, dtype=torch.bfloat16)
    shard = C.reduce_scatter(y, accumulate_dtype=torch.float32)
    errors = []
    for t, acc in ((torch.full((4,), 1.5), torch.int32), (torch.ones(4), torch.bfloat16),
                   (torch.ones(4, dtype=torch.int64), torch.float64)):
        try:
            C.all_reduce_(t, accumulate_dtype=acc)
        except ValueError as e:
            errors.append(str(e))
    return x, lo, shard, errors


def test_accumulate_dtype():
    """1 + 3·2^-9 = 1.0078 rounded once in bf16; summed in bf16, the chunk whose trip round the ring
    starts at rank 0 (1.0) loses each 2^-9 (a quarter ulp) and stays 1.0. Accumulate dtypes that
    truncate (int32: 1.5 + 1.5 = 2), narrow (bf16 for fp32 data) or apply to integers are refused."""
    for x, lo, shard, errors in run_distributed(_accumulate, 4, timeout=60):
        assert (x == 1.0078125).all() and (shard == 1.0078125).all()
        assert (lo == 1.0).any()
        assert len(errors) == 3
        assert "not a floating-point dtype" in errors[0] and "1.5 + 1.5 would give 2" in errors[0]
        assert "narrower than the data's torch.float32" in errors[1]
        assert "reduced exactly in their own dtype" in errors[2]


def _bad_input(rank, world):
    errors = []
    cases = [
        lambda: C.reduce_scatter(torch.ones(7)),
        lambda: C.reduce_scatter(torch.ones(8), torch.ones(3)),
        lambda: C.all_gather(torch.ones(3), torch.ones(5)),
        lambda: C.all_reduce_(torch.ones(3, dtype=torch.int32), op="avg"),
        lambda: C.all_reduce_(torch.ones(3), op="prod"),
        lambda: C.all_reduce_(torch.ones(3), backend="nccl"),
        lambda: C.all_reduce_(torch.ones(3, device="meta")),
        lambda: C.broadcast_(torch.ones(3), src=5),
        lambda: C.send(torch.ones(3), rank),
        lambda: C.send(torch.ones(3), 1 - rank, tag=2**30),
        lambda: C.all_reduce_(torch.ones(3), "nope"),
        lambda: C.all_reduce_(torch.ones(3), timeout=0),
    ]
    for case in cases:
        try:
            case()
            errors.append(None)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    ok = torch.ones(3)
    C.all_reduce_(ok)  # nothing was sent by the refused calls: the group is in step
    return errors, ok.tolist()


def test_bad_input_is_refused_before_anything_is_sent():
    expected = ["multiple of the group's world size (2) elements", "output must hold input.numel() / world = 4",
                "world * shard.numel() = 6", "op='avg' needs a floating-point tensor", "op must be one of",
                "backend must be one of", "on the CPU or a CUDA device", "src must be a rank of the group",
                "must be another rank of the group", "tag must be in [0, 2^30)", "no mesh axis named 'nope'",
                "timeout must be a positive number"]
    for errors, ok in run_distributed(_bad_input, 2, timeout=60):
        assert ok == [2.0] * 3
        for msg, want in zip(errors, expected):
            assert msg is not None and want in msg, (want, msg)


def _send_recv(rank, world):
    if rank == 0:
        h = C.send(torch.arange(5.0), 1, tag=7, async_op=True)
        C.send(torch.arange(3, dtype=torch.int64), 1)
        h.wait()
        got = torch.empty(2)
        C.recv(got, 1)
    else:
        a, b = torch.empty(5), torch.empty(3, dtype=torch.int64)
        hb = C.recv(b, 0, async_op=True)  # tag 0, posted before the tag-7 receive
        C.recv(a, 0, tag=7)
        hb.wait()
        C.send(a[:2] + b[:2], 0)
        got = torch.cat([a, b.double()])
    counts = C.COUNTER.snapshot()
    return got.tolist(), counts[("world", "send")].bytes_sent, counts[("world", "recv")].calls


def test_send_recv_with_tags():
    (got0, sent0, recvs0), (got1, sent1, recvs1) = run_distributed(_send_recv, 2, timeout=60)
    assert got1 == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0]
    assert got0 == [0.0, 2.0]
    assert (sent0, recvs0) == (5 * 4 + 3 * 8, 1) and (sent1, recvs1) == (2 * 4, 2)


def test_group_labels_and_resolution():
    with pytest.raises(RuntimeError, match="not initialized"):
        groups.resolve(None)
    assert groups.tag(1, 2) == (1 << 30) | (1 << 20) | 2
    assert groups.tag(1024 + 1, (1 << 20) + 2) == groups.tag(1, 2)  # both wrap


def _twins(rank, world):
    st = groups.state(groups.resolve(None))
    mismatches, sent_pairs = [], []
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            for op in ("sum", "avg", "max") if dtype.is_floating_point else ("sum", "max"):
                for n, segment in ((0, 64), (1, 64), (4099, 40), (ring.padded_numel(1025, world), 0)):
                    if kind != "all_reduce" and n % world:
                        continue
                    x = _data(rank, n, dtype, n + world)
                    a, b = x.clone(), x.clone()
                    sa = ring.run(a, st, st.next_seq(), kind, op, 30.0, segment)
                    sb = ring.run_python(b, st, st.next_seq(), kind, op, 30.0, segment)
                    sent_pairs.append((sa, sb))
                    if not torch.equal(a, b):
                        mismatches.append(f"{kind} {op} {dtype} n={n} segment={segment}")
    return mismatches, sent_pairs


@pytest.mark.parametrize("world", [2, 3])
def test_cpp_ring_loop_equals_its_python_twin(world):
    """csrc/comm/gloo_ring.cpp and ring.run_python run the same schedule, segments and arithmetic: the
    results are bit for bit equal (tiny segments: many per chunk, a partial last one)."""
    for mismatches, sent_pairs in run_distributed(_twins, world, timeout=120):
        assert not mismatches, mismatches
        assert all(a == b for a, b in sent_pairs)


def _opcheck(rank, world):
    st = groups.state(groups.resolve(None))
    op = ring.ring_op()
    x = torch.arange(12.0) + rank
    args = (st.pg.group_name, "all_reduce", "sum", groups.tag(st.next_seq(), 0), 30.0, 0)
    torch.library.opcheck(op, (x.clone(), *args))  # every rank runs the same calls: they pair up
    compiled = torch.compile(lambda t: op(t, *args), fullgraph=True)
    y = x.clone()
    compiled(y)
    return y.tolist()


def test_ring_op_passes_opcheck_and_compiles():
    for y in run_distributed(_opcheck, 2, timeout=300):
        assert y == (2 * torch.arange(12.0) + 1).tolist()
