"""HF Trainer(bf16=True) on a tiny Llama with llmkern LoRA and FusedAdamW: the bf16 path a user takes.

Trainer(bf16=True) on the CPU runs the forward under torch.autocast("cpu", torch.bfloat16) with fp32
master weights; the LoRA op must run it as nn.Linear does (the "lower" autocast policy of
llmkern/ops/_backends.py). The adapter then saved in PEFT's format must load into PEFT and give
the logits our model gives.
"""
import logging

import pytest
import torch

from llmkern.optim import FusedAdamW
from llmkern.peft import LoraConfig, apply_lora, save_adapter
from llmkern.testing import assert_close_to_ref

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64


def tiny_llama(seed: int):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                   initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg)


def test_trainer_bf16_lora_fused_adamw_then_peft_loads_it(tmp_path):
    model = tiny_llama(0)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                 target_modules=["q_proj", "v_proj", "gate_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, VOCAB, (8, 12), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), bf16=True, use_cpu=True, max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(FusedAdamW(trainable, lr=1e-2), None))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    assert lora_b and all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in lora_b)  # B starts at zero

    save_adapter(model, str(tmp_path / "adapter"))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).eval()
    # Accelerate left model.forward wrapped in its bf16 autocast; compare the fp32 forward.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base = theirs(input_ids=ids).logits
        exact = theirs.double()(input_ids=ids).logits
    assert_close_to_ref(ours, exact, base, name="logits")
