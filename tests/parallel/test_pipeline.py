"""Pipeline parallelism on real gloo ranks against single-process training on the same batch.

Every rank builds the same model, pipelines it, runs `train_step` on the whole batch, and compares
the loss and each of its parameters' gradients with a plain fp32 run of the unsplit model (the
baseline) and an fp64 run (the oracle), under the house rule: the pipeline's error against fp64 is
at most 3x plain PyTorch's for gradients (`assert_close_to_ref`). Only the order of summation over
micro-batches differs, so no wider tolerance is needed. To keep the suite short, one
`run_distributed` call (one set of processes) runs many configurations.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel import ParallelConfig, PipelineConfig, apply_pipeline, counting, init_mesh
from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.distributed

C = 13  # hidden size of the MLP: odd, not a multiple of 16


def _mlp(layers: int, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Dropout(dropout)) for _ in range(layers)]
    return nn.Sequential(*blocks)


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _grads(model, x, y, dtype=None):
    m = copy.deepcopy(model)
    if dtype is not None:
        m, x, y = m.to(dtype), x.to(dtype), y.to(dtype)
    loss = _mse(m(x), y)
    loss.backward()
    return loss.detach(), {n: q.grad for n, q in m.named_parameters()}


def _cases(schedule: str, p: int) -> list[tuple[int, str]]:
    """(m, rematerialize): m = p, m = 2p, and an m that is not a multiple of p where the schedule
    allows it; re-materialization of whole stages at m = 2p. Per-layer re-materialization is
    tested once, in test_rematerialization_replays_dropout: torch.utils.checkpoint's first call
    imports torch._dynamo and sympy, 3-8 s per process on these machines."""
    odd = 3 if schedule == "interleaved_1f1b" else 2 * p + 1  # interleaved: one round of 3 micro-batches
    cases = [(p, "none"), (2 * p, "full"), (odd, "none")]
    if schedule == "gpipe" and p > 2:
        cases.append((p - 1, "full"))  # fewer micro-batches than stages
    return cases


def _equivalence(rank, world, schedule, device):
    """For each m and re-materialization mode: loss and gradients against the sequential model,
    the in-flight micro-batches and (with re-materialization) the bytes kept per micro-batch."""
    v = 2 if schedule == "interleaved_1f1b" else 1
    stages = world * v
    report = []
    for m, remat in _cases(schedule, world):
        model = _mlp(2 * stages + 1)  # uneven split: the first stage gets one layer more
        g = torch.Generator().manual_seed(m)
        rows = 2 * m + 1  # uneven micro-batches: sizes differ by one
        x, y = torch.randn(rows, C, generator=g), torch.randn(rows, C, generator=g)
        base_loss, base = _grads(model, x, y)
        ref_loss, ref = _grads(model, x, y, torch.float64)
        pipe = apply_pipeline(model.to(device),
                              PipelineConfig(stages=world, microbatches=m, schedule=schedule, virtual_stages=v,
                                             rematerialize=remat, measure_activations=True, verbose=False),
                              loss_fn=_mse)
        with counting() as counter:
            loss = pipe.train_step(x.to(device), y.to(device))
        where = f"{schedule} p={world} m={m} remat={remat}"
        # every transfer goes through llmkern's collectives: the activations and gradients, a step
        # header from stage 0's rank to every other rank and, on a step with new shapes (the first),
        # one shape header per stage boundary (headers are 15 int64)
        key_sent, key_recv = (world - 1, 0) if rank == 0 else (0, 1)
        chain_sent, chain_recv = sum(s < stages - 1 for s in pipe.stages), sum(s > 0 for s in pipe.stages)
        sent = counter.get("send")
        assert sent.calls == pipe.stats.messages + key_sent + chain_sent, (where, counter)
        assert sent.bytes_sent == pipe.stats.bytes_sent + (key_sent + chain_sent) * 15 * 8, (where, counter)
        assert counter.get("recv").calls == pipe.stats.messages + key_recv + chain_recv, (where, counter)
        assert_close_to_ref(loss.cpu(), ref_loss, base_loss, name=f"loss ({where})")
        names = []
        for n, q in pipe.named_parameters():
            assert_close_to_ref(q.grad.cpu(), ref[n], base[n], grad=True, name=f"{n} ({where})")
            names.append(n)
        # a second step on the same batch, shapes now cached: the same loss and gradients, bit for bit
        first = {n: q.grad.clone() for n, q in pipe.named_parameters()}
        pipe.zero_grad()
        with counting() as counter:
            assert torch.equal(pipe.train_step(x.to(device), y.to(device)), loss)
        assert counter.get("send").calls == pipe.stats.messages + key_sent, (where, counter)  # no shape chain
        for n, q in pipe.named_parameters():
            assert torch.equal(q.grad, first[n]), f"{n} ({where}): second step"
        largest_rows = -(-rows // m)
        report.append({"m": m, "remat": remat, "names": names, "peak": dict(pipe.stats.peak_in_flight),
                       "saved": dict(pipe.stats.saved_bytes_per_microbatch),
                       "peak_saved": dict(pipe.stats.peak_saved_bytes),
                       "input_bytes": largest_rows * C * 4, "messages": pipe.stats.messages})
    return report


def _check_report(schedule, world, results):
    names = sorted(n for r in results for n in r[0]["names"])
    assert names == sorted(n for n, _ in _mlp(2 * world * (2 if schedule == "interleaved_1f1b" else 1) + 1)
                           .named_parameters()), "every parameter lives on exactly one rank"
    for rank, rep in enumerate(results):
        for r in rep:
            m = r["m"]
            for stage, peak in r["peak"].items():
                if schedule == "gpipe":
                    assert peak == m, (r, stage)
                elif schedule == "1f1b":
                    assert peak == min(world - stage, m), (r, stage)  # at most p
                elif schedule == "zero_bubble":
                    assert peak <= world, (r, stage)
            for stage, saved in r["saved"].items():
                # activations are freed by each backward: never more than the micro-batches in flight
                if r["remat"] == "none":
                    assert r["peak_saved"][stage] <= r["peak"][stage] * saved, (r, stage)
                if r["remat"] == "full":
                    assert 0 < saved <= r["input_bytes"], (r, stage)
                elif r["remat"] == "none":
                    assert saved > 2 * r["input_bytes"], (r, stage)  # the meter sees what autograd keeps
            # one activation per micro-batch out of each stage but the last, one gradient out of each
            # stage but the first
            S = world * (2 if schedule == "interleaved_1f1b" else 1)
            assert r["messages"] == m * sum((s < S - 1) + (s > 0) for s in r["peak"]), r


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"])
def test_schedule_matches_sequential_model(schedule, world):
    results = run_distributed(_equivalence, world, (schedule, "cpu"), timeout=240)
    _check_report(schedule, world, results)


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"])
def test_schedule_matches_sequential_model_cuda(schedule):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results = run_distributed(_cuda_equivalence, 2, (schedule,), timeout=240, backend="nccl")
    _check_report(schedule, 2, results)


def _cuda_equivalence(rank, world, schedule):
    torch.cuda.set_device(rank)
    return _equivalence(rank, world, schedule, f"cuda:{rank}")


def _remat_same_gradients(rank, world):
    """With dropout, re-materialization must replay the same masks: gradients equal bit for bit."""
    grads = {}
    for remat in ("none", "full", "layer"):
        for schedule in ("1f1b", "zero_bubble") if remat != "layer" else ("1f1b",):
            torch.manual_seed(100 + rank)  # each rank its own stream, the same for every mode
            model = _mlp(4 * world, dropout=0.3)
            pipe = apply_pipeline(model, PipelineConfig(stages=world, microbatches=world + 1, schedule=schedule,
                                                        rematerialize=remat, verbose=False), loss_fn=_mse)
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(9, C, generator=g), torch.randn(9, C, generator=g)
            torch.manual_seed(7 + rank)
            pipe.train_step(x, y)
            grads[(remat, schedule)] = {n: q.grad.clone() for n, q in pipe.named_parameters()}
    base = grads[("none", "1f1b")]
    for key, gr in grads.items():
        for n in base:
            assert torch.equal(gr[n], base[n]), (key, n)
    return sorted(grads)


def _time_partition(rank, world):
    """partition="time": one layer with ~1000x the work of the others gets a stage with fewer layers;
    every rank cuts the same way (the measured times are averaged over ranks); rank 0 prints it."""
    import contextlib
    import io

    torch.manual_seed(0)
    light = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(5)]
    heavy = nn.Sequential(nn.Linear(16, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Linear(2048, 16))
    model = nn.Sequential(*light[:3], heavy, *light[3:])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pipe = apply_pipeline(model, PipelineConfig(stages=world, microbatches=2, partition="time"),
                              loss_fn=_mse, example_inputs=torch.randn(32, 16))
    return pipe.partition, printed.getvalue()


def test_rematerialization_replays_dropout_and_time_partition():
    runs = run_distributed(_remat_same_gradients, 2, timeout=120)
    assert len(runs[0]) == 5
    (part0, text0), (part1, text1) = run_distributed(_time_partition, 2, timeout=120)
    # [light x3 | heavy, light x2] is the only cut whose heavier stage is not heavy + 3 light layers
    assert part0 == part1 == [(0, 3), (3, 6)]
    assert "stage 0 (rank 0): layers 0..2, " in text0 and "ms fwd+bwd" in text0 and text1 == ""


def _optimizer_and_scaler(rank, world):
    """FusedAdamW and DynamicLossScaler step after train_step as usual; the scaler's overflow flag is
    reduced over the pipeline group, so an overflow on one stage skips the step on every stage, and
    gradient clipping uses the norm over every stage's parameters."""
    from llmkern.optim import DynamicLossScaler, FusedAdamW, LossScalerConfig

    model = _mlp(2 * world)
    ref = copy.deepcopy(model)
    pipe = apply_pipeline(model, PipelineConfig(stages=world, microbatches=world, verbose=False), loss_fn=_mse)
    opt = FusedAdamW(pipe.parameters(), lr=1e-2)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0 ** 10), process_group=pipe.group)
    ref_opt = FusedAdamW(ref.parameters(), lr=1e-2)
    ref_scaler = DynamicLossScaler(LossScalerConfig(init_scale=2.0 ** 10))
    skipped = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, C, generator=g), torch.randn(8, C, generator=g)
        loss = pipe.train_step(x, y, scaler=scaler)
        if step == 2 and rank == world - 1:  # an overflow on the last stage only
            next(pipe.parameters()).grad[0, 0] = float("inf")
        before = [q.detach().clone() for q in pipe.parameters()]
        norm = scaler.clip_grad_norm_(opt, 0.5)  # the global norm: every stage's squares summed
        skipped.append(bool(scaler.step(opt)))
        scaler.update()
        opt.zero_grad()
        if skipped[-1]:
            assert all(torch.equal(a, b) for a, b in zip(before, pipe.parameters()))
            continue  # the single process skips the same step
        ref_loss = _mse(ref(x), y)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()  # the batch's loss, on every rank
        ref_scaler.scale(ref_loss).backward()
        ref_norm = ref_scaler.clip_grad_norm_(ref_opt, 0.5)
        assert abs(norm.item() - ref_norm.item()) <= 1e-5 * ref_norm.item(), (step, norm, ref_norm)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
    refp = dict(ref.named_parameters())
    diff = max((q - refp[n]).abs().max().item() for n, q in pipe.named_parameters())
    return skipped, diff, scaler.get_scale()


def test_fused_adamw_and_loss_scaler_after_the_step():
    for skipped, diff, scale in run_distributed(_optimizer_and_scaler, 2, timeout=120):
        assert skipped == [False, False, True, False]
        assert scale == 2.0 ** 9  # cut once, on every rank
        assert diff <= 1e-5, diff  # AdamW for 3 steps: only the order of summation differs


def _tiny_decoder(kind: str, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=97,
                                            max_position_embeddings=16, attn_implementation="eager",
                                            tie_word_embeddings=tie))
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=97, n_positions=16,
                                      attn_implementation="eager", tie_word_embeddings=tie, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def _decoder_grads(model, ids, labels, dtype=None):
    """transformers' own loss and gradients; with dtype=float64 the oracle, whose loss is computed
    here because transformers' loss upcasts logits to fp32 whatever the model's dtype."""
    m = copy.deepcopy(model)
    if dtype is None:
        loss = m(input_ids=ids, labels=labels).loss
    else:
        logits = m.to(dtype)(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: q.grad for n, q in m.named_parameters(remove_duplicate=False)}


def _decoders(rank, world):
    """Llama and GPT-2, tied and untied embeddings, three schedules, against transformers' own loss."""
    seen = []
    for kind in ("llama", "gpt2"):
        for tie in (True, False):
            for schedule in ("1f1b", "interleaved_1f1b", "zero_bubble"):
                v = 2 if schedule == "interleaved_1f1b" else 1
                model = _tiny_decoder(kind, tie)
                g = torch.Generator().manual_seed(1)
                ids = torch.randint(0, 97, (6, 11), generator=g)  # T = 11
                labels = ids.clone()
                labels[0, 3:] = -100  # ignored tokens: the loss is normalized over the batch's tokens
                base_loss, base = _decoder_grads(model, ids, labels)
                ref_loss, ref = _decoder_grads(model, ids, labels, torch.float64)
                pipe = apply_pipeline(model, PipelineConfig(stages=world, microbatches=4, schedule=schedule,
                                                            virtual_stages=v, verbose=False))
                loss = pipe.train_step(ids, labels)
                where = f"{kind} tie={tie} {schedule}"
                assert_close_to_ref(loss, ref_loss, base_loss, name=f"loss ({where})")
                for n, q in pipe.named_parameters():
                    assert_close_to_ref(q.grad, ref[n], base[n], grad=True, name=f"{n} ({where})")
                    seen.append((where, n))
                if schedule == "1f1b":  # every entry of the model's state dict on exactly one rank
                    gathered = [None] * world
                    dist.all_gather_object(gathered, sorted(pipe.state_dict()))
                    full = _tiny_decoder(kind, tie).state_dict()
                    keys = sorted(k for ks in gathered for k in ks)
                    assert keys == sorted(full), (where, keys)
                    assert all(torch.equal(v, full[k]) for k, v in pipe.state_dict().items())
                if tie:  # the embedding and the head stay one matrix after an optimizer step
                    assert len(pipe._ties) == 1
                    opt = torch.optim.SGD(pipe.parameters(), lr=0.5)
                    opt.step()
                    w = pipe._ties[0][0].detach().clone()
                    others = [torch.empty_like(w) for _ in range(world)]
                    dist.all_gather(others, w)
                    holders = [r for r in range(world) if (others[r].abs().sum() > 0 and
                                                           r in pipe._ties[0][1])]
                    assert holders == [0, world - 1]
                    assert torch.equal(others[0], others[world - 1])
    lora = {schedule: _lora(world, schedule) for schedule in ("1f1b", "zero_bubble")}
    return seen, lora


def test_transformers_decoders_match_single_process():
    """The embedding on the first stage, norm + LM head on the last, tied weights summed between
    them; and llmkern LoRA on the stage modules (in the same processes: importing transformers
    costs each rank seconds)."""
    results = run_distributed(_decoders, 2, timeout=300)
    seen = {n for r in results for n in r[0]}
    llama = {n for w, n in seen if w == "llama tie=False 1f1b"}
    assert "model.embed_tokens.weight" in llama and "lm_head.weight" in llama and "model.norm.weight" in llama
    for schedule in ("1f1b", "zero_bubble"):
        trained = [n for r in results for n in r[1][schedule]]
        assert all("lora_" in n for n in trained)
        assert len(trained) == 4 * 3 * 2  # 4 layers x 3 targets x (A, B)


def _data_and_pipeline_parallel(rank, world):
    """dp=2 x pp=2 on llmkern's mesh, llmkern DDP inside each stage: 3 AdamW steps equal
    single-process training on the global batch, for a 1F1B and a zero-bubble pipeline."""
    mesh = init_mesh(ParallelConfig(pp=2))  # ("pp", "dp", "tp") = (2, 2, 1)
    return [_train_dp_pp(mesh, schedule) for schedule in ("1f1b", "zero_bubble")]


def _train_dp_pp(mesh, schedule):
    dp_rank = mesh.get_local_rank("dp")
    model = _tiny_decoder("llama", tie=True)
    ref = copy.deepcopy(model)
    v = 2 if schedule == "interleaved_1f1b" else 1
    pipe = apply_pipeline(model, PipelineConfig(stages=2, microbatches=2, schedule=schedule, virtual_stages=v,
                                                verbose=False), mesh)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(10 + step)
        ids = torch.randint(0, 97, (8, 12), generator=g)  # global batch 8; each replica 4 rows
        mine = ids[dp_rank * 4:(dp_rank + 1) * 4]
        loss = pipe.train_step(mine, mine)
        opt.step()
        opt.zero_grad()
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (step, loss, ref_loss)
    refp = dict(ref.named_parameters())
    diff = max((q - refp[n]).abs().max().item() for n, q in pipe.named_parameters())
    scale = max(q.abs().max().item() for q in refp.values())
    synced = [m.stats.steps for m in pipe.stage_modules.values()]
    for m in pipe.stage_modules.values():
        m.close()
    return diff, scale, synced


def test_dp2_x_pp2_matches_single_process():
    results = run_distributed(_data_and_pipeline_parallel, 4, timeout=300)
    for diff, scale, synced in (r for rank in results for r in rank):
        # fp32 AdamW for 3 steps: only the reduction order differs (as tests/parallel/test_ddp.py)
        assert diff <= 1e-5 * max(1.0, scale), diff
        assert synced == [3], "one gradient reduction per stage per step (the last backward), not per micro-batch"


def _lora(world, schedule):
    """llmkern LoRA on the stage modules: only the adapters train; their gradients match."""
    from llmkern.peft import LoraConfig, apply_lora

    model = _tiny_decoder("llama", tie=False)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (4, 10), generator=g)
    base_loss, base = _decoder_grads(model, ids, ids)
    ref_loss, ref = _decoder_grads(model, ids, ids, torch.float64)
    pipe = apply_pipeline(model, PipelineConfig(stages=world, microbatches=4, schedule=schedule, verbose=False))
    loss = pipe.train_step(ids, ids)
    assert_close_to_ref(loss, ref_loss, base_loss, name="loss")
    trained = []
    for n, q in pipe.named_parameters():
        if q.requires_grad:
            assert_close_to_ref(q.grad, ref[n], base[n], grad=True, name=n)
            trained.append(n)
        else:
            assert q.grad is None, n
    return trained


