"""estimate_memory against the ZeRO paper's per-rank formulas, exactly where Ψ splits evenly, and within
the documented padding (at most N-1 elements per bucket) where it does not; `llmkern plan --zero`."""
from __future__ import annotations

import pytest
import torch

from llmkern.parallel import ZeroConfig
from llmkern.parallel.memory import estimate_memory

PSI = 7_000_000_000          # a 7B model: divisible by every world size below
K = 12                       # mixed-precision Adam: fp32 master, exp_avg, exp_avg_sq


@pytest.mark.parametrize("world", [1, 2, 8, 64, 1000])
def test_the_papers_formulas_exactly(world):
    s1, s2, s3 = (estimate_memory(PSI, ZeroConfig(stage=s), world, param_dtype=torch.bfloat16) for s in (1, 2, 3))
    assert (s1.parameters, s1.gradients, s1.optimizer_states) == (2 * PSI, 2 * PSI, K * PSI // world)
    assert (s2.parameters, s2.gradients, s2.optimizer_states) == (2 * PSI, 2 * PSI // world, K * PSI // world)
    assert (s3.parameters, s3.gradients, s3.optimizer_states) == (2 * PSI // world, 2 * PSI // world,
                                                                   K * PSI // world)
    assert s3.model_states == (2 + 2 + K) * PSI // world
    dp_all_reduce = 2 * (world - 1) * 2 * PSI // world
    assert s1.communicated == s2.communicated == dp_all_reduce
    assert 2 * s3.communicated == 3 * dp_all_reduce      # stage 3 communicates 1.5x data parallelism


def test_fp32_parameters_have_no_master_and_offload_moves_the_states_to_the_host():
    m = estimate_memory(1024, ZeroConfig(stage=2), 4, param_dtype=torch.float32)
    assert m.optimizer_states == 8 * 1024 // 4
    off = estimate_memory(1024, ZeroConfig(stage=2, offload_optimizer=True), 4, param_dtype=torch.bfloat16)
    # master + 2 moments (12) + the fp32 gradient shard (4) + the bf16 copy buffer (2), per shard element
    assert (off.optimizer_states, off.host_optimizer_states) == (0, (12 + 4 + 2) * 1024 // 4)


@pytest.mark.parametrize("world", [3, 7])
def test_padding_is_at_most_world_minus_one_elements_per_bucket(world):
    psi = 1025
    m = estimate_memory(psi, ZeroConfig(stage=3), world)
    shard = -(-psi // world)
    assert m.parameters == 2 * shard and 0 <= shard * world - psi <= world - 1


def test_a_meta_llama_has_the_engines_buckets():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    psi = sum(p.numel() for p in model.parameters())
    for world in (2, 3, 16):
        zc = ZeroConfig(stage=2, reduce_bucket_mb=1.0)
        m = estimate_memory(model, zc, world)
        shard_bytes = m.gradients
        buckets = -(-2 * psi // 2**20) + 2 * model.config.num_hidden_layers + 4  # an upper bound on the count
        assert 2 * psi <= shard_bytes * world <= 2 * (psi + buckets * (world - 1))
        assert m.optimizer_states == K * shard_bytes // 2


def test_plan_prints_the_table(capsys):
    from llmkern.cli import main as cli_main

    assert cli_main(["plan", "--zero", "--params", "7e9", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ZeRO-3"))
    total = float(row.split()[4])
    assert total == pytest.approx(16 * PSI / 8 / 2**30, abs=1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="world_size"):
        estimate_memory(10, ZeroConfig(), 0)
    with pytest.raises(TypeError, match="parameter count"):
        estimate_memory("7b", ZeroConfig(), 2)
    with pytest.raises(ValueError, match="stage"):
        ZeroConfig(stage=4)
