"""apply_tensor_parallel on transformers Llama and GPT-2 at tp = 2 (gloo ranks) against the dense model.

Each rank builds the same dense model from one seed, converts a copy and runs it; split gradients are
all-gathered (gather_full) and judged against the dense model in fp64 by the 2x/3x rule, with the
dense fp32 model as the baseline. The tiny Llama has a vocabulary (97) and an MLP width (45) that tp
does not divide, so the padded layouts are exercised everywhere. One run computes every case (the
ranks import transformers once); the tests read it.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llmkern.testing import assert_close_to_ref, run_distributed

pytestmark = pytest.mark.distributed

TP = 2
LAYERS = 2
VOCAB = 97
SEQ = 8
CE_ALL_REDUCES = 2  # vocab_parallel_cross_entropy: the rows' max, then (sum exp, target logit, smoothing) stacked


def _llama(seed: int, heads: int = 4, kv_heads: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=45, num_hidden_layers=LAYERS, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=SEQ * 2,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def _gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_head=4, n_layer=LAYERS, vocab_size=VOCAB, n_positions=SEQ * 2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg)


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _dense_grads(model: nn.Module, pg) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient as the dense model's (split ones all-gathered, Conv1D
    weights back in their (C_in, C_out) orientation)."""
    from llmkern.parallel.tensor_parallel import TP_LAYOUT, gather_full

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        layout = getattr(p, TP_LAYOUT, None)
        out[name] = gather_full(g, layout, pg) if layout is not None else g.detach().clone()
    return out


def _dense_params(model: nn.Module, pg) -> dict[str, torch.Tensor]:
    from llmkern.parallel.tensor_parallel import TP_LAYOUT, gather_full

    return {n: gather_full(p, getattr(p, TP_LAYOUT), pg) if hasattr(p, TP_LAYOUT) else p.detach().clone()
            for n, p in model.named_parameters()}


def _conv1d_paths(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def _causal_lm_loss_fp64(logits, labels, vocab_size, ignore_index=-100, **kwargs):
    """transformers' ForCausalLMLoss (mean over the counted shifted tokens) without its cast to fp32:
    the oracle's loss in fp64."""
    shift = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                             ignore_index=ignore_index)


def _fwd_bwd(model, ids, labels, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out


def _equivalence_case(out, name, dense, tp_kwargs, pg, *, seed=None, logits=False, device="cpu"):
    """dense in fp64 (oracle), fp32 (baseline) and tensor-parallel fp32: loss, logits and every gradient
    (returned on the CPU)."""
    from llmkern.parallel import counting
    from llmkern.parallel.tensor_parallel import apply_tensor_parallel

    dense = dense.to(device)
    ids, labels = (t.to(device) for t in _batch(1))
    oracle, base, tp_model = copy.deepcopy(dense).double(), dense, copy.deepcopy(dense)
    oracle.loss_function = _causal_lm_loss_fp64
    transposed = _conv1d_paths(dense)
    report = apply_tensor_parallel(tp_model, pg, **tp_kwargs)
    ref_out, base_out = _fwd_bwd(oracle, ids, labels, seed), _fwd_bwd(base, ids, labels, seed)
    if seed is not None:
        torch.manual_seed(seed)
    with counting() as fwd:
        tp_out = tp_model(input_ids=ids, labels=labels)
    with counting() as bwd:
        tp_out.loss.backward()
    ref_g, base_g = {n: p.grad for n, p in oracle.named_parameters() if p.requires_grad}, \
        {n: p.grad for n, p in base.named_parameters() if p.requires_grad}
    grads = _dense_grads(tp_model, pg)
    grads = {n: g.t() if n in transposed else g for n, g in grads.items()}
    assert set(grads) == set(ref_g), sorted(set(grads) ^ set(ref_g))
    def cpu(*ts):
        return tuple(t.detach().cpu() for t in ts)

    out[name] = {
        "loss": cpu(tp_out.loss, ref_out.loss, base_out.loss),
        "grads": {n: cpu(grads[n], ref_g[n], base_g[n]) for n in ref_g},
        "logits": cpu(tp_out.logits, ref_out.logits, base_out.logits) if logits else None,
        "fwd": {k: c.calls for k, c in fwd.snapshot().items()},
        "bwd": {k: c.calls for k, c in bwd.snapshot().items()},
        "report": report,
    }


def _lora_llama(seed: int, dropout: float):
    from llmkern.nn import LoRALinear

    model = _llama(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                lora = LoRALinear.from_linear(getattr(parent, n), r=4, alpha=8, dropout=dropout)
                with torch.no_grad():  # B = 0 at init would hide A's gradient and the dropout mask
                    lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=g) * 0.1)
                setattr(parent, n, lora)
    return model


def _train_case(out, pg):
    """Three FusedAdamW steps with clipping on at max_norm 0.05 (below every step's norm, so the clip
    coefficient depends on the norm): the tp norm counts replicated parameters (norms) once and the
    split ones once per element."""
    from llmkern.optim import FusedAdamW
    from llmkern.parallel.tensor_parallel import apply_tensor_parallel

    dense = _llama(0)
    tp_model = copy.deepcopy(dense)
    apply_tensor_parallel(tp_model, pg)
    opts = [FusedAdamW(m.parameters(), lr=1e-2) for m in (dense, tp_model)]
    losses, norms = [[], []], [[], []]
    for step in range(3):
        ids, labels = _batch(10 + step)
        for i, (m, opt) in enumerate(zip((dense, tp_model), opts)):
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            norms[i].append(opt.clip_grad_norm_(0.05).item())
            opt.step()
            opt.zero_grad()
            losses[i].append(loss.item())
    final = _dense_params(tp_model, pg)
    ref = dict(dense.named_parameters())
    out["train"] = {"losses": losses, "norms": norms,
                    "diff": max((final[n] - ref[n]).abs().max().item() for n in ref),
                    "scale": max(p.abs().max().item() for p in ref.values())}


def _error_cases(out, pg):
    from llmkern.parallel.tensor_parallel import apply_tensor_parallel

    msgs = {}
    for name, model in (("unsupported", nn.Sequential(nn.Linear(4, 4))), ("heads", _llama(0, heads=3, kv_heads=3, hidden=24)),
                        ("kv_heads", _llama(0, heads=4, kv_heads=1))):
        try:
            apply_tensor_parallel(model, pg)
            msgs[name] = None
        except ValueError as e:
            msgs[name] = str(e)
    out["errors"] = msgs


def _lora_case(out, pg):
    """The LoRA Llama with dropout 0.1 at tp = 2, each call of the fused op recorded as (C_in of the
    shard it ran on, col_offset, row_stride): the tp layers call nothing else for the adapter."""
    from llmkern.parallel.tensor_parallel import lora as tp_lora

    calls, fused = [], tp_lora.lora_linear

    def recorded(x, *args, col_offset=0, row_stride=None, **kw):
        calls.append((x.shape[-1], col_offset, row_stride))
        return fused(x, *args, col_offset=col_offset, row_stride=row_stride, **kw)

    tp_lora.lora_linear = recorded
    try:
        _equivalence_case(out, "lora_dropout", _lora_llama(0, dropout=0.1), {}, pg, seed=123)
    finally:
        tp_lora.lora_linear = fused
    out["lora_dropout"]["fused_calls"] = calls


def _cases(rank, world):
    pg = dist.group.WORLD
    out = {}
    _equivalence_case(out, "llama", _llama(0), {}, pg)
    _equivalence_case(out, "llama_sp", _llama(0), {"sequence_parallel": True}, pg)
    _equivalence_case(out, "gpt2_gathered_logits", _gpt2(0), {"loss_parallel": False}, pg, logits=True)
    _equivalence_case(out, "gpt2_sp", _gpt2(0), {"sequence_parallel": True}, pg)
    _lora_case(out, pg)
    _train_case(out, pg)
    _error_cases(out, pg)
    return out


def _cuda_cases(rank, world):
    torch.cuda.set_device(rank)
    out = {}
    pg = dist.group.WORLD
    _equivalence_case(out, "llama", _llama(0), {}, pg, device="cuda")
    _equivalence_case(out, "llama_sp", _llama(0), {"sequence_parallel": True}, pg, device="cuda")
    _equivalence_case(out, "lora_dropout", _lora_llama(0, dropout=0.1), {}, pg, seed=123, device="cuda")
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"))])
def test_cuda_llama_lora_and_sequence_parallel_equal_dense(world):
    """The Llama, sequence-parallel and LoRA-with-dropout cases on CUDA tensors over NCCL (one GPU per
    rank): the fused lora_linear CUDA kernel on column shards, the sliced mask on row shards."""
    results = run_distributed(_cuda_cases, world, timeout=240, backend="nccl")
    for name in ("llama", "llama_sp", "lora_dropout"):
        _check(results, name)


@pytest.fixture(scope="module")
def results():
    return run_distributed(_cases, TP, timeout=240)


def _check(results, name):
    for rank, res in enumerate(results):
        case = res[name]
        assert_close_to_ref(*case["loss"], name=f"rank {rank} {name} loss")
        if case["logits"] is not None:
            assert_close_to_ref(*case["logits"], name=f"rank {rank} {name} logits")
        for n, (actual, ref, base) in case["grads"].items():
            assert_close_to_ref(actual, ref, base, grad=True, name=f"rank {rank} {name} {n}.grad")


def test_llama_equals_dense(results):
    _check(results, "llama")
    report = results[0]["llama"]["report"]
    assert report.padded["model.embed_tokens"] == (VOCAB, 98) and report.padded["lm_head"] == (VOCAB, 98)
    assert report.padded["model.layers.0.mlp.up_proj"] == (45, 46)
    assert report.padded["model.layers.0.mlp.down_proj"] == (45, 46)
    assert sorted(report.replicated) == sorted(
        [f"model.layers.{i}.{n}.weight" for i in range(LAYERS) for n in ("input_layernorm", "post_attention_layernorm")]
        + ["model.norm.weight"])
    assert "padded           model.embed_tokens: 97 -> 98" in str(report)


def test_llama_sequence_parallel_equals_dense(results):
    _check(results, "llama_sp")


def test_gpt2_tied_head_gathered_logits_equals_dense(results):
    _check(results, "gpt2_gathered_logits")
    assert any("tied" in n for n in results[0]["gpt2_gathered_logits"]["report"].notes)


def test_gpt2_sequence_parallel_equals_dense(results):
    _check(results, "gpt2_sp")


def test_lora_with_dropout_equals_single_rank(results):
    """LoRA with dropout 0.1 on every projection (column- and row-parallel): the same seed gives the
    same masks as the 1-rank model, so loss and every factor's gradient match it."""
    _check(results, "lora_dropout")
    grads = results[0]["lora_dropout"]["grads"]
    assert len(grads) == LAYERS * 7 * 2 and all(".lora_" in n for n in grads)
    for rank, res in enumerate(results):
        case = res["lora_dropout"]
        # every projection runs the fused op once per forward: the 5 column shards on the whole input (32
        # columns, the default counter); o_proj's shard is columns [16r, 16r + 16) of 32; down_proj's of 45
        # (23 per rank, the last block's padding column left out)
        row = [(16, 16 * rank, 32), (23 - rank, 23 * rank, 45)]
        assert sorted(case["fused_calls"], key=str) == sorted(([(32, 0, None)] * 5 + row) * LAYERS, key=str), \
            case["fused_calls"]
        lora = case["report"].lora
        assert len(lora) == LAYERS * 7 and all(v.startswith("fused lora_linear, dropout 0.1") for v in lora.values())
        assert lora["model.layers.0.mlp.down_proj"].endswith(
            f"columns [{23 * rank}, {23 * rank + 23 - rank}) of the 45-column single-device mask "
            f"(col_offset={23 * rank}, row_stride=45)")


def test_collectives_per_layer(results):
    """Without sequence parallelism: 2 all-reduces forward and 2 backward per decoder layer, plus the
    embedding's all-reduce and the loss's forward, and the LM head's entry backward. With it: the
    all-reduces become an all-gather per region entry and a reduce-scatter per exit (their backward
    the reverse), plus the final norm's all-gather, the first layer's scatter (backward all-gather)
    and the norms' gradient sums (one per norm weight)."""
    L = LAYERS
    for res in results:
        assert res["llama"]["fwd"] == {("world", "all_reduce"): 1 + 2 * L + CE_ALL_REDUCES}
        assert res["llama"]["bwd"] == {("world", "all_reduce"): 2 * L + 1}
        assert res["llama_sp"]["fwd"] == {("world", "all_reduce"): 1 + CE_ALL_REDUCES,
                                          ("world", "all_gather"): 2 * L + 1, ("world", "reduce_scatter"): 2 * L}
        assert res["llama_sp"]["bwd"] == {("world", "reduce_scatter"): 2 * L + 1, ("world", "all_gather"): 2 * L + 1,
                                          ("world", "all_reduce"): 2 * L + 1}


def test_training_with_clipping_equals_single_process(results):
    for res in results:
        t = res["train"]
        # fp32 AdamW for 3 steps: only the order of summation differs from the dense model
        for a, b in zip(*t["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), t["losses"]
        for a, b in zip(*t["norms"]):
            assert abs(a - b) <= 1e-5 * b, t["norms"]
        assert all(n > 0.05 for n in t["norms"][0])  # the clip acted on every step
        assert t["diff"] <= 1e-5 * max(1.0, t["scale"]), t["diff"]


def test_errors_name_the_numbers(results):
    for res in results:
        e = res["errors"]
        assert "not a supported architecture" in e["unsupported"] and "Llama" in e["unsupported"]
        assert "tp=2" in e["heads"] and "attention heads (3)" in e["heads"]
        assert "tp=2" in e["kv_heads"] and "key/value heads (1)" in e["kv_heads"]
