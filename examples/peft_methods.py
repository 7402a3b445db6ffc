"""Each llmkern.peft method on a tiny Llama built from a config (no download): apply, train a few
steps, save in PEFT's format, load into a fresh model.

    python examples/peft_methods.py [lora|adapter|prefix|prompt|ptuning]
"""
import copy
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmkern.peft as lp

METHODS = {
    "lora": lambda m: lp.apply_lora(m, lp.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")),
    "adapter": lambda m: lp.apply_adapters(m, lp.AdapterConfig(bottleneck=16)),
    "prefix": lambda m: lp.apply_prefix_tuning(m, lp.PrefixTuningConfig(num_virtual_tokens=8, projection=True)),
    "prompt": lambda m: lp.apply_prompt_tuning(m, lp.PromptTuningConfig(num_virtual_tokens=8)),
    "ptuning": lambda m: lp.apply_p_tuning(m, lp.PTuningConfig(num_virtual_tokens=8, encoder="lstm")),
}


def main(method: str = "lora") -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)
    fresh = copy.deepcopy(model)
    print(METHODS[method](model))
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.AdamW(lp.trainable_parameters(model).values(), lr=1e-2)
    for step in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.4f}")
    if method == "adapter":
        return  # PEFT has no bottleneck adapters, so there is no PEFT format to save them in
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        lp.save_adapter(model, d)
        lp.load_adapter(fresh, d)
        with torch.no_grad():
            same = torch.allclose(model(input_ids=ids).logits, fresh.eval()(input_ids=ids).logits, atol=1e-5)
    print(f"saved in PEFT's format and reloaded: logits equal = {same}")


if __name__ == "__main__":
    main(*sys.argv[1:])
