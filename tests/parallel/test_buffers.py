"""llmkern.parallel.buffers: the flat padded layout, and the GradBuffer with DDP's all-reduce and ZeRO's
reduce-scatter reducers plugged in (real gloo ranks against single-process gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmkern.parallel import AllReduce, FlatLayout, GradBuffer, ReduceScatter
from llmkern.testing import run_distributed


def test_layout_reverse_order_dtypes_caps_and_padding():
    ps = [torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16), torch.zeros(7), torch.zeros(100),
          torch.zeros(5, dtype=torch.bfloat16), torch.zeros(2)]
    layout = FlatLayout(ps, bucket_bytes=80, pad_to=3)
    # reverse registration order: ps[5], ps[4], ..., ps[0]
    assert [id(p) for p in layout.params] == [id(p) for p in reversed(ps)]
    plan = [(b.dtype, [layout.params[i].numel() for i in b.params], b.numel, b.padded_numel) for b in layout.buckets]
    assert plan == [
        (torch.float32, [2], 2, 3),  # 2 + 100 floats would exceed 80 bytes: 100 gets a bucket of its own
        (torch.bfloat16, [5, 3], 8, 9),  # one dtype per bucket, still open while floats come by
        (torch.float32, [100], 100, 102),
        (torch.float32, [7, 10], 17, 18),
    ]
    assert layout.buckets[3].offsets == (0, 7)
    assert [layout.shard(3, r, 3) for r in range(3)] == [(0, 6), (6, 6), (12, 6)]
    assert layout.padded_numel == 3 + 9 + 102 + 18 and layout.numel == 2 + 8 + 100 + 17
    with pytest.raises(ValueError, match="not a multiple of world size 4"):
        layout.shard(0, 0, 4)
    with pytest.raises(ValueError, match="bucket_bytes and first_bucket_bytes must be positive"):
        FlatLayout(ps, bucket_bytes=0)
    # a small first bucket (the last layers' gradients) starts communication early in backward
    small_first = FlatLayout([torch.zeros(4) for _ in range(6)], bucket_bytes=64, first_bucket_bytes=16)
    assert [b.numel for b in small_first.buckets] == [4, 16, 4]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 31), nn.GELU(), nn.Linear(31, 17), nn.GELU(), nn.Linear(17, 5))


class _Recording:
    """A reducer that records the order buckets are launched in, around another reducer."""

    def __init__(self, inner):
        self.inner, self.order = inner, []

    def launch(self, bucket):
        self.order.append(bucket.spec.index)
        return self.inner.launch(bucket)

    def finish(self, bucket):
        self.inner.finish(bucket)


def _reduce(rank, world, kind):
    m = _model()
    ref = _model()
    params = list(m.parameters())
    inner = AllReduce(timeout_s=60) if kind == "all_reduce" else ReduceScatter(timeout_s=60)
    reducer = _Recording(inner)
    buf = GradBuffer(params, reducer, bucket_bytes=600, pad_to=world, names=[n for n, _ in m.named_parameters()])
    x = torch.randn(4 * world, 13, generator=torch.Generator().manual_seed(5))
    y = m(x[rank * 4:(rank + 1) * 4])
    # the loss reads the first layer's output again: its gradients arrive last, out of layout order
    (y.sum() + m[0](x[rank * 4:(rank + 1) * 4]).pow(2).mean()).backward()
    ref_y = ref(x)
    (ref_y.sum() + sum(ref[0](x[r * 4:(r + 1) * 4]).pow(2).mean() for r in range(world))).backward()
    errs = []
    for b in buf.buckets:
        full = torch.zeros(b.spec.padded_numel)
        for i, off in zip(b.spec.params, b.spec.offsets):
            p = buf.layout.params[i]
            q = dict(zip(map(id, params), ref.parameters()))[id(p)]
            full[off:off + p.numel()] = q.grad.reshape(-1) / world
        mine = b.data if kind == "all_reduce" else b.shard(rank, world)
        want = full if kind == "all_reduce" else full.chunk(world)[rank]
        errs.append((mine - want).abs().max().item())
    return errs, reducer.order, len(buf.buckets), buf.stats.last_step_bytes, buf.layout.padded_numel


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["all_reduce", "reduce_scatter"])
def test_grad_buffer_with_all_reduce_and_reduce_scatter(world, kind):
    results = run_distributed(_reduce, world, (kind,), timeout=90)
    for errs, order, nbuckets, sent, padded in results:
        assert max(errs) < 1e-5, errs
        assert nbuckets >= 4 and order == list(range(nbuckets))  # strictly in order
        if kind == "reduce_scatter":
            assert sent == (world - 1) * padded // world * 4  # (w-1)/w of every padded bucket
    if kind == "all_reduce":
        assert sum(r[3] for r in results) == 2 * (world - 1) * results[0][4] * 4


def test_grad_buffer_refuses_bad_input():
    with pytest.raises(ValueError, match="one device"):
        GradBuffer([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))], AllReduce(),
                   bucket_bytes=100)
    with pytest.raises(ValueError, match="unused must be 'error' or 'zero'"):
        GradBuffer([nn.Parameter(torch.zeros(2))], AllReduce(), bucket_bytes=100, unused="ignore")
    with pytest.raises(ValueError, match="must be on the CPU or a CUDA device, got meta"):
        GradBuffer([nn.Parameter(torch.zeros(2, device="meta"))], AllReduce(), bucket_bytes=100)
