"""llmkern.parallel.parallelize: tp x dp (with activation checkpointing) and pp x tp at world 4 (3
steps), and 2 x 2 x 2 at world 8 (5 steps), each training a tiny Llama with FusedAdamW and clipping
equal to single-process training on the same global batch; tp2 x ZeRO-1/2/3 (dp 2) likewise, and a checkpoint of
tp2 x ZeRO-2 resumed at dp 4 under ZeRO-3 continuing as the uninterrupted run; the degree checks and
the map of a tp slice's flat range to the dense tensor without processes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from llmkern.testing import run_distributed

STEPS = 3
ROWS = 4  # global batch
SEQ = 8
VOCAB = 97
MAX_NORM = 0.05  # below every step's gradient norm: the clip coefficient depends on the norm


def _llama(layers: int = 4, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=45, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=SEQ * 2,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(100 + step))


def _train(layouts, steps: int = STEPS):
    from llmkern.optim import FusedAdamW
    from llmkern.parallel import ParallelizeConfig, counting, parallelize
    from llmkern.parallel.tensor_parallel import TP_LAYOUT, gather_full

    out = {}
    for name, kw in layouts:
        dense = _llama()
        run = parallelize(copy.deepcopy(dense), ParallelizeConfig(**kw))
        opt, ref_opt = run.optimizer(FusedAdamW, lr=1e-2), FusedAdamW(dense.parameters(), lr=1e-2)
        res = {"loss": [], "ref_loss": [], "norm": [], "ref_norm": []}
        for step in range(steps):
            ids = _batch(step)
            local = run.local_batch(ids)
            with counting() as counter:
                res["loss"].append(run.train_step(local, local).item())
            if step == 0:
                res["tp_all_reduces"] = counter.get("all_reduce", "tp").calls
                res["counts"] = {k: c.calls for k, c in counter.snapshot().items()}
            res["norm"].append(opt.clip_grad_norm_(MAX_NORM).item())
            opt.step()
            opt.zero_grad()
            ref_loss = dense(input_ids=ids, labels=ids).loss
            ref_loss.backward()
            res["ref_loss"].append(ref_loss.item())
            res["ref_norm"].append(ref_opt.clip_grad_norm_(MAX_NORM).item())
            ref_opt.step()
            ref_opt.zero_grad()
        ref = dict(dense.named_parameters())
        diff, seen = 0.0, []
        tp_group = run.mesh["tp"].get_group()
        with run.whole_parameters():  # ZeRO-3 gathers its units; 1 and 2 wait for the last all-gather
            for n, p in run.named_parameters():
                full = gather_full(p, getattr(p, TP_LAYOUT), tp_group) if hasattr(p, TP_LAYOUT) else p.detach()
                diff = max(diff, (full - ref[n]).abs().max().item())
                seen.append(n)
        res.update(diff=diff, seen=seen, scale=max(p.abs().max().item() for p in ref.values()),
                   coords=run.coordinates, dims=(run.dims.dp, run.dims.tp, run.dims.pp))
        out[name] = res
    dist.barrier()
    return out


def _world4(rank, world):
    return _train([("tp2xdp2_ckpt", {"tp": 2, "dp": 2, "activation_checkpointing": True}),
                   ("pp2xtp2", {"tp": 2, "pp": 2, "microbatches": 2})])


def _world4_zero(rank, world, directory):
    # one set of processes for both ZeRO tests: starting 4 ranks that import transformers is ~25 s here
    out = _train([("tp2xzero2", {"tp": 2, "zero_stage": 2}), ("tp2xzero3", {"tp": 2, "zero_stage": 3}),
                  ("tp2xzero1_ckpt", {"tp": 2, "zero_stage": 1, "activation_checkpointing": True}),
                  ("pp2xzero2", {"pp": 2, "zero_stage": 2, "microbatches": 2})])
    out["resumed"] = _save_then_resume(rank, world, directory)
    return out


def _world8(rank, world):
    return _train([("pp2xdp2xtp2", {"tp": 2, "dp": 2, "pp": 2, "microbatches": 2})], steps=5)


def _check(results, name, world):
    for res in (r[name] for r in results):
        # fp32 AdamW for 3 (5) steps: only the order of summation differs from the single process
        for a, b in zip(res["loss"], res["ref_loss"]):
            assert abs(a - b) <= 1e-5 * abs(b), (name, res["loss"], res["ref_loss"])
        for a, b in zip(res["norm"], res["ref_norm"]):
            assert abs(a - b) <= 1e-5 * b, (name, res["norm"], res["ref_norm"])
        assert all(n > MAX_NORM for n in res["ref_norm"])
        assert res["diff"] <= 1e-5 * max(1.0, res["scale"]), (name, res["diff"])
    # every parameter of the model is held by some rank (a pipeline splits the layers)
    names = {n for r in results for n in r[name]["seen"]}
    assert names == {n for n, _ in _llama().named_parameters()}
    dp, tp, pp = results[0][name]["dims"]
    assert dp * tp * pp == world


@pytest.mark.distributed
def test_tp_dp_and_pp_tp_train_like_one_process():
    results = run_distributed(_world4, 4, timeout=300)
    _check(results, "tp2xdp2_ckpt", 4)
    _check(results, "pp2xtp2", 4)
    # tp all-reduces of one step with every layer checkpointed: forward 1 (embedding) + 2 per layer + 2
    # (the loss); backward 2 per layer + 1 (the LM head's entry); the recomputed forward 1 per layer: torch's
    # non-reentrant checkpoint stops recomputing once the saved tensors backward needs are back, before
    # the MLP's closing all-reduce (without checkpointing: 20)
    counts = [r["tp2xdp2_ckpt"]["tp_all_reduces"] for r in results]
    assert counts == [1 + 2 * 4 + 2 + (2 * 4 + 1) + 4] * 4, [r["tp2xdp2_ckpt"]["counts"] for r in results]
    assert [r["tp2xdp2_ckpt"]["coords"] for r in results] == [
        {"pp": 0, "dp": 0, "tp": 0}, {"pp": 0, "dp": 0, "tp": 1}, {"pp": 0, "dp": 1, "tp": 0},
        {"pp": 0, "dp": 1, "tp": 1}]


@pytest.mark.distributed
def test_tp_with_zero_trains_like_one_process_and_resumes_at_another_layout(tmp_path):
    results = run_distributed(_world4_zero, 4, (str(tmp_path / "ckpt"),), timeout=300)
    # ZeRO over dp = 2 on the tp slices: the clipped norm counts every slice once over dp x tp and each
    # replicated norm weight once (a plain ZeroOptimizer would sum a tp slice's squares on one tp rank)
    for name in ("tp2xzero2", "tp2xzero3", "tp2xzero1_ckpt"):
        _check(results, name, 4)
        assert results[0][name]["dims"] == (2, 2, 1)
    _check(results, "pp2xzero2", 4)  # each stage's ZeRO engine over dp 2; the norm sums over dp and pp
    assert results[0]["pp2xzero2"]["dims"] == (2, 1, 2)
    # saved at tp2 x dp2 (ZeRO-2), resumed at dp4 (ZeRO-3), saved, resumed at pp2 x dp2 (ZeRO-1): the
    # uninterrupted single-process run
    for res in (r["resumed"] for r in results):
        assert res["dims"] == [(2, 2, 1), (4, 1, 1), (2, 1, 2)]
        assert res["extra"] == {"step": STEPS}
        for a, b in zip(res["loss"], res["ref_loss"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (res["loss"], res["ref_loss"])
        for a, b in zip(res["norm"], res["ref_norm"], strict=True):
            assert abs(a - b) <= 1e-5 * b, (res["norm"], res["ref_norm"])
        assert res["diff"] <= 1e-5 * max(1.0, res["scale"]), res["diff"]
    # the checkpoint consolidates without a process group into the weights the run held when saving
    from llmkern.parallel.checkpoint import consolidate

    weights = consolidate(tmp_path / "ckpt-2", tmp_path / "model.safetensors")
    at_six = results[0]["resumed"]["at_six"]
    assert weights.keys() == at_six.keys()
    assert all(torch.equal(weights[n], at_six[n]) for n in weights)
    # the tp2 x dp2 one holds the dense weights (tp slices joined, vocabulary padding dropped)
    weights = consolidate(tmp_path / "ckpt", tmp_path / "model3.safetensors")
    at_three = results[0]["resumed"]["at_three"]
    assert weights.keys() == at_three.keys()
    for n, w in weights.items():
        assert w.shape == at_three[n].shape and (w - at_three[n]).abs().max() <= 1e-5 * max(1.0, res["scale"]), n


@pytest.mark.distributed
@pytest.mark.slow
def test_3d_at_world_8_trains_like_one_process():
    """8 ranks, 2 x 2 x 2, 5 steps: 30 s on 2 cores with one other job running (97 s at load 16). All but
    the import of transformers (3.5 s of CPU per rank) takes under 1 s of CPU per rank. A forkserver that
    preloads transformers made it 17 s, but its first start then failed gloo's connectFullMesh in 3 of 25
    tries at load 12-16 (0 of 15 with torch alone), so it is not done."""
    results = run_distributed(_world8, 8, timeout=300)  # the ranks import transformers inside it
    _check(results, "pp2xdp2xtp2", 8)
    assert len(results[0]["pp2xdp2xtp2"]["loss"]) == 5
    assert sorted(tuple(r["pp2xdp2xtp2"]["coords"].values()) for r in results) == sorted(
        (pp, dp, tp) for pp in range(2) for dp in range(2) for tp in range(2))


def test_degrees_are_checked_with_the_numbers_before_anything_is_built():
    from llmkern.parallel import ParallelizeConfig, ZeroConfig, check_degrees

    model = _llama(layers=2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert check_degrees(ParallelizeConfig(tp=2), 8, model).dp == 4
    cases = [
        (ParallelizeConfig(tp=3), 6, ValueError, "tp=3 must divide the model's 4 attention heads"),
        (ParallelizeConfig(tp=4, dp=2), 4, ValueError, "dp * tp * pp = 8 ranks, but the world size is 4"),
        (ParallelizeConfig(tp=2, pp=3), 5, ValueError, "tp * pp = 6 does not divide the world size 5"),
        (ParallelizeConfig(pp=4), 4, ValueError, "pp=4 stages need at least 4 decoder layers, the model has 2"),
        (ParallelizeConfig(zero_stage=1, pp=2, schedule="interleaved_1f1b"), 2, NotImplementedError,
         "runs the gpipe and 1f1b schedules, not 'interleaved_1f1b'"),
        (ParallelizeConfig(zero_stage=2, zero=ZeroConfig(stage=3)), 2, ValueError, "stage equals zero_stage=2"),
        (ParallelizeConfig(pp=2, tp=2, sequence_parallel=True), 4, NotImplementedError, "pp=2"),
        (ParallelizeConfig(pp=2, microbatches=0), 2, ValueError, "microbatches must be a positive integer"),
    ]
    for cfg, world, exc, text in cases:
        with pytest.raises(exc, match=text.replace("*", r"\*")):
            check_degrees(cfg, world, model)
    tied = _llama(layers=2)
    tied.config.tie_word_embeddings = True
    with pytest.raises(NotImplementedError, match="needs untied embeddings"):
        check_degrees(ParallelizeConfig(pp=2, zero_stage=2), 2, tied)
    kv = _llama(heads=4, kv_heads=1)
    with pytest.raises(ValueError, match="tp=2 must divide the model's 1 key/value heads"):
        check_degrees(ParallelizeConfig(tp=2), 2, kv)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def _save_then_resume(rank, world, directory):
    """tp2 x zero2 (dp 2) trains 3 steps and saves; a dp 4 ZeRO-3 run of a different initialization loads
    it, trains 3 more and saves; a pp2 x dp2 ZeRO-1 run loads that and trains 3 more: the losses,
    norms and final weights are the 9-step single-process run's."""
    from llmkern.optim import FusedAdamW
    from llmkern.parallel import ParallelizeConfig, parallelize
    from llmkern.parallel.tensor_parallel.checkpoint import load_checkpoint, save_checkpoint

    dense = _llama()
    ref_opt = FusedAdamW(dense.parameters(), lr=1e-2)
    ref_loss, ref_norm = [], []
    for step in range(3 * STEPS):
        ids = _batch(step)
        loss = dense(input_ids=ids, labels=ids).loss
        loss.backward()
        ref_loss.append(loss.item())
        ref_norm.append(ref_opt.clip_grad_norm_(MAX_NORM).item())
        ref_opt.step()
        ref_opt.zero_grad()
        if step == STEPS - 1:
            at_three = {n: p.detach().clone() for n, p in dense.named_parameters()} if rank == 0 else None

    def steps(run, opt, first):
        losses, norms = [], []
        for step in range(first, first + STEPS):
            local = run.local_batch(_batch(step))
            losses.append(run.train_step(local, local).item())
            norms.append(opt.clip_grad_norm_(MAX_NORM).item())
            opt.step()
            opt.zero_grad()
        return losses, norms

    first = parallelize(_llama(), ParallelizeConfig(tp=2, zero_stage=2))
    opt = first.optimizer(FusedAdamW, lr=1e-2)
    loss_a, norm_a = steps(first, opt, 0)
    save_checkpoint(directory, first, opt, step=STEPS)
    first.module.close()

    other = _llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    second = parallelize(other, ParallelizeConfig(zero_stage=3))
    opt = second.optimizer(FusedAdamW, lr=0.5)  # the checkpoint's lr (1e-2) replaces it
    extra = load_checkpoint(directory, second, opt, step=None)
    loss_b, norm_b = steps(second, opt, STEPS)
    save_checkpoint(directory + "-2", second, opt)
    with second.whole_parameters():
        at_six = {n: p.detach().clone() for n, p in second.named_parameters()} if rank == 0 else None
    second.module.close()

    # and on to a pipeline: pp2 x dp2 under ZeRO-1, each rank loading its stage's parameters by name
    third = parallelize(_llama(), ParallelizeConfig(pp=2, zero_stage=1, microbatches=2))
    opt = third.optimizer(FusedAdamW, lr=0.5)
    load_checkpoint(directory + "-2", third, opt)
    loss_c, norm_c = steps(third, opt, 2 * STEPS)
    ref = dict(dense.named_parameters())
    with third.whole_parameters():
        diff = max((p.detach() - ref[n]).abs().max().item() for n, p in third.named_parameters())
    dist.barrier()
    return {"loss": loss_a + loss_b + loss_c, "norm": norm_a + norm_b + norm_c, "ref_loss": ref_loss,
            "ref_norm": ref_norm, "diff": diff, "scale": max(p.abs().max().item() for p in dense.parameters()),
            "extra": extra, "dims": [(r.dims.dp, r.dims.tp, r.dims.pp) for r in (first, second, third)],
            "at_six": at_six, "at_three": at_three}


@pytest.mark.parametrize("layout,shape", [
    (dict(size=45, world=2, rank=1, dim=0), (23, 32)),          # rows, the last block padded
    (dict(size=45, world=4, rank=3, dim=1), (32, 12)),          # columns, padded: one run per row
    (dict(size=12, world=2, rank=1, dim=0, parts=(4, 4, 4)), (6, 5)),  # fused q|k|v rows
    (dict(size=97, world=4, rank=2, dim=0), (25,)),             # a padded vocabulary bias
])
def test_dense_runs_map_a_flat_range_of_a_slice_to_the_dense_tensor(layout, shape):
    from llmkern.parallel.tensor_parallel import ShardLayout
    from llmkern.parallel.tensor_parallel.checkpoint import dense_runs

    lay = ShardLayout(**layout)
    dense_shape = list(shape)
    dense_shape[lay.dim] = lay.size
    dense = torch.arange(1, 1 + torch.Size(dense_shape).numel(), dtype=torch.float64).reshape(dense_shape)
    local = lay.shard(dense).reshape(-1)  # padding is 0, every dense element is > 0
    n = local.numel()
    for lo, hi in [(0, n), (3, n - 5), (n // 2, n // 2 + 7), (5, 5)]:
        got = torch.zeros(dense.numel(), dtype=torch.float64)
        for g, a, m in dense_runs(lay, shape, lo, hi - lo):
            assert torch.equal(local[lo + a:lo + a + m], dense.reshape(-1)[g:g + m])
            got[g:g + m] = local[lo + a:lo + a + m]
        # every non-padding element of the range is in exactly one run
        assert int((got > 0).sum()) == int((local[lo:hi] > 0).sum())
