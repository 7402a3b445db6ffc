"""A layout too large for this machine, planned on the meta device with torch's fake process group:
Llama-70B's shapes (hidden 8192, 64 heads, 8 KV heads, MLP 28672, vocabulary 128256) at
tp8 x pp8 x dp16 (1024 ranks). apply_tensor_parallel converts a meta model of one pipeline stage's
10 layers (with the embedding and the head, which the first and last stages hold), a forward and
backward run through the real tp code on meta tensors, and the per-rank bytes and the tp collectives
(calls and bytes sent) are asserted against the formulas. Runs in this process (no ranks to start).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

H, HEADS, KV, MLP, VOCAB, LAYERS = 8192, 64, 8, 28672, 128256, 80
TP, PP, DP = 8, 8, 16
STAGE_LAYERS = LAYERS // PP
B, T = 1, 4096  # one micro-batch
BF16 = 2


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP * PP * DP)
    try:
        yield dist.new_group(ranks=list(range(TP)))  # rank 0's tp group: the adjacent ranks 0..7
    finally:
        dist.destroy_process_group()


def _meta_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=H, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV, vocab_size=VOCAB, max_position_embeddings=T,
                      attn_implementation="sdpa")
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_llama70b_tp8_pp8_dp16_plan(fake_world, capsys):
    from llmkern.parallel import ParallelizeConfig, check_degrees, counting, ring
    from llmkern.parallel.tensor_parallel import TPComm, apply_tensor_parallel

    full = _meta_llama(LAYERS)
    dims = check_degrees(ParallelizeConfig(tp=TP, pp=PP, dp=DP), TP * PP * DP, full)
    assert (dims.dp, dims.tp, dims.pp) == (DP, TP, PP)
    with pytest.raises(ValueError, match="tp=16 must divide the model's 8 key/value heads"):
        check_degrees(ParallelizeConfig(tp=16, pp=4, dp=16), 1024, full)

    model = _meta_llama(STAGE_LAYERS)
    report = apply_tensor_parallel(model, fake_world, comm=TPComm(check=False))
    hd = H // HEADS
    layer_params = (H * (HEADS + 2 * KV) * hd + HEADS * hd * H + 3 * H * MLP) // TP + 2 * H  # split + 2 norms
    vocab_params = -(-VOCAB // TP) * H
    assert _bytes(model.model.layers[0]) == layer_params * BF16
    assert _bytes(model.model.embed_tokens) == _bytes(model.lm_head) == vocab_params * BF16
    assert report.padded == {}  # 128256 and 28672 are multiples of 8
    first = vocab_params + STAGE_LAYERS * layer_params
    middle = STAGE_LAYERS * layer_params
    last = STAGE_LAYERS * layer_params + H + vocab_params
    assert _bytes(model) == (first + last - middle) * BF16
    dense_params = sum(p.numel() for p in full.parameters())
    assert (first + (PP - 2) * middle + last) * TP - (PP * STAGE_LAYERS * 2 * H + H) * (TP - 1) == dense_params

    # one micro-batch through the stage's 10 layers on meta tensors: what the tp group moves
    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    with counting() as fwd:
        logits = model(input_ids=ids).logits
    with counting() as bwd:
        logits.backward(torch.ones_like(logits))
    act = B * T * H
    sent = ring.elements_sent(act, 0, TP) * BF16  # rank 0's share of one (B, T, H) bf16 all-reduce
    f, b = fwd.get("all_reduce"), bwd.get("all_reduce")
    assert logits.shape == (B, T, vocab_params // H)
    assert (f.calls, f.bytes_sent) == (1 + 2 * STAGE_LAYERS, (1 + 2 * STAGE_LAYERS) * sent)
    assert (b.calls, b.bytes_sent) == (2 * STAGE_LAYERS + 1, (2 * STAGE_LAYERS + 1) * sent)
    assert abs(sent - 2 * (TP - 1) / TP * act * BF16) <= 2 * TP * BF16

    gib = 2 ** 30
    adam = 4 + 4 + 4  # fp32 master weight and two moments per parameter, replicated over dp (zero_stage 0)
    with capsys.disabled():
        print(f"\nLlama-70B shapes at tp{TP} x pp{PP} x dp{DP} ({TP * PP * DP} ranks), bf16 weights:")
        for name, n in (("first stage", first), ("middle stage", middle), ("last stage", last)):
            print(f"  {name:12s} {n / 1e9:6.3f} B params/rank: {n * BF16 / gib:6.2f} GiB weights, "
                  f"{n * (BF16 * 2 + adam) / gib:6.2f} GiB with grads and AdamW state")
        per_layer = 4 * sent  # 2 all-reduces forward + 2 backward
        print(f"  tp traffic per layer per micro-batch (B={B}, T={T}): {per_layer / 2**20:.0f} MiB sent per rank "
              f"(4 all-reduces of {act * BF16 / 2**20:.0f} MiB)")


def test_layout_plan_of_a_config_at_tp2_pp2_dp2(tmp_path, capsys):
    """`llmkern plan --layout` on a small Llama config (vocabulary 97, padded to 98 by tp 2) against the
    numbers computed by hand: per-rank parameters of the first and last stage, ZeRO-2 bytes over dp,
    4 tp all-reduces of (B, T, H) per layer per micro-batch, one activation per micro-batch to each
    pipeline neighbour; then the joined pipeline schedule and a refused layout."""
    from transformers import LlamaConfig

    from llmkern import cli
    from llmkern.parallel import ring
    from llmkern.parallel.tensor_parallel.plan import layout_plan, llama_layer_activation_bytes

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    h, heads, kv, mlp, vocab, layers, b, t, m = 64, 4, 2, 96, 97, 4, 2, 16, 4
    LlamaConfig(hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=t).save_pretrained(tmp_path)
    plan = layout_plan(tmp_path, tp=2, pp=2, dp=2, zero_stage=2, seq=t, micro_batch=b, microbatches=m,
                       dtype=torch.float32)
    hd = h // heads
    layer = (h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * mlp) // 2 + 2 * h
    embed = 49 * h  # ceil(97 / 2) rows
    first, last = plan.stages
    assert (first.layers, last.layers) == (2, 2)
    assert first.parameters == embed + 2 * layer
    assert last.parameters == 2 * layer + h + embed
    assert plan.padded == {"model.embed_tokens": (97, 98), "lm_head": (97, 98)}
    shard = -(-first.parameters // 2)  # ZeRO-2 over dp 2, one fp32 bucket padded to a multiple of 2
    assert (first.parameter_bytes, first.gradient_bytes, first.optimizer_bytes) == (
        first.parameters * 4, shard * 4, shard * 8)
    act = b * t * h
    assert plan.per_layer_tp == (4, 4 * ring.elements_sent(act, 0, 2) * 4)
    assert first.tp_calls == m * (2 * 4 + 1)  # + the embedding's all-reduce
    assert (first.pp_bytes, last.pp_bytes) == (m * act * 4, m * act * 4)
    # activations: 1F1B holds 2 micro-batches on the first stage, 1 on the last
    per_layer = llama_layer_activation_bytes(micro_batch=b, seq=t, hidden=h, heads=heads, kv_heads=kv, ffn=mlp, tp=2,
                                             element_size=4)
    assert plan.per_layer_activations == (per_layer, b * t * h * 4)
    assert (first.in_flight, last.in_flight) == (2, 1)
    assert (first.activation_bytes, last.activation_bytes) == (2 * 2 * per_layer, 1 * 2 * per_layer)
    assert first.activation_bytes_rematerialized == 2 * 2 * b * t * h * 4 + per_layer
    assert cli.main(["plan", "--layout", "--config", str(tmp_path), "--tp", "2", "--pp", "2", "--dp", "2",
                     "--seq", str(t), "--microbatches", str(m)]) == 0
    out = capsys.readouterr().out
    assert "tp2 x pp2 x dp2 (8 ranks), DDP over dp" in out and "pipeline plan: 1f1b, p=2 ranks" in out
    assert "activations per rank (decoder layers)" in out
    assert cli.main(["plan", "--layout", "--config", str(tmp_path), "--tp", "4"]) == 2
    assert "tp=4 must divide the model's 2 key/value heads" in capsys.readouterr().err


def _saved_bytes_of_first_layer(model, ids) -> int:
    """Bytes of the tensors autograd saves in model.model.layers[0]'s forward, each storage once (views of
    one tensor share it); parameters and the rotary cos/sin the model passes in are not the layer's."""
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"on": False, "skip": set()}
    seen: dict[int, int] = {}

    def pre(mod, args, kwargs):
        state.update(on=True, skip={t.untyped_storage().data_ptr() for t in kwargs["position_embeddings"]})

    def post(mod, args, kwargs, out):
        state["on"] = False

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if state["on"] and key not in params and key not in state["skip"]:
            seen[key] = t.untyped_storage().nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


def test_llama_layer_activation_bytes_equal_what_autograd_saves():
    """llama_layer_activation_bytes against the tensors a real 2-layer Llama's first decoder layer saves
    (CPU tensors; tp 2 on torch's fake process group, whose collectives move nothing but keep every
    shape): fp32 and bf16, with and without sequence parallelism and layer re-materialization. The MLP
    width 45 is padded to 46 by tp 2, the sequence 10 splits 5 + 5."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils.checkpoint import checkpoint

    from llmkern.parallel.tensor_parallel import TPComm, apply_tensor_parallel
    from llmkern.parallel.tensor_parallel.plan import llama_layer_activation_bytes

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    h, heads, kv, ffn, b, t = 64, 4, 2, 45, 2, 10
    cfg = LlamaConfig(hidden_size=h, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=97, max_position_embeddings=t, attn_implementation="sdpa")
    ids = torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(0))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        for tp, sp, dtype, remat in [(1, False, torch.float32, False), (2, False, torch.float32, False),
                                     (2, True, torch.float32, False), (2, True, torch.bfloat16, False),
                                     (2, False, torch.bfloat16, False), (2, False, torch.bfloat16, True),
                                     (2, True, torch.float32, True)]:
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype)
            if tp > 1:
                apply_tensor_parallel(model, dist.group.WORLD, sequence_parallel=sp, comm=TPComm(check=False))
            if remat:
                layer = model.model.layers[0]
                layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(layer.forward)
            e = torch.tensor([], dtype=dtype).element_size()
            expected = llama_layer_activation_bytes(micro_batch=b, seq=t, hidden=h, heads=heads, kv_heads=kv, ffn=ffn,
                                                    tp=tp, sequence_parallel=sp, element_size=e, rematerialize=remat)
            assert _saved_bytes_of_first_layer(model, ids) == expected, (tp, sp, dtype, remat)
    finally:
        dist.destroy_process_group()
    # the closed form of the docstring, 16-bit, no sequence parallelism: Llama-70B's shapes at tp 8
    n, f = B * T, MLP // TP
    closed = n * H * 16 + n * H * (4 * HEADS + 4 * KV) // (HEADS * TP) + 8 * n * f + 8 * n + 4 * n * HEADS // TP
    assert llama_layer_activation_bytes(micro_batch=B, seq=T, hidden=H, heads=HEADS, kv_heads=KV, ffn=MLP,
                                        tp=TP) == closed
    with pytest.raises(ValueError, match="tp=16 must divide heads=64 and kv_heads=8"):
        llama_layer_activation_bytes(micro_batch=1, seq=8, hidden=H, heads=HEADS, kv_heads=KV, ffn=MLP, tp=16)
