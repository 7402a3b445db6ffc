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
