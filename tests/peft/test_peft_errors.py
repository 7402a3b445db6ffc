"""Bad input to the PEFT API: a clear error naming what was expected, and the model left as it was
(state dict, module tree, requires_grad flags, hooks), for every apply_* and for load_adapter."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, batch, logits, make_model, snapshot

import llmkern.peft as lp
from llmkern.peft.report import count_parameters

APPLY = {
    "lora": lambda m: lp.apply_lora(m, lp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
    "series_adapters": lambda m: lp.apply_adapters(m, lp.AdapterConfig(bottleneck=4, form="series")),
    "parallel_adapters": lambda m: lp.apply_adapters(m, lp.AdapterConfig(bottleneck=4, form="parallel")),
    "prompt_tuning": lambda m: lp.apply_prompt_tuning(m, lp.PromptTuningConfig(num_virtual_tokens=2)),
    "p_tuning": lambda m: lp.apply_p_tuning(m, lp.PTuningConfig(num_virtual_tokens=2)),
    "prefix_tuning": lambda m: lp.apply_prefix_tuning(m, lp.PrefixTuningConfig(num_virtual_tokens=2)),
}


@pytest.mark.parametrize("kind", [list, tuple, set, frozenset])
def test_target_modules_every_collection_type_refuses_a_name_that_matches_nothing(kind):
    """A tuple or set used to skip the check that a list gets, and silently adapt fewer modules."""
    for apply, cfg in ((lp.apply_lora, lp.LoraConfig), (lp.apply_adapters, lp.AdapterConfig)):
        model = make_model("llama")
        before = snapshot(model)
        with pytest.raises(ValueError, match="'qkv_proj' matches no module"):
            apply(model, cfg(target_modules=kind(["o_proj", "qkv_proj"])))
        assert_unchanged(model, before)
    rep = lp.apply_lora(make_model("llama"), lp.LoraConfig(target_modules=kind(["q_proj", "v_proj"])))
    assert len(rep.replaced) == 4


def test_target_modules_must_be_names():
    with pytest.raises(TypeError, match=r"target_modules must hold module names \(str\); got \[3\]"):
        lp.LoraConfig(target_modules=("q_proj", 3))
    with pytest.raises(TypeError, match="exclude_modules must be a collection of module names"):
        lp.AdapterConfig(exclude_modules=3)


@pytest.mark.parametrize("first", list(APPLY))
@pytest.mark.parametrize("second", ["lora", "series_adapters", "prefix_tuning"])
def test_second_apply_raises_and_changes_nothing(first, second):
    """A second apply_adapters used to hook a second adapter onto each output (logits moved by 1.65)."""
    torch.manual_seed(0)
    model = make_model("llama")
    APPLY[first](model)
    assert not any(m.training for m in model.modules())  # the new modules follow the model's eval mode
    with torch.no_grad():  # non-zero adapters, so a second application would show in the logits
        for p in lp.trainable_parameters(model).values():
            p.normal_(0, 0.5)
    x = batch("llama")
    want = logits(model, x)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already carries an llmkern.peft method"):
        APPLY[second](model)
    assert_unchanged(model, before)
    torch.testing.assert_close(logits(model, x), want, atol=0, rtol=0)


def test_merge_and_unload_allows_a_new_method():
    model = make_model("llama")
    APPLY["lora"](model)
    lp.merge_and_unload(model)
    APPLY["series_adapters"](model)


def test_adapter_config_lists_the_forms():
    with pytest.raises(ValueError, match=r"form must be one of \['series', 'parallel'\], got 'serial'"):
        lp.AdapterConfig(form="serial")
    with pytest.raises(ValueError, match=r"encoder must be one of \['mlp', 'lstm'\]"):
        lp.PTuningConfig(encoder="gru")


def test_failed_adapter_build_leaves_the_base_trainable():
    """apply_adapters used to freeze the base, then fail building the first adapter."""
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="activation must be one of"):
        lp.apply_adapters(model, lp.AdapterConfig(activation="tanh"))
    assert_unchanged(model, before)


@pytest.mark.parametrize("call", ["missing_target", "prompt_text_without_tokenizer", "prefix_on_t5_like"])
def test_failed_apply_changes_nothing(call):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError):
        if call == "missing_target":
            lp.apply_lora(model, lp.LoraConfig(target_modules=["q_proj", "nope"]))
        elif call == "prompt_text_without_tokenizer":
            lp.apply_prompt_tuning(model, lp.PromptTuningConfig(init="text", init_text="hi"))
        else:
            model.config.model_type = "t5"
            try:
                lp.apply_prefix_tuning(model, lp.PrefixTuningConfig())
            finally:
                model.config.model_type = "llama"
    assert_unchanged(model, before)


def _saved_lora(tmp_path, r=4, targets=("q_proj", "o_proj")):
    model = make_model("llama")
    lp.apply_lora(model, lp.LoraConfig(r=r, alpha=8, target_modules=list(targets)))
    lp.save_adapter(model, tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def _failed_load(directory, match, exc=ValueError, model=None):
    """load_adapter raises `exc` matching `match` and leaves `model` as it was."""
    model = model if model is not None else make_model("llama")
    before = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        lp.load_adapter(model, directory)
    assert_unchanged(model, before)
    return info.value


def test_load_checks_every_tensor_against_the_config_rank(tmp_path):
    """r = 1 tensors used to be broadcast into the r = 8 layers the config asked for."""
    d = _saved_lora(tmp_path, r=1)
    _edit_config(d, r=8)
    _failed_load(d, r"lora_A.weight in .* has shape \(1, 32\); r=8 .* need \(8, 32\)")


def test_load_rank_mismatch_injects_nothing(tmp_path):
    d = _saved_lora(tmp_path, r=4)
    _edit_config(d, r=2)
    _failed_load(d, r"q_proj.lora_A.weight in .*adapter_model.safetensors has shape \(4, 32\)")


def test_load_tensor_for_a_module_of_another_width(tmp_path):
    d = _saved_lora(tmp_path, targets=("q_proj",))
    _edit_config(d, target_modules=["k_proj"])  # k_proj is (32 -> 16): no such tensors in the file
    _failed_load(d, r"has no tensor base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight")


def test_load_truncated_safetensors_names_the_file(tmp_path):
    d = _saved_lora(tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _failed_load(d, f"{f} is not a readable safetensors file")


def test_load_bad_json_names_the_file(tmp_path):
    d = _saved_lora(tmp_path)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    err = _failed_load(d, f"{d / 'adapter_config.json'} is not valid JSON")
    assert not isinstance(err, json.JSONDecodeError)


def test_load_config_without_rank(tmp_path):
    d = _saved_lora(tmp_path)
    _edit_config(d, r=None)
    _failed_load(d, r"adapter_config.json has no 'r' \(the LoRA rank\)")


def test_load_missing_files(tmp_path):
    _failed_load(tmp_path, "adapter_config.json not found", FileNotFoundError)


def test_load_twice_or_onto_lora_says_why(tmp_path):
    d = _saved_lora(tmp_path)
    model = make_model("llama")
    lp.load_adapter(model, d)
    _failed_load(d, r"already carries an llmkern.peft method: LoRA \(4 layers\)", model=model)
    other = make_model("llama")
    APPLY["lora"](other)
    _failed_load(d, "already carries an llmkern.peft method", model=other)


def test_load_stray_tensor_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _saved_lora(tmp_path)
    tensors = load_file(d / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.bogus"] = torch.zeros(3)
    save_file(tensors, d / "adapter_model.safetensors")
    _failed_load(d, r"tensor base_model.model.model.norm.bogus in .* matches no parameter")
    tensors.pop("base_model.model.model.norm.bogus")
    tensors["base_model.model.model.norm.weight"] = torch.zeros(5)
    save_file(tensors, d / "adapter_model.safetensors")
    _failed_load(d, r"has shape \(5,\); the model's model.norm.weight has shape \(32,\)")


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_load_prompt_saved_for_another_width(method, tmp_path):
    """A prompt saved for hidden 32 used to load into a hidden-48 model and fail inside torch.cat."""
    model = make_model("llama")
    APPLY[method](model)
    lp.save_adapter(model, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    _failed_load(tmp_path, r"prompt_embeddings in .* has shape \(2, \d+\); .*hidden 48.* needs \(2, \d+\): was it "
                           "saved for another model", model=wide)


def test_count_parameters_counts_tied_weights_once():
    model = make_model("gpt2")  # lm_head.weight is transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    assert count_parameters(model) == (sum(p.numel() for p in unique.values()),) * 2
    lp.apply_lora(model, lp.LoraConfig(r=2, target_modules=["c_attn"]))
    n_lora = 2 * 2 * (32 + 96)
    trainable, total = count_parameters(model)
    assert trainable == n_lora and total == sum(p.numel() for p in unique.values()) + n_lora
