"""`llmkern train` / `make demo`: LoRA fine-tuning of a tiny Llama with llmkern's fused LoRALinear.

No pretrained weights exist on these machines, so the demo tells the fine-tuning story end to end:

1. **Pretrain** a small ``LlamaForCausalLM`` (built from a config) with full training on *copying*:
   ``BOS d1..dL SEP -> d1..dL EOS`` for 4-8 random digits.
2. **Fine-tune with LoRA** on a related but different task, *reversal*: ``BOS d1..dL SEP -> dL..d1 EOS``.
   Every attention and MLP projection is swapped for :class:`llmkern.nn.LoRALinear` (dropout 0.05, so
   the fused dropout path with its regenerated mask runs); the base stays frozen.
3. Report held-out exact-match accuracy (greedy decoding) on reversal before and after, trainable vs
   total parameters and steps/s; save the adapter (LoRA weights only, with PEFT's key names and
   ``adapter_config.json`` fields, so ``peft.PeftModel.from_pretrained`` loads it too), reload it into
   a fresh copy of the base and check the logits match.

The loss is taken on the target tokens only. The exit code is 0 only when reversal accuracy after
fine-tuning beats the accuracy before it by ``--margin``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmkern.nn import LoRALinear

# Vocabulary: the ten digits, then specials. 16 entries (two spare) keep the embedding a round size.
PAD, BOS, SEP, EOS = 10, 11, 12, 13
VOCAB = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT names adapter weights "base_model.model.<module path>.lora_A.weight"; we use the same keys.
PEFT_PREFIX = "base_model.model."


@dataclass(kw_only=True, slots=True)
class Phase:
    """Steps and learning rate of one training phase."""
    steps: int
    """optimizer steps"""
    lr: float
    """peak learning rate (linear warm-up over 5% of the steps, then cosine decay to 10%)"""


@dataclass(kw_only=True, slots=True)
class Setup:
    """Sizes of one demo run (``--quick`` picks a smaller one for tests)."""
    hidden: int
    """model width C"""
    layers: int
    """decoder layers"""
    heads: int
    """attention heads"""
    intermediate: int
    """MLP width"""
    min_len: int
    """shortest digit string"""
    max_len: int
    """longest digit string"""
    batch: int
    """sequences per step"""
    pretrain: Phase
    """full training on copying"""
    finetune: Phase
    """LoRA training on reversal"""
    n_eval: int
    """held-out reversal examples (never seen in training)"""
    log_every: int
    """print the loss every this many steps"""


FULL = Setup(hidden=128, layers=2, heads=4, intermediate=256, min_len=4, max_len=8, batch=64,
             pretrain=Phase(steps=500, lr=3e-3), finetune=Phase(steps=500, lr=3e-3), n_eval=500, log_every=50)
QUICK = Setup(hidden=64, layers=2, heads=4, intermediate=128, min_len=4, max_len=5, batch=64,
              pretrain=Phase(steps=150, lr=5e-3), finetune=Phase(steps=150, lr=5e-3), n_eval=200, log_every=50)


# ---------------------------------------------------------------------------------------------
# Data

def encode(digits: torch.Tensor, task: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One example as (tokens (seq_len,), loss mask (seq_len,)): BOS digits SEP target EOS PAD..."""
    target = digits.flip(0) if task == "reverse" else digits
    L = digits.numel()
    seq = torch.full((seq_len,), PAD, dtype=torch.long)
    seq[0], seq[1:L + 1], seq[L + 1] = BOS, digits, SEP
    seq[L + 2:2 * L + 2], seq[2 * L + 2] = target, EOS
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[L + 2:2 * L + 3] = True  # the target digits and EOS are predicted; the prompt is not
    return seq, mask


class Task:
    """Random digit strings of min_len..max_len digits; the held-out strings are excluded from training."""

    def __init__(self, setup: Setup, seed: int):
        self.s = setup
        self.seq_len = 2 * setup.max_len + 3
        self.gen = torch.Generator().manual_seed(seed)
        self.heldout = [self._draw() for _ in range(setup.n_eval)]
        self._heldout_keys = {tuple(d.tolist()) for d in self.heldout}

    def _draw(self) -> torch.Tensor:
        L = int(torch.randint(self.s.min_len, self.s.max_len + 1, (), generator=self.gen))
        return torch.randint(0, 10, (L,), generator=self.gen)

    def batch(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        while len(rows) < self.s.batch:
            d = self._draw()
            if tuple(d.tolist()) not in self._heldout_keys:
                rows.append(encode(d, task, self.seq_len))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def target_loss(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the masked (target) positions only."""
    logits = model(input_ids=tokens[:, :-1]).logits
    tgt = tokens[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)


@torch.no_grad()
def accuracy(model: nn.Module, task: Task, which: str) -> float:
    """Exact match of greedy decoding (all digits and the final EOS) on the held-out strings.
    Strings of one length form one batch, so no padding is needed."""
    was_training = model.training
    model.eval()
    correct = 0
    by_len: dict[int, list[torch.Tensor]] = {}
    for d in task.heldout:
        by_len.setdefault(d.numel(), []).append(d)
    for L, group in by_len.items():
        digits = torch.stack(group)
        seq = torch.cat([torch.full((len(group), 1), BOS), digits, torch.full((len(group), 1), SEP)], dim=1)
        for _ in range(L + 1):  # no KV cache: these sequences are at most 19 tokens
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        want = digits.flip(1) if which == "reverse" else digits
        want = torch.cat([want, torch.full((len(group), 1), EOS)], dim=1)
        correct += int((seq[:, L + 2:] == want).all(dim=1).sum())
    model.train(was_training)
    return correct / len(task.heldout)


# ---------------------------------------------------------------------------------------------
# Model and LoRA

def build_base(setup: Setup, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                      num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                      num_key_value_heads=setup.heads, max_position_embeddings=64, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _inject_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, backend: str | None,
                 targets: tuple[str, ...] = TARGET_MODULES) -> list[str]:
    """Swaps every ``nn.Linear`` whose attribute name is in `targets` for a LoRALinear sharing its
    (frozen) weight, freezes everything else and returns the swapped module paths.
    A stand-in for ``llmkern.peft.apply_lora``, which will take a ``LoraConfig``."""
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear.from_linear(child, r=r, alpha=alpha, dropout=dropout,
                                                             backend=backend))
                swapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not swapped:
        raise ValueError(f"_inject_lora: no nn.Linear named one of {targets} in {type(model).__name__}")
    return swapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors only, under PEFT's key names."""
    return {PEFT_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: nn.Module, out: Path, *, r: int, alpha: float, dropout: float, swapped: list[str]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": sorted({s.rsplit(".", 1)[-1] for s in swapped}), "bias": "none",
              "use_rslora": False, "base_model_name_or_path": str(out / "base")}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(out: Path, backend: str | None) -> nn.Module:
    """A fresh base from ``out/base`` with the saved adapter injected and loaded."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    config = json.loads((out / "adapter_config.json").read_text())
    model = LlamaForCausalLM.from_pretrained(str(out / "base"))
    _inject_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
                 backend=backend, targets=tuple(config["target_modules"]))
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    lora_missing = [k for k in missing if ".lora_" in k]
    if lora_missing or unexpected:
        raise RuntimeError(f"adapter does not fit the model: missing {lora_missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Training

def lr_at(step: int, phase: Phase) -> float:
    warm = max(1, phase.steps // 20)
    if step < warm:
        return phase.lr * (step + 1) / warm
    t = (step - warm) / max(1, phase.steps - warm)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: nn.Module, task: Task, which: str, phase: Phase, log_every: int, desc: str,
          fused: bool = False) -> dict:
    """`fused`: llmkern's FusedAdamW (one fused pass: clip coefficient, update, no host sync) instead
    of torch.optim.AdamW."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        from llmkern.optim import FusedAdamW
        opt = FusedAdamW(params, lr=phase.lr, weight_decay=0.0, betas=(0.9, 0.98))
    else:
        opt = torch.optim.AdamW(params, lr=phase.lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    first = last = None
    t0 = time.perf_counter()
    bar = tqdm(range(phase.steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, phase)
        tokens, mask = task.batch(which)
        loss = target_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if fused:
            opt.clip_grad_norm_(1.0)  # applied inside the next step's kernel
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = loss.item()
        first = last if first is None else first
        if step % log_every == 0 or step == phase.steps - 1:
            bar.write(f"  [{desc}] step {step:4d}  loss {last:.4f}  lr {lr_at(step, phase):.2e}")
            bar.set_postfix(loss=f"{last:.3f}")
    secs = time.perf_counter() - t0
    bar.close()
    return {"first_loss": first, "last_loss": last, "seconds": secs, "steps_per_s": phase.steps / secs}


def count(model: nn.Module) -> tuple[int, int]:
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmkern train", description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["lora"], default="lora", help="fine-tuning method")
    ap.add_argument("--steps", type=int, default=None, help="LoRA fine-tuning steps (default 500, 150 with --quick)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="full-training steps of the base on copying (default 500, 150 with --quick)")
    ap.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default 3e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the base and the adapter go")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on the adapter's input")
    ap.add_argument("--backend", choices=["cpu", "ref"], default="cpu",
                    help="lora_linear backend: cpu = llmkern's C++ kernel, ref = plain PyTorch")
    ap.add_argument("--margin", type=float, default=None,
                    help="required accuracy gain for exit code 0 (default 0.5, 0.3 with --quick)")
    # One thread: this model's ops take microseconds, so a second OpenMP thread only adds barriers, and on a
    # busy 2-core machine those barriers made a step 25x slower (1250 ms vs 50 ms per step, measured).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)")
    ap.add_argument("--optimizer", choices=["fused", "torch"], default="fused",
                    help="LoRA phase optimizer: llmkern FusedAdamW (default) or torch.optim.AdamW")
    ap.add_argument("--quick", action="store_true", help="a tiny run (under a minute) for tests")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = QUICK if args.quick else FULL
    pretrain = replace(setup.pretrain, **({"steps": args.pretrain_steps} if args.pretrain_steps is not None else {}))
    finetune = replace(setup.finetune, **({"steps": args.steps} if args.steps is not None else {}),
                       **({"lr": args.lr} if args.lr is not None else {}))
    setup = replace(setup, pretrain=pretrain, finetune=finetune)
    margin = args.margin if args.margin is not None else (0.3 if args.quick else 0.5)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its save/load bars would interleave with ours
    t_start = time.perf_counter()
    out: Path = args.out

    task = Task(setup, seed=args.seed + 1)
    print(f"llmkern demo: LoRA fine-tune of a tiny Llama, copy -> reverse {setup.min_len}-{setup.max_len} digits "
          f"({setup.n_eval} held-out strings), backend={args.backend}, torch threads={torch.get_num_threads()}")

    # 1. The base: full training on copying.
    model = build_base(setup, args.seed)
    trainable, total = count(model)
    print(f"\n[1/3] pretraining the base on copying: {total:,} parameters, {setup.layers} layers, "
          f"hidden {setup.hidden}, {setup.pretrain.steps} steps of {setup.batch} sequences")
    pre = train(model, task, "copy", setup.pretrain, setup.log_every, "pretrain copy")
    base_copy = accuracy(model, task, "copy")
    base_rev = accuracy(model, task, "reverse")
    print(f"  base: copy accuracy {base_copy:.1%}, reverse accuracy {base_rev:.1%} "
          f"(loss {pre['first_loss']:.3f} -> {pre['last_loss']:.3f}, {pre['steps_per_s']:.1f} steps/s)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / "base"))

    # 2. LoRA on reversal.
    torch.manual_seed(args.seed + 2)
    swapped = _inject_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, backend=args.backend)
    trainable, total = count(model)
    print(f"\n[2/3] LoRA fine-tuning on reversal: r={args.r}, alpha={args.alpha:g}, dropout={args.dropout}, "
          f"{len(swapped)} layers ({', '.join(sorted({s.rsplit('.', 1)[-1] for s in swapped}))})")
    print(f"  trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})")
    ft = train(model, task, "reverse", setup.finetune, setup.log_every, "LoRA reverse",
               fused=args.optimizer == "fused")
    after_rev = accuracy(model, task, "reverse")
    after_copy = accuracy(model, task, "copy")
    print(f"  loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}, {ft['steps_per_s']:.1f} steps/s "
          f"({ft['seconds']:.1f} s)")

    # 3. Save the adapter, reload it into a fresh base, compare logits.
    save_adapter(model, out, r=args.r, alpha=args.alpha, dropout=args.dropout, swapped=swapped)
    model.eval()
    probe, _ = task.batch("reverse")
    with torch.no_grad():
        ref_logits = model(input_ids=probe).logits
        reloaded = load_adapter(out, args.backend)
        new_logits = reloaded(input_ids=probe).logits
        diff = (ref_logits - new_logits).abs().max().item()
        lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        for m in lora_layers:  # W + s·B·A folded into the weight: one plain GEMM per layer at inference
            m.merge()
        merged_diff = (model(input_ids=probe).logits - ref_logits).abs().max().item()
        for m in lora_layers:
            m.unmerge()
        for m in lora_layers:  # the frozen base is untouched: without the adapter it copies again
            m.disabled = True
        disabled_copy = accuracy(model, task, "copy")
        for m in lora_layers:
            m.disabled = False
    size = (out / "adapter_model.safetensors").stat().st_size
    print(f"\n[3/3] adapter saved to {out / 'adapter_model.safetensors'} ({size / 1024:.0f} KiB) and "
          f"{out / 'adapter_config.json'}")
    print(f"  reloaded into a fresh base: max |logits difference| = {diff:.3g} "
          f"({'identical' if diff == 0 else 'DIFFERENT'})")
    print(f"  merged into the base weights: max |logits difference| = {merged_diff:.2g} (fp32 rounding)")
    print(f"  adapter disabled: copy accuracy {disabled_copy:.1%} (the frozen base is unchanged)")

    elapsed = time.perf_counter() - t_start
    gain = after_rev - base_rev
    print("\nsummary")
    print(f"  held-out reversal accuracy: before LoRA {base_rev:.1%}  after LoRA {after_rev:.1%}  "
          f"(gain {gain:+.1%}, required {margin:+.0%})")
    print(f"  copy accuracy: base {base_copy:.1%}, with the reversal adapter {after_copy:.1%}, "
          f"adapter disabled {disabled_copy:.1%}")
    print(f"  trainable {trainable:,} / total {total:,} parameters; steps/s: LoRA {ft['steps_per_s']:.1f}, "
          f"full training of the base {pre['steps_per_s']:.1f}; total time {elapsed:.0f} s")
    if diff != 0:
        print("FAILED: the reloaded adapter does not reproduce the trained model's logits")
        return 1
    if gain < margin:
        print(f"FAILED: the accuracy gain {gain:+.1%} is below the required {margin:+.0%} "
              f"(try more --steps or a higher --lr)")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
