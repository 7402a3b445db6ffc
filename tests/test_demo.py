"""The `make demo` job in its --quick form: it learns, saves the adapter, and the adapter reloads
(into llmkern and into PEFT) with the same logits."""
import json

import pytest
import torch

from llmkern import demo

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = demo.main(["--quick", "--seed", "0", "--out", str(out)])
    return rc, out


def test_quick_demo_learns_and_saves(quick_run):
    rc, out = quick_run
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_dropout"] == 0.05
    assert set(config["target_modules"]) == set(demo.TARGET_MODULES)


def test_adapter_holds_only_lora_weights(quick_run):
    from safetensors.torch import load_file

    _, out = quick_run
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert sd and all(k.startswith(demo.PEFT_PREFIX) and (".lora_A." in k or ".lora_B." in k) for k in sd)
    assert any(k.endswith("q_proj.lora_B.weight") for k in sd)


def test_reloaded_adapter_matches_peft(quick_run):
    """The saved adapter is in PEFT's format: PEFT's own loader gives the same logits as ours."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    _, out = quick_run
    ours = demo.load_adapter(out, backend="cpu")
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(out / "base")), str(out)).eval()
    tokens, _ = demo.Task(demo.QUICK, seed=1).batch("reverse")
    with torch.no_grad():
        a, b = ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_method_flag_is_checked():
    with pytest.raises(SystemExit):
        demo.main(["--method", "prefix"])
