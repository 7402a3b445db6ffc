"""llmkern.parallel.apply_zero on real gloo ranks against single-process training on the same global batch.

Every rank trains its slice of the global batch (two micro-batches, the first under no_sync, clipping
on); rank 0 also trains a plain copy with FusedAdamW on the whole batch. fp32: the parameters agree
up to the order of the reduction. fp16 with the loss scaler: the average of two fp16 half-batch
gradients differs from the fp16 full-batch gradient by rounding, so the weights agree to a few fp16
ulps (checked against the size of the weights).
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from llmkern.ops.fused_adamw import fused_adamw_
from llmkern.optim import DynamicLossScaler, FusedAdamW
from llmkern.parallel import ZeroConfig, apply_zero
from llmkern.parallel.memory import estimate_memory
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.distributed

STEPS = 10
PER_RANK = 4
BUCKET_MB = 0.004  # ~4 KiB buckets: several buckets, a parameter larger than a bucket


class _Blocks(nn.Module):
    """Residual blocks in an nn.ModuleList: stage 3 makes each block a unit."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(24, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 33), nn.GELU(), nn.Linear(33, 32)) for _ in range(3))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _mlp(dtype, device="cpu", blocks=False):
    torch.manual_seed(0)
    model = _Blocks() if blocks else nn.Sequential(nn.Linear(24, 97), nn.GELU(), nn.Linear(97, 8))
    return model.to(device, dtype)


def _batch(step, world, dtype, device="cpu"):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(PER_RANK * world, 24, generator=g), torch.randn(PER_RANK * world, 8, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


def _loss(model, x, y):
    out = model(x)
    wide = torch.float64 if out.dtype == torch.float64 else torch.float32
    return nn.functional.mse_loss(out.to(wide), y.to(wide))


def _groups(model, groups):
    """Two param groups as fine-tuning recipes set them (no weight decay and another lr on biases), or
    one (optimizer keywords only)."""
    if not groups:
        return {}
    params = list(model.parameters())
    return {"param_groups": [{"params": [p for p in params if p.dim() > 1]},
                             {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0, "lr": 3e-2}]}


def _optimizer(cls, model, groups):
    g = _groups(model, groups)
    return cls(g["param_groups"] if g else model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(rank, world, stage, dtype, offload, device="cpu", overflow_step=-1, persist=0, groups=False):
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    model = _mlp(dtype, device, blocks=stage == 3)
    if rank == 1:  # construction broadcasts rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ref = copy.deepcopy(model) if rank == 0 else None
    start = {k: v.clone() for k, v in model.state_dict().items()} if rank == 0 else None
    # 16-bit gradients are averaged in fp32 partial sums (reduce_dtype), as DDP users set it
    cfg = ZeroConfig(stage=stage, offload_optimizer=offload, reduce_bucket_mb=BUCKET_MB, timeout_s=30,
                     reduce_dtype=torch.float32 if dtype != torch.float32 else None, param_persistence_threshold=persist)
    zmodel, opt = apply_zero(model, cfg, lr=1e-2, weight_decay=0.1, **_groups(model, groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    fp16 = dtype == torch.float16
    scaler = DynamicLossScaler(init_scale=2.0 ** 10) if fp16 else None
    mem = zmodel.memory()
    skipped_equal = None
    for step in range(STEPS):
        x, y = _batch(step, world, dtype, device)
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        h = PER_RANK // 2
        with zmodel.no_sync():
            loss = _loss(zmodel, x[:h], y[:h]) / 2
            (scaler.scale(loss) if fp16 else loss).backward()
        loss = _loss(zmodel, x[h:], y[h:]) / 2
        if step == overflow_step and rank == 1:
            loss = loss * float("inf")
        (scaler.scale(loss) if fp16 else loss).backward()
        with zmodel.gather_parameters():
            before = [p.detach().clone() for p in model.parameters()]
        if fp16:
            scaler.clip_grad_norm_(opt, 0.5)
            scaler.step(opt)
            scaler.update()
        else:
            opt.clip_grad_norm_(0.5)
            opt.step()
        sched.step()
        opt.zero_grad()
        zmodel.wait_for_parameters()
        if step == overflow_step:
            with zmodel.gather_parameters():
                skipped_equal = (bool(opt.last_step_skipped)
                                 and all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    at_rest = [p.numel() for p in model.parameters()]  # stage 3: persistent parameters stay whole
    with zmodel.gather_parameters():
        params = [p.detach().cpu().clone() for p in model.parameters()]
    out = {"params": params, "memory": mem, "at_rest": at_rest,
           # offload: every gradient shard of every step went to the host store as its reduce-scatter ended,
           # during backward (step() copies only what was not streamed, and does not count it)
           "streamed": (opt.streamed_down, STEPS * len(opt.masters) if offload and device == "cpu" else 0),
           "skipped_equal": skipped_equal,
           "masters_on_host": all(m.data_ptr() != s.data_ptr() for m, s in zip(opt.masters,
                                                                                 zmodel.parameter_shards()))}
    if rank == 0:
        ref_opt = _optimizer(FusedAdamW, ref, groups)
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + 0.1 * s))
        ref_scaler = DynamicLossScaler(init_scale=2.0 ** 10) if fp16 else None
        for step in range(STEPS):
            if step == overflow_step:
                if fp16:
                    ref_scaler.update(True)
                ref_sched.step()
                continue
            x, y = _batch(step, world, dtype, device)
            if fp16:  # plain fp16 training accumulates the same micro-batches' gradients in fp16
                h = PER_RANK // 2
                for lo in range(0, PER_RANK * world, h):
                    ref_scaler.scale(_loss(ref, x[lo:lo + h], y[lo:lo + h]) / (2 * world)).backward()
                ref_scaler.clip_grad_norm_(ref_opt, 0.5)
                ref_scaler.step(ref_opt)
                ref_scaler.update()
            else:
                _loss(ref, x, y).backward()
                ref_opt.clip_grad_norm_(0.5)
                ref_opt.step()
            ref_sched.step()
            ref_opt.zero_grad()
        out["ref"] = [p.detach().cpu() for p in ref.parameters()]
        if fp16:  # the oracle: the same training in fp64 (torch.optim.AdamW, torch's clip)
            ref64 = _mlp(torch.float64, blocks=stage == 3)
            opt64 = _optimizer(torch.optim.AdamW, ref64, groups)
            sched64 = torch.optim.lr_scheduler.LambdaLR(opt64, lambda s: 1.0 / (1 + 0.1 * s))
            ref64.load_state_dict({k: v.double() for k, v in start.items()})
            for step in range(STEPS):
                if step == overflow_step:
                    sched64.step()
                    continue
                x, y = _batch(step, world, torch.float64)
                _loss(ref64, x.to(dtype).double(), y.to(dtype).double()).double().backward()
                torch.nn.utils.clip_grad_norm_(ref64.parameters(), 0.5)
                opt64.step()
                sched64.step()
                opt64.zero_grad()
            out["ref64"] = [p.detach() for p in ref64.parameters()]
    zmodel.close()
    return out


def _check_equal_to_single_process(results, dtype):
    r0 = results[0]
    for r in results[1:]:  # every rank holds the same gathered parameters
        assert all(torch.equal(a, b) for a, b in zip(r["params"], r0["params"]))
    if dtype == torch.float32:
        for got, ref in zip(r0["params"], r0["ref"]):
            err = (got.double() - ref.double()).abs().max().item()
            assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err   # the reduction order only
    else:  # as close to fp64 training as single-process fp16 training is (the fp16 rule)
        assert_close_to_ref(r0["params"], r0["ref64"], r0["ref"], name="parameters after 10 steps")


# (stage, dtype, offload, step with an overflow planted on rank 1 or -1, param_persistence_threshold,
# two param groups).
# All run in one pair of processes: starting two ranks and importing torch costs more than the 10
# steps of a case.
CASES = [
    (1, torch.float32, False, -1, 0, False),
    (2, torch.float32, False, -1, 0, False),
    (3, torch.float32, False, -1, 0, False),
    (2, torch.float16, False, 3, 0, False),
    (3, torch.float16, False, 3, 0, False),
    (1, torch.float16, True, -1, 0, False),
    (2, torch.float16, True, -1, 0, False),
    (3, torch.float16, True, -1, 0, False),
    (3, torch.float32, False, -1, 40, False),  # biases (8 to 33 elements) whole, weights sharded
    (2, torch.float32, False, -1, 0, True),
    (3, torch.float32, False, -1, 0, True),
    (1, torch.float16, True, -1, 0, True),
]


def _train_cases(rank, world, cases, device="cpu"):
    return [_train(rank, world, stage, dtype, offload, device, overflow, persist, groups)
            for stage, dtype, offload, overflow, persist, groups in cases]


def _check_case(case, results):
    stage, dtype, offload, overflow_step, persist, _ = case
    _check_equal_to_single_process(results, dtype)
    if offload:
        assert all(r["masters_on_host"] for r in results)
        assert all(r["streamed"][0] == r["streamed"][1] for r in results), [r["streamed"] for r in results]
    if overflow_step >= 0:  # every rank skipped that step and changed nothing, bit for bit
        assert all(r["skipped_equal"] for r in results)
    # the engine's allocations are what estimate_memory predicts
    cfg = ZeroConfig(stage=stage, offload_optimizer=offload, reduce_bucket_mb=BUCKET_MB,
                     param_persistence_threshold=persist)
    assert all(r["memory"] == estimate_memory(_mlp(dtype, blocks=stage == 3), cfg, 2) for r in results)
    if stage == 3:
        numels = [p.numel() for p in _mlp(dtype, blocks=True).parameters()]
        assert all(r["at_rest"] == [n if n <= persist else 0 for n in numels] for r in results)
    if persist:
        # per rank, 2 ranks: each block's weights (32*33 + 33*32) halved and its biases (33 + 32, padded to
        # 66) whole; the root's weights (24*32 + 32*8) halved and its biases (32 + 8) whole
        m = results[0]["memory"]
        assert m.parameters == 4 * (3 * (2112 // 2 + 66) + 1024 // 2 + 40), m
        assert m.gathered == 4 * (1024 + 2 * 2112), m  # the root and two blocks, biases not included


def test_every_stage_matches_single_process():
    per_rank = run_distributed(_train_cases, 2, (CASES,), timeout=240)
    for i, case in enumerate(CASES):
        try:
            _check_case(case, [r[i] for r in per_rank])
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from e


@pytest.mark.cuda
def test_every_stage_matches_single_process_cuda():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cases = [c for c in CASES if c[1] == torch.float16]
    per_rank = run_distributed(_train_cases, 2, (cases, "cuda"), timeout=300, backend="nccl")
    for i, case in enumerate(cases):
        _check_case(case, [r[i] for r in per_rank])


def _lora_llama(rank, world):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmkern.peft import LoraConfig, apply_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # nonzero B, so that every adapter factor gets a gradient from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref = copy.deepcopy(model) if rank == 0 else None
    total_bytes = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    zmodel, opt = apply_zero(model, ZeroConfig(stage=3, timeout_s=30), lr=1e-2)
    mem = zmodel.memory()
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 64, (2 * world, 16), generator=g)
        zmodel(input_ids=ids[2 * rank:2 * rank + 2], labels=ids[2 * rank:2 * rank + 2]).loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    with zmodel.gather_parameters():
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {"memory": mem, "total_bytes": total_bytes, "trainable": trainable, "units": len(zmodel.units)}
    if rank == 0:
        ref_opt = FusedAdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            ids = torch.randint(0, 64, (2 * world, 16), generator=g)
            ref(input_ids=ids, labels=ids).loss.backward()
            ref_opt.clip_grad_norm_(1.0)
            ref_opt.step()
            ref_opt.zero_grad()
        out["max_diff"] = max((got[n] - p).abs().max().item() for n, p in ref.named_parameters())
        out["lora_moved"] = any(not torch.equal(got[n], p0) for n, p0 in got.items() if "lora" in n)
    zmodel.close()
    return out


def test_lora_on_a_tiny_llama_under_stage_3_shards_the_frozen_base():
    results = run_distributed(_lora_llama, 2, timeout=90)
    r0 = results[0]
    assert r0["units"] == 3 and r0["max_diff"] <= 1e-5, r0["max_diff"]
    for r in results:
        m = r["memory"]
        # the frozen base is sharded too: half the bytes per rank, up to a padding element per flat
        assert r["total_bytes"] <= 2 * m.parameters <= r["total_bytes"] + 4 * 2 * 2 * r0["units"]
        # optimizer state (fp32: two moments) for the adapters' shards only
        assert m.optimizer_states == 8 * m.gradients // 4 and 2 * m.gradients // 4 >= r["trainable"]


class _Peek(_Blocks):
    """Reads block 0's weight outside block 0 (as a tied weight would), without gather_parameters()."""

    def forward(self, x):
        h = super().forward(x)
        return h + nn.functional.linear(h, self.layers[0][2].weight[:8, :8])


def _bad_input(rank, world):
    errors = {}
    try:
        apply_zero(_mlp(torch.float32), ZeroConfig(stage=1 if rank == 0 else 2, timeout_s=20))
    except ValueError as e:
        errors["config"] = str(e)
    model = _mlp(torch.float32)
    for key, groups in (("ungrouped", [{"params": [model[0].weight]}]),
                        ("twice", [{"params": [model[0].weight]}, {"params": list(model.parameters())}]),
                        ("group key", [{"params": list(model.parameters()), "momentum": 0.9}])):
        try:
            apply_zero(model, ZeroConfig(stage=2, timeout_s=20), param_groups=groups)
        except ValueError as e:
            errors[key] = str(e)
    zmodel, opt = apply_zero(model, ZeroConfig(stage=2, timeout_s=20))
    model[0].weight.data = torch.zeros_like(model[0].weight)
    zmodel(torch.randn(2, 24)).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        errors["replaced"] = str(e)
    zmodel.close()
    torch.manual_seed(0)
    zmodel, opt = apply_zero(_Peek(), ZeroConfig(stage=3, timeout_s=20))
    try:
        zmodel(torch.randn(2, 24))
    except IndexError as e:
        errors["unit"] = str(e)
    for what, m in (("wrapper", zmodel), ("module", zmodel.module)):
        try:
            m.state_dict()
        except RuntimeError as e:
            errors[f"state_dict {what}"] = str(e)
    with zmodel.gather_parameters():
        whole = zmodel.module.state_dict()
        errors["whole"] = {n: (tuple(t.shape), bool(torch.equal(t, p))) for n, p in zmodel.module.named_parameters()
                           for t in [whole[n]]}
    errors["kept"] = {n: tuple(t.shape) for n, t in whole.items()}  # copies, valid after the context
    try:
        with zmodel.gather_parameters():
            zmodel.module.load_state_dict(whole)
    except RuntimeError as e:
        errors["load_state_dict"] = str(e)
    zmodel.close()
    # rank 1 skips the optimizer step of step 1: its next reduce-scatter meets rank 0's all-gather
    zmodel, opt = apply_zero(_mlp(torch.float32), ZeroConfig(stage=2, reduce_bucket_mb=BUCKET_MB, timeout_s=10))
    try:
        for step in range(3):
            zmodel(torch.randn(4, 24)).sum().backward()
            if not (rank == 1 and step == 1):
                opt.step()
            opt.zero_grad()
    except (RuntimeError, ValueError) as e:
        errors["skipped"] = str(e)
    # the same with clipping: the first call that differs is the step scalars' all-reduce of the norm
    zmodel, opt = apply_zero(_mlp(torch.float32), ZeroConfig(stage=2, reduce_bucket_mb=BUCKET_MB, timeout_s=10))
    try:
        for step in range(3):
            zmodel(torch.randn(4, 24)).sum().backward()
            if not (rank == 1 and step == 1):
                opt.clip_grad_norm_(1.0)
                opt.step()
            opt.zero_grad()
    except (RuntimeError, ValueError) as e:
        errors["skipped_clip"] = str(e)
    return errors


def test_bad_input_is_an_error_on_every_rank():
    for errors in run_distributed(_bad_input, 2, timeout=60):
        assert "rank 1 has config" in errors["config"] and "stage" in errors["config"]
        assert "parameter 0.weight was replaced" in errors["replaced"]
        assert "['0.bias', '2.weight', '2.bias'] are in no param group" in errors["ungrouped"]
        assert "0.weight is in param_groups[0] and param_groups[1]" in errors["twice"]
        assert "param_groups[0] sets ['momentum']" in errors["group key"]
        assert "gather_parameters" in errors["unit"] and "layers.0" in errors["unit"]
        for what in ("wrapper", "module"):  # stage 3's state_dict outside gather_parameters(): an error
            assert "state_dict() outside gather_parameters()" in errors[f"state_dict {what}"]
            assert "units ['layers.0', 'layers.1', 'layers.2']" in errors[f"state_dict {what}"]
        shapes = {n: tuple(p.shape) for n, p in _Peek().named_parameters()}
        assert errors["whole"] == {n: (sh, True) for n, sh in shapes.items()} and errors["kept"] == shapes
        assert "load_state_dict() would write the whole copies" in errors["load_state_dict"]
        assert "disagree on call" in errors["skipped"] and "reduce_scatter (rank 0: all_gather)" in errors["skipped"]
        assert "disagree on call" in errors["skipped_clip"]
        assert "reduce_scatter (rank 0: all_reduce)" in errors["skipped_clip"]


def _stochastic(rank, world, stage):
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, state_rounding="stochastic", rounding_seed=7)
    model = _mlp(torch.float32, blocks=stage == 3)
    ref = copy.deepcopy(model)
    zmodel, opt = apply_zero(model, ZeroConfig(stage=stage, reduce_bucket_mb=BUCKET_MB, timeout_s=30), **kw)
    ref_opt = FusedAdamW(ref.parameters(), **kw)
    for step in range(3):
        x, y = _batch(step, 1, torch.float32)
        for m, o in ((zmodel, opt), (ref, ref_opt)):
            _loss(m, x, y).backward()
            o.step()
            o.zero_grad()
    with zmodel.gather_parameters():
        return all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def _stochastic_stages(rank, world):
    return [_stochastic(rank, world, stage) for stage in (2, 3)]


@pytest.mark.skipif("element_offset" not in inspect.signature(fused_adamw_).parameters,
                    reason="fused_adamw_ has no element_offset argument")
def test_stochastic_rounding_on_shards_draws_the_unsharded_bits():
    """One rank, so the gradients are the single process's bit for bit: bf16 moments rounded
    stochastically on the shard pieces (reverse-order buckets, stage 3 units) with element_offset give
    the unsharded run's weights exactly."""
    assert run_distributed(_stochastic_stages, 1, timeout=60) == [[True, True]]
