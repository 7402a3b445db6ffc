"""LoraConfig speaks PEFT: PEFT's field names and defaults, the same model as peft.get_peft_model from
the same config, and a clear refusal of what llmkern cannot honour."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch, logits, make_model

import llmkern.peft as lp
from llmkern.nn import LoRALinear
from llmkern.peft.config import _REFUSED

peft = pytest.importorskip("peft")

_PEFT_PREFIX = "base_model.model."


def test_a_peft_snippet_runs_with_only_the_import_changed():
    model = make_model("llama")
    # The PEFT quickstart, with `from peft import LoraConfig` replaced by llmkern's:
    from llmkern.peft import LoraConfig
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                        task_type="CAUSAL_LM")
    report = lp.apply_lora(model, config)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and report.replaced == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert all((m.r, m.scale, m.dropout) == (8, 4.0, 0.05) for m in layers)
    assert set(lp.trainable_parameters(model)) == {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_peft_defaults_and_aliases():
    ours, theirs = lp.LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "init_lora_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert lp.LoraConfig(alpha=16, dropout=0.1) == lp.LoraConfig(lora_alpha=16, lora_dropout=0.1)
    assert dataclasses.replace(lp.LoraConfig(alpha=16), r=4).lora_alpha == 16
    assert (lp.LoraConfig(alpha=16).alpha, lp.LoraConfig(lora_dropout=0.2).dropout) == (16, 0.2)
    assert repr(lp.LoraConfig(r=4, lora_alpha=16)) == "LoraConfig(r=4, lora_alpha=16)"
    with pytest.raises(ValueError, match="lora_alpha=8 and its alias alpha=16 disagree"):
        lp.LoraConfig(lora_alpha=8, alpha=16)
    assert lp.LoraConfig(r=4, lora_alpha=8, use_rslora=True).scale == 4.0


def test_every_peft_field_is_known():
    """A field added by a newer PEFT fails here first, so that it gets honoured or refused on purpose."""
    ours = {f.name for f in dataclasses.fields(lp.LoraConfig)}
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= ours


def test_default_targets_agree_with_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs
    from llmkern.peft.models import DEFAULT_LORA_TARGETS
    for model_type, targets in DEFAULT_LORA_TARGETS.items():
        assert sorted(targets) == sorted(theirs[model_type]), model_type


REFUSED = {"use_dora": True, "lora_bias": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4},
           "use_qalora": True, "layer_replication": [[0, 1]], "megatron_config": {"tp": 2},
           "loftq_config": {"loftq_bits": 4}, "target_parameters": ["experts.w1"], "ensure_weight_tying": True,
           "trainable_token_indices": [1, 2], "alora_invocation_tokens": [5]}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_fields_are_refused_by_name(name):
    assert name in _REFUSED
    with pytest.raises(ValueError, match=f"LoraConfig: {name}=.* is not supported by llmkern"):
        lp.LoraConfig(**{name: REFUSED[name]})


def test_refusals_of_values():
    for kw, match in (({"init_lora_weights": "pissa"}, "init_lora_weights must be one of"),
                      ({"bias": "some"}, "bias must be one of"),
                      ({"runtime_config": {"ephemeral_gpu_offload": True}}, "ephemeral_gpu_offload"),
                      ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform needs"),
                      ({"layers_pattern": "layers"}, "only read with layers_to_transform"),
                      ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
                      ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
                      ({"backend": "gpu"}, "backend must be one of")):
        with pytest.raises(ValueError, match=match):
            lp.LoraConfig(**kw)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lp.apply_lora(make_model("llama"), peft.LoraConfig(use_dora=True))
    with pytest.raises(ValueError, match=r"fields unknown to llmkern are set: \{'new_peft_feature': 3\}"):
        lp.LoraConfig.from_peft({"r": 4, "new_peft_feature": 3})
    assert lp.LoraConfig.from_peft({"r": 4, "new_peft_feature": None}).r == 4
    with pytest.raises(ValueError, match="'nope' matches no module"):
        lp.apply_lora(make_model("llama"), lp.LoraConfig(modules_to_save=["nope"]))


CASES = {
    "llama_default_targets": ("llama", {"r": 4, "lora_alpha": 16, "task_type": "CAUSAL_LM"}),
    "llama_layers_rslora": ("llama", {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj",
                            "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    "llama_all_linear_exclude": ("llama", {"r": 2, "lora_alpha": 4, "target_modules": "all-linear",
                                 "exclude_modules": ["o_proj"], "lora_dropout": 0.1}),
    "llama_modules_to_save": ("llama", {"r": 2, "target_modules": ["v_proj"], "modules_to_save": ["model.norm"]}),
    "gpt2_lora_only_bias": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                            "fan_in_fan_out": True, "bias": "lora_only"}),
    "bert_seq_cls_all_bias": ("bert", {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"], "bias": "all",
                              "task_type": "SEQ_CLS"}),
}


def _peft_name(n: str) -> str:
    """A PEFT parameter name as llmkern names the same parameter."""
    n = n.removeprefix(_PEFT_PREFIX)
    for part in (".modules_to_save.default", ".base_layer", ".default"):
        n = n.replace(part, "")
    return n


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("given", ["llmkern_config", "peft_config"])
def test_same_config_same_model_as_peft(case, given, tiny):
    """apply_lora(model, cfg) adapts the same modules, with the same scale and init, trains the same
    parameters and gives the same logits as peft.get_peft_model(model, cfg)."""
    arch, kw = CASES[case]
    ours, base = tiny(arch)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**kw))
    torch.manual_seed(7)
    lp.apply_lora(ours, lp.LoraConfig(**kw) if given == "llmkern_config" else peft.LoraConfig(**kw))
    peft_layers = {n.removeprefix(_PEFT_PREFIX): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    our_layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(our_layers) == sorted(peft_layers)
    for n, m in our_layers.items():
        assert m.scale == pytest.approx(peft_layers[n].scaling["default"])
        assert m.dropout == kw.get("lora_dropout", 0.0)
        torch.testing.assert_close(m.lora_A.weight, peft_layers[n].lora_A["default"].weight, atol=0, rtol=0)
    trainable = {_peft_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(lp.trainable_parameters(ours)) == trainable
    assert lp.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    # Same non-zero adapters and same trained biases / saved modules on both sides, then compare.
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
                mine[_peft_name(n)].copy_(p)
    x = batch(arch)
    torch.testing.assert_close(logits(ours, x), logits(theirs.eval(), x), atol=1e-5, rtol=1e-5)


def test_init_lora_weights_and_inference_mode():
    torch.manual_seed(0)
    model = make_model("llama")
    lp.apply_lora(model, lp.LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights="gaussian"))
    a = torch.cat([m.lora_A.weight.detach().flatten() for m in model.modules() if isinstance(m, LoRALinear)])
    assert 0.9 < float(a.std()) * 4 < 1.1  # N(0, 1/r^2) over 2 x 4 x 32 values
    assert all(not m.lora_B.weight.any() for m in model.modules() if isinstance(m, LoRALinear))
    model = make_model("llama")
    lp.apply_lora(model, lp.LoraConfig(r=4, target_modules=["gate_proj"], init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(m.lora_B.weight.abs().min() > 0 and m.lora_B.weight.abs().max() <= 0.5 for m in layers)
    model = make_model("llama")
    rep = lp.apply_lora(model, lp.LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert rep.trainable_params == 0 and not lp.trainable_parameters(model)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch,kw", [("gpt2", {"target_modules": ["c_attn"], "bias": "all"}),
                                     ("bert", {"target_modules": ["query"], "bias": "lora_only",
                                               "modules_to_save": ["pooler.dense"], "task_type": "SEQ_CLS"})])
def test_in_place_training_saves_for_peft(arch, kw, tiny, tmp_path):
    """What trains in place (biases, modules_to_save) is written under PEFT's keys and loads there."""
    ours, base = tiny(arch)
    rep = lp.apply_lora(ours, lp.LoraConfig(r=2, lora_alpha=4, **kw))
    assert rep.in_place and set(rep.in_place) <= set(lp.trainable_parameters(ours))
    with torch.no_grad():
        for p in lp.trainable_parameters(ours).values():
            p.normal_(0, 0.3)
    lp.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = batch(arch)
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="train or were loaded in place"):
        with lp.disable_adapters(ours):
            pass
