"""Tensor-parallel layers on real gloo ranks (tp = 2 and 4) against the dense layers.

Each rank builds the dense layer from the same seed, keeps its slice (ColumnParallelLinear.from_linear
and friends) and runs forward and backward; the split outputs and gradients are all-gathered
(gather_full) and judged against the dense layer in fp64 by the 2x/3x rule, with the dense layer in
the same dtype as the baseline. Sizes include ones tp divides (64) and ones it does not (97 and 33:
padded), non-contiguous and empty inputs, fp32 and bf16; LoRA with dropout runs on column and row
shards. Replicated results must also be bitwise equal on every rank. One run per world size computes every case; the tests read it.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.distributed

DTYPES = (torch.float32, torch.bfloat16)


def _fwd_bwd(fn, inputs: list[torch.Tensor], gy: torch.Tensor, params: list[torch.Tensor]):
    """fn(*inputs) and the grads of sum(y * gy) w.r.t. inputs and params."""
    y = fn(*inputs)
    leaves = [t for t in inputs + params if t.requires_grad]
    grads = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    return y.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _leaf(t: torch.Tensor, dtype, requires_grad=True) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(requires_grad)


def _noncontiguous(shape, gen):
    """A tensor of `shape` (..., C) whose storage is laid out transposed."""
    t = torch.randn(*reversed(shape), generator=gen)
    return t.permute(*reversed(range(len(shape))))


def _record(out, name, actual, ref, base, grad=False):
    out[name] = (actual, ref, base, grad)


def _linear_cases(rank, world, pg, out):
    from llmkern.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, ShardLayout, gather_full

    gen = torch.Generator().manual_seed(11)
    for c_in, c_out in ((33, 97), (64, 64)):
        torch.manual_seed(c_in)
        dense = nn.Linear(c_in, c_out)
        for tokens in ((3, 5), (0,)):
            x = _noncontiguous((*tokens, c_in), gen)
            gy = torch.randn(*tokens, c_out, generator=gen)
            for dtype in DTYPES:
                tag = f"{c_in}x{c_out}/{'x'.join(map(str, tokens))}/{str(dtype)[6:]}"
                ref_m, base_m = _dense_pair(dense, dtype)
                ref = _fwd_bwd(ref_m, [_leaf(x, torch.float64)], gy.double(), [ref_m.weight, ref_m.bias])
                base = _fwd_bwd(base_m, [_leaf(x, dtype)], gy.to(dtype), [base_m.weight, base_m.bias])
                # column-parallel, output gathered and not
                for gather in (True, False):
                    col = ColumnParallelLinear.from_linear(base_m, pg, gather_output=gather)
                    lay = ShardLayout(c_out, world, rank, x.dim() - 1)
                    g_in = gy.to(dtype) if gather else lay.shard(gy.to(dtype))
                    y, (gx, gw, gb) = _fwd_bwd(col, [_leaf(x, dtype)], g_in, [col.weight, col.bias])
                    y = y if gather else gather_full(y, lay, pg)
                    gw, gb = gather_full(gw, col.layout, pg), gather_full(gb, col.layout, pg)
                    name = f"column/{'gather' if gather else 'split'}/{tag}"
                    _record(out, name + "/y", y, ref[0], base[0])
                    _record(out, name + "/grads", [gx, gw, gb], ref[1], base[1], grad=True)
                # row-parallel, input split by the caller or by the layer
                for parallel_in in (True, False):
                    row = RowParallelLinear.from_linear(base_m, pg, input_is_parallel=parallel_in)
                    x_lay = ShardLayout(c_in, world, rank, x.dim() - 1)
                    x_in = x_lay.shard(x.to(dtype)) if parallel_in else x.to(dtype)
                    y, (gx, gw, gb) = _fwd_bwd(row, [_leaf(x_in, dtype)], gy.to(dtype), [row.weight, row.bias])
                    if parallel_in:
                        gx = gather_full(gx, x_lay, pg)
                    gw = gather_full(gw, row.layout, pg)
                    name = f"row/{'split_in' if parallel_in else 'full_in'}/{tag}"
                    _record(out, name + "/y", y, ref[0], base[0])
                    _record(out, name + "/grads", [gx, gw, gb], ref[1], base[1], grad=True)
                    out.setdefault("replicated", []).append((name, y))


def _dense_pair(dense: nn.Linear, dtype):
    ref = nn.Linear(dense.in_features, dense.out_features, dtype=torch.float64)
    base = nn.Linear(dense.in_features, dense.out_features, dtype=dtype)
    ref.load_state_dict(dense.state_dict())
    base.load_state_dict(dense.state_dict())
    return ref, base


def _sequence_parallel_cases(rank, world, pg, out):
    """Column(sequence_parallel) -> GELU -> Row(sequence_parallel) on (B, T/tp, C) shards."""
    from llmkern.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, ShardLayout, gather_full

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    up, down = nn.Linear(24, 97), nn.Linear(97, 24)
    x = torch.randn(2, 4 * world, 24, generator=gen)
    gy = torch.randn(2, 4 * world, 24, generator=gen)

    def dense_fn(m1, m2):
        return lambda t: m2(F.gelu(m1(t)))

    ref_up, _ = _dense_pair(up, torch.float32)
    ref_down, _ = _dense_pair(down, torch.float32)
    ref_up, ref_down = ref_up.double(), ref_down.double()
    ref = _fwd_bwd(dense_fn(ref_up, ref_down), [_leaf(x, torch.float64)], gy.double(),
                   [ref_up.weight, ref_up.bias, ref_down.weight, ref_down.bias])
    base = _fwd_bwd(dense_fn(up, down), [_leaf(x, torch.float32)], gy,
                    [up.weight, up.bias, down.weight, down.bias])
    col = ColumnParallelLinear.from_linear(up, pg, sequence_parallel=True)
    row = RowParallelLinear.from_linear(down, pg, sequence_parallel=True)
    seq = ShardLayout(x.shape[1], world, rank, 1)
    y, (gx, gw1, gb1, gw2, gb2) = _fwd_bwd(dense_fn(col, row), [_leaf(seq.shard(x), torch.float32)], seq.shard(gy),
                                          [col.weight, col.bias, row.weight, row.bias])
    grads = [gather_full(gx, seq, pg), gather_full(gw1, col.layout, pg), gather_full(gb1, col.layout, pg),
             gather_full(gw2, row.layout, pg), gb2]
    _record(out, "sequence_parallel/y", gather_full(y, seq, pg), ref[0], base[0])
    _record(out, "sequence_parallel/grads", grads, ref[1], base[1], grad=True)


def _embedding_cases(rank, world, pg, out):
    from llmkern.parallel.tensor_parallel import VocabParallelEmbedding, gather_full

    gen = torch.Generator().manual_seed(3)
    for vocab in (97, 64):
        torch.manual_seed(vocab)
        dense = nn.Embedding(vocab, 16, padding_idx=3)
        ids = torch.randint(0, vocab, (4, 7), generator=gen)
        ids[0, :3] = torch.tensor([0, vocab - 1, 3])
        gy = torch.randn(4, 7, 16, generator=gen)
        for dtype in DTYPES:
            ref_m = nn.Embedding(vocab, 16, padding_idx=3, dtype=torch.float64)
            base_m = nn.Embedding(vocab, 16, padding_idx=3, dtype=dtype)
            ref_m.load_state_dict(dense.state_dict())
            base_m.load_state_dict(dense.state_dict())
            ref = _fwd_bwd(ref_m, [ids], gy.double(), [ref_m.weight])
            base = _fwd_bwd(base_m, [ids], gy.to(dtype), [base_m.weight])
            emb = VocabParallelEmbedding.from_embedding(base_m, pg)
            y, (gw,) = _fwd_bwd(emb, [ids], gy.to(dtype), [emb.weight])
            name = f"embedding/{vocab}/{str(dtype)[6:]}"
            _record(out, name + "/y", y, ref[0], base[0])
            _record(out, name + "/grads", [gather_full(gw, emb.layout, pg)], ref[1], base[1], grad=True)
            out.setdefault("replicated", []).append((name, y))


def _cross_entropy_cases(rank, world, pg, out):
    from llmkern.parallel.tensor_parallel import ShardLayout, gather_full, vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(7)
    for vocab, n in ((97, 37), (64, 16), (97, 0)):
        logits = torch.randn(n, vocab, generator=gen) * 3
        labels = torch.randint(0, vocab, (n,), generator=gen)
        labels[::5] = -100
        lay = ShardLayout(vocab, world, rank, 1)
        for dtype in DTYPES:
            for eps in (0.0, 0.1):
                for reduction in ("mean", "sum", "none"):
                    kw = {"ignore_index": -100, "label_smoothing": eps, "reduction": reduction}
                    gy = torch.randn((n,) if reduction == "none" else (), generator=gen)
                    ref = _fwd_bwd(lambda z: F.cross_entropy(z, labels, **kw), [_leaf(logits, torch.float64)],
                                   gy.double(), [])
                    base = _fwd_bwd(lambda z: F.cross_entropy(z, labels, **kw), [_leaf(logits, dtype)],
                                    gy.to(dtype), [])
                    loss, (g,) = _fwd_bwd(lambda z: vocab_parallel_cross_entropy(z, labels, pg, vocab_size=vocab,
                                                                                 **kw),
                                          [_leaf(lay.shard(logits), dtype)], gy.to(dtype), [])
                    name = f"cross_entropy/{vocab}x{n}/{str(dtype)[6:]}/eps{eps}/{reduction}"
                    _record(out, name + "/loss", loss, ref[0], base[0])
                    _record(out, name + "/grads", [gather_full(g, lay, pg)], ref[1], base[1], grad=True)
    # every label ignored: mean is NaN (0 / 0), as F.cross_entropy; the gradient is 0
    labels = torch.full((5,), -100)
    z = _leaf(ShardLayout(97, world, rank, 1).shard(torch.randn(5, 97, generator=gen)), torch.float32)
    loss = vocab_parallel_cross_entropy(z, labels, pg, vocab_size=97)
    loss.backward()
    out["cross_entropy_all_ignored"] = (loss.item(), z.grad.abs().max().item())


def _lora(c_in: int, c_out: int, dtype, seed: int):
    """A LoRALinear with dropout 0.25 and a non-zero B (B = 0 would hide A's gradient and the mask)."""
    from llmkern.nn import LoRALinear

    torch.manual_seed(seed)
    m = LoRALinear(c_in, c_out, r=3, alpha=6, dropout=0.25, dtype=torch.float64)
    with torch.no_grad():
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return m.to(dtype)


def _factors(m) -> list[torch.Tensor]:
    return [m.lora_A.weight, m.lora_B.weight]


def _lora_cases(rank, world, pg, out):
    """LoRA with dropout 0.25 on column- and row-parallel layers: the same seed draws the single-device
    mask on a column shard and its columns on a row shard (col_offset/row_stride of the fused op), so
    output and every factor's gradient equal the dense LoRALinear's. C_in 9 at tp 4 leaves the last row
    rank no dense column (per rank 3, rank 3 all padding); 33 pads the last block (tp 2: 17 + 16)."""
    from llmkern.parallel.tensor_parallel import (ColumnParallelLoRALinear, RowParallelLoRALinear, ShardLayout,
                                                  gather_full)

    gen = torch.Generator().manual_seed(13)
    for c_in, c_out in ((33, 20), (9, 12)):
        x = _noncontiguous((2, 5, c_in), gen)
        gy = torch.randn(2, 5, c_out, generator=gen)
        for dtype in DTYPES:
            tag = f"{c_in}x{c_out}/{str(dtype)[6:]}"
            ref_m, base_m = _lora(c_in, c_out, torch.float64, c_in), _lora(c_in, c_out, dtype, c_in)
            torch.manual_seed(1)  # the dropout seed each forward draws
            ref = _fwd_bwd(ref_m, [_leaf(x, torch.float64)], gy.double(), _factors(ref_m))
            torch.manual_seed(1)
            base = _fwd_bwd(base_m, [_leaf(x, dtype)], gy.to(dtype), _factors(base_m))
            col = ColumnParallelLoRALinear.from_lora(base_m, pg)
            lay = ShardLayout(c_out, world, rank, 2)
            torch.manual_seed(1)
            y, (gx, ga, gb) = _fwd_bwd(col, [_leaf(x, dtype)], lay.shard(gy.to(dtype)), _factors(col))
            _record(out, f"lora/column/{tag}/y", gather_full(y, lay, pg), ref[0], base[0])
            _record(out, f"lora/column/{tag}/grads", [gx, ga, gather_full(gb, col.layout, pg)], ref[1], base[1],
                    grad=True)
            row = RowParallelLoRALinear.from_lora(base_m, pg)
            x_lay = ShardLayout(c_in, world, rank, 2)
            torch.manual_seed(1)
            y, (gx, ga, gb) = _fwd_bwd(row, [_leaf(x_lay.shard(x.to(dtype)), dtype)], gy.to(dtype), _factors(row))
            _record(out, f"lora/row/{tag}/y", y, ref[0], base[0])
            _record(out, f"lora/row/{tag}/grads", [gather_full(gx, x_lay, pg), gather_full(ga, row.layout, pg), gb],
                    ref[1], base[1], grad=True)
            out.setdefault("lora_kernels", []).append((col.kernel(), row.kernel()))


def _layer_cases(rank, world):
    pg = dist.group.WORLD
    out = {}
    _linear_cases(rank, world, pg, out)
    _lora_cases(rank, world, pg, out)
    _sequence_parallel_cases(rank, world, pg, out)
    _embedding_cases(rank, world, pg, out)
    _cross_entropy_cases(rank, world, pg, out)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"tp{w}")
def layer_results(request):
    return run_distributed(_layer_cases, request.param, timeout=240)


def _check(results, prefix):
    names = [k for k in results[0] if k.startswith(prefix)]
    assert names, prefix
    for rank, res in enumerate(results):
        for name in names:
            actual, ref, base, grad = res[name]
            assert_close_to_ref(actual, ref, base, grad=grad, name=f"rank {rank} {name}")


def test_column_parallel_linear(layer_results):
    _check(layer_results, "column/")


def test_row_parallel_linear(layer_results):
    _check(layer_results, "row/")


def test_lora_with_dropout_on_column_and_row_shards(layer_results):
    _check(layer_results, "lora/")
    world = len(layer_results)
    for rank, res in enumerate(layer_results):
        col, row = res["lora_kernels"][0]  # C_in 33: per rank ceil(33 / tp)
        per = -(-33 // world)
        start, stop = min(rank * per, 33), min((rank + 1) * per, 33)
        assert col == "fused lora_linear, dropout 0.25: the single-device mask (every rank holds the whole input)"
        assert row == (f"fused lora_linear, dropout 0.25: columns [{start}, {stop}) of the 33-column single-device "
                       f"mask (col_offset={start}, row_stride=33)")


def test_sequence_parallel_pair(layer_results):
    _check(layer_results, "sequence_parallel/")


def test_vocab_parallel_embedding(layer_results):
    _check(layer_results, "embedding/")


def test_vocab_parallel_cross_entropy(layer_results):
    _check(layer_results, "cross_entropy/")
    for loss, grad in (r["cross_entropy_all_ignored"] for r in layer_results):
        assert loss != loss and grad == 0.0  # NaN mean, zero gradient


def test_replicated_outputs_are_equal_on_every_rank(layer_results):
    first = layer_results[0]["replicated"]
    for res in layer_results[1:]:
        for (name, y0), (_, y) in zip(first, res["replicated"]):
            assert torch.equal(y0, y), name
