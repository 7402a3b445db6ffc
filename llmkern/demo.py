"""`llmkern train` / `make demo`: parameter-efficient fine-tuning of a tiny Llama with llmkern, with
16-bit weights, fp32 master weights and the dynamic loss scaler, data-parallel over 2 ranks.

No pretrained weights exist on these machines, so the demo tells the fine-tuning story end to end:

1. **Pretrain** a small ``LlamaForCausalLM`` (built from a config), fully and in fp32, on two tasks over
   digit strings, each named by a task token: ``COPY BOS d1..dL SEP -> d1..dL EOS`` and
   ``REV BOS d1..dL SEP -> dL..d1 EOS``.
2. **Fine-tune** with one parameter-efficient method, ``--method lora|adapter|prefix|prompt|ptuning``,
   to reverse *without* a task token: ``BOS d1..dL SEP -> dL..d1 EOS``. The base was never told
   what to do there and gets it right about 1% of the time; it already knows how to reverse, so
   even a soft prompt in the task token's place can learn to steer it.
   The base is cast to ``--dtype`` (fp16 by default) and frozen. ``FusedAdamW`` keeps fp32 master
   copies of the 16-bit trainable parameters and updates them in one fused pass; with fp16 the
   ``DynamicLossScaler`` scales the loss and a step whose gradients overflow is skipped.
   With ``--nproc 2`` (the default, as ``make demo`` runs it) the job relaunches itself under
   ``torchrun``: each rank trains on its half of the global batch and llmkern's
   ``DistributedDataParallel`` averages the gradients (fp32 ring all-reduce over gloo) while backward
   runs. ``--nproc 1`` trains in one process.
3. Report held-out exact-match accuracy before and after, trainable vs total parameters, steps/s, the
   loss scale and the skipped steps. Save the adapter (in PEFT's format for LoRA and the prompt
   methods, so ``peft.PeftModel.from_pretrained`` loads it too; PEFT has no bottleneck adapters, so
   those are saved as llmkern's own safetensors file), reload it into a fresh base and check the
   logits are identical; with the adapter disabled the base copies again.

The loss is taken on the target tokens only. The exit code is 0 only when the accuracy gain reaches
``--margin`` and the reloaded adapter reproduces the logits exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import llmkern.peft as lp
from llmkern.peft.report import count_parameters

# Vocabulary: the ten digits, then the specials: padding, begin, separator, end, and two task tokens.
PAD, BOS, SEP, EOS, COPY, REV = 10, 11, 12, 13, 14, 15
VOCAB = 16
METHODS = ("lora", "adapter", "prefix", "prompt", "ptuning")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Accuracy gain on held-out strings each method must reach (full run / --quick). Measured, seed 0,
# bf16, 1 rank: full run (200 steps) lora 0.99, adapter 0.99, prefix 0.98, prompt 0.98, ptuning 0.97;
# --quick (150 steps of a smaller model) lora 0.76, adapter 0.44, prefix 0.56, prompt 0.47, ptuning 0.43.
MARGINS = {m: (0.5, 0.3) for m in ("lora", "adapter", "prefix", "prompt", "ptuning")}


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
    """sequences per step, over all ranks"""
    pretrain: Phase
    """full training on the COPY and REV tasks"""
    finetune: Phase
    """parameter-efficient training on reversal without a task token"""
    n_eval: int
    """held-out strings (never seen in training)"""
    log_every: int
    """print the loss every this many steps"""


FULL = Setup(hidden=128, layers=2, heads=4, intermediate=256, min_len=4, max_len=8, batch=64,
             pretrain=Phase(steps=600, lr=3e-3), finetune=Phase(steps=200, lr=3e-3), n_eval=500, log_every=50)
QUICK = Setup(hidden=64, layers=2, heads=4, intermediate=128, min_len=4, max_len=5, batch=64,
              pretrain=Phase(steps=200, lr=5e-3), finetune=Phase(steps=150, lr=5e-3), n_eval=200, log_every=50)
# Per-method learning rates of the fine-tune: the soft prompts and prefixes start from random
# embeddings and need larger steps than LoRA's zero-initialised B.
METHOD_LR = {"lora": 1.0, "adapter": 2.0, "prefix": 2.0, "prompt": 10.0, "ptuning": 2.0}


# ---------------------------------------------------------------------------------------------
# Data

def encode(digits: torch.Tensor, task: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One example as (tokens (seq_len,), loss mask (seq_len,)):
    "copy" ``COPY BOS digits SEP digits EOS``, "reverse_marked" ``REV BOS digits SEP reversed EOS``,
    "reverse" (the fine-tune task: no task token) ``BOS digits SEP reversed EOS``; then PAD."""
    target = digits if task == "copy" else digits.flip(0)
    head = {"copy": [COPY, BOS], "reverse_marked": [REV, BOS], "reverse": [BOS]}[task]
    L, h = digits.numel(), len(head)
    seq = torch.full((seq_len,), PAD, dtype=torch.long)
    seq[:h], seq[h:h + L], seq[h + L] = torch.tensor(head), digits, SEP
    seq[h + L + 1:h + 2 * L + 1], seq[h + 2 * L + 1] = target, EOS
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[h + L + 1:h + 2 * L + 2] = True  # the target digits and EOS are predicted; the prompt is not
    return seq, mask


def prompt_of(digits: torch.Tensor, task: str) -> torch.Tensor:
    """The tokens given before decoding: the task head, the digits and SEP (digits: (B, L))."""
    head = {"copy": [COPY, BOS], "reverse_marked": [REV, BOS], "reverse": [BOS]}[task]
    b = digits.shape[0]
    return torch.cat([torch.tensor(head).expand(b, -1), digits, torch.full((b, 1), SEP)], dim=1)


class Task:
    """Random digit strings of min_len..max_len digits. The held-out strings are the same on every
    rank and never trained on; each rank draws its training batches from its own stream."""

    def __init__(self, setup: Setup, seed: int, rank: int = 0):
        self.s = setup
        self.seq_len = 2 * setup.max_len + 4
        held = torch.Generator().manual_seed(seed)
        self.heldout = [self._draw(held) for _ in range(setup.n_eval)]
        self._heldout_keys = {tuple(d.tolist()) for d in self.heldout}
        self.gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        L = int(torch.randint(self.s.min_len, self.s.max_len + 1, (), generator=gen))
        return torch.randint(0, 10, (L,), generator=gen)

    def batch(self, tasks: tuple[str, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n examples, the i-th of task tasks[i % len(tasks)]."""
        rows = []
        while len(rows) < n:
            d = self._draw(self.gen)
            if tuple(d.tolist()) not in self._heldout_keys:
                rows.append(encode(d, tasks[len(rows) % len(tasks)], self.seq_len))
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def target_loss(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the masked (target) positions only. Prompt tuning and P-tuning
    prepend virtual positions to the logits, so the last T-1 positions are the ones to score."""
    inputs = tokens[:, :-1]
    logits = model(input_ids=inputs).logits[:, -inputs.shape[1]:]
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
        seq = prompt_of(digits, which)
        start = seq.shape[1]
        for _ in range(L + 1):  # no KV cache: these sequences are at most 20 tokens
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        want = digits if which == "copy" else digits.flip(1)
        want = torch.cat([want, torch.full((len(group), 1), EOS)], dim=1)
        correct += int((seq[:, start:] == want).all(dim=1).sum())
    model.train(was_training)
    return correct / len(task.heldout)


# ---------------------------------------------------------------------------------------------
# Model and methods

def build_base(setup: Setup, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
                      num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
                      num_key_value_heads=setup.heads, max_position_embeddings=64, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def load_base(path: Path, setup: Setup) -> nn.Module:
    """The fp32 base saved in `path` (save_pretrained), checked against `setup`'s sizes."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    cfg = model.config
    got = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size)
    want = (setup.hidden, setup.layers, setup.heads, setup.intermediate, VOCAB)
    if got != want:
        raise ValueError(f"--base {path}: (hidden, layers, heads, intermediate, vocab) is {got}, this run's model is "
                         f"{want} (--quick or not must match the run that saved it)")
    return model


def method_config(args: argparse.Namespace):
    """The llmkern.peft config of ``args.method``."""
    k = args.virtual_tokens
    return {
        "lora": lambda: lp.LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout,
                                      target_modules=list(TARGET_MODULES), backend=args.backend),
        "adapter": lambda: lp.AdapterConfig(bottleneck=args.bottleneck, activation="gelu"),
        "prefix": lambda: lp.PrefixTuningConfig(num_virtual_tokens=k, projection=True),
        "prompt": lambda: lp.PromptTuningConfig(num_virtual_tokens=k),
        "ptuning": lambda: lp.PTuningConfig(num_virtual_tokens=k, encoder="mlp"),
    }[args.method]()


def apply_method(model: nn.Module, method: str, config) -> lp.InjectionReport:
    apply = {"lora": lp.apply_lora, "adapter": lp.apply_adapters, "prefix": lp.apply_prefix_tuning,
             "prompt": lp.apply_prompt_tuning, "ptuning": lp.apply_p_tuning}[method]
    return apply(model, config)


def save_method(model: nn.Module, method: str, config, out: Path) -> Path:
    """PEFT's format where PEFT has the method; bottleneck adapters (not in PEFT) as the trainable
    tensors under llmkern's module names plus an ``llmkern_adapter_config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    if method != "adapter":
        lp.save_adapter(model, str(out))
        return out / "adapter_model.safetensors"
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in lp.trainable_parameters(model).items()}
    save_file(tensors, str(out / "llmkern_adapter.safetensors"), metadata={"format": "pt"})
    (out / "llmkern_adapter_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return out / "llmkern_adapter.safetensors"


def load_method(out: Path, method: str, dtype: torch.dtype) -> nn.Module:
    """A fresh base from ``out/base``, cast to `dtype`, with the saved adapter applied and loaded."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(out / "base")).to(dtype)
    if method != "adapter":
        lp.load_adapter(model, str(out), is_trainable=False)
        return model.eval()
    from safetensors.torch import load_file

    config = lp.AdapterConfig(**json.loads((out / "llmkern_adapter_config.json").read_text()))
    apply_method(model, "adapter", config)
    missing, unexpected = model.load_state_dict(load_file(str(out / "llmkern_adapter.safetensors")), strict=False)
    if unexpected or [k for k in missing if "llmkern_adapter" in k]:
        raise RuntimeError(f"the saved adapter does not fit the model: unexpected {unexpected[:3]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Training

def lr_at(step: int, phase: Phase) -> float:
    warm = max(1, phase.steps // 20)
    if step < warm:
        return phase.lr * (step + 1) / warm
    t = (step - warm) / max(1, phase.steps - warm)
    return phase.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass(slots=True)
class Dist:
    """This process's place in the job (world 1 when not launched by torchrun)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


def train(model: nn.Module, task: Task, tasks: tuple[str, ...], phase: Phase, setup: Setup, d: Dist, desc: str,
          *, loss_scaling: bool) -> dict:
    """One phase: FusedAdamW (fp32 masters for 16-bit parameters; clipping and the update in one
    fused pass), DynamicLossScaler when `loss_scaling`, llmkern DDP when `d.world > 1`."""
    from tqdm import tqdm

    from llmkern.optim import DynamicLossScaler, FusedAdamW, LossScalerConfig
    from llmkern.parallel import DDPConfig, DistributedDataParallel

    params = [p for p in model.parameters() if p.requires_grad]
    ddp = None
    if d.world > 1:
        # Gradients are summed and averaged in fp32 even when they are fp16/bf16.
        ddp = DistributedDataParallel(model, DDPConfig(reduce_dtype=torch.float32))
    run = ddp if ddp is not None else model
    opt = FusedAdamW(params, lr=phase.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, phase) / phase.lr)
    # growth_interval 100 (default 2000): a 200-step run shows the scale grow after clean steps.
    scaler = DynamicLossScaler(LossScalerConfig(growth_interval=100)) if loss_scaling else None
    per_rank = setup.batch // d.world
    model.train()
    first = last = None
    t0 = time.perf_counter()
    bar = tqdm(range(phase.steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5, disable=not d.main)
    for step in bar:
        tokens, mask = task.batch(tasks, per_rank)
        loss = target_loss(run, tokens, mask)
        (scaler.scale(loss) if scaler else loss).backward()  # DDP's buckets are all-reduced during this
        opt.clip_grad_norm_(1.0)                              # applied inside the fused step
        if scaler:
            scaler.step(opt, lr_scheduler=sched)  # a skipped step advances neither the weights nor the lr
            scaler.update()
        else:
            opt.step()
            if not opt.last_step_skipped:         # a non-finite gradient norm skips the step
                sched.step()
        opt.zero_grad(set_to_none=True)
        if step % setup.log_every == 0 or step == phase.steps - 1:
            last = d.mean(loss.item())  # every rank logs at the same steps, so this collective matches
            first = last if first is None else first
            extra = (f"  loss scale {scaler.get_scale():7.0f}  skipped {scaler.overflow_steps}" if scaler else "")
            if d.main:
                bar.write(f"  [{desc}] step {step:4d}  loss {last:.4f}  lr {sched.get_last_lr()[0]:.2e}{extra}")
                bar.set_postfix(loss=f"{last:.3f}")
    secs = time.perf_counter() - t0
    bar.close()
    stats = {"first_loss": first, "last_loss": last, "seconds": secs, "steps_per_s": phase.steps / secs,
             "loss_scale": scaler.get_scale() if scaler else None,
             "skipped_steps": scaler.overflow_steps if scaler else 0}
    if ddp is not None:
        s = ddp.stats
        stats.update(comm_mib=s.bytes_sent / 2**20, comm_seconds=s.comm_seconds, overlap=s.overlap_fraction)
        ddp.close()
    return stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmkern train", description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, default="lora", help="fine-tuning method (default lora)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16",
                    help="weights of the fine-tune (default float16, with the loss scaler; the base is "
                         "pretrained in float32)")
    ap.add_argument("--nproc", type=int, default=2,
                    help="data-parallel ranks; > 1 relaunches under torchrun with llmkern DDP (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 200, 150 with --quick)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="full-training steps of the base (default 600, 200 with --quick)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default per method)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the base and the adapter go")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on the adapter's input")
    ap.add_argument("--bottleneck", type=int, default=16, help="adapter bottleneck width")
    ap.add_argument("--virtual-tokens", type=int, default=8, help="prompt / P-tuning / prefix length")
    ap.add_argument("--backend", choices=["cpu", "ref"], default="cpu",
                    help="lora_linear backend: cpu = llmkern's C++ kernel, ref = plain PyTorch")
    ap.add_argument("--margin", type=float, default=None,
                    help="required accuracy gain for exit code 0 (default per method, lower with --quick)")
    # One thread per rank: this model's ops take microseconds, so a second OpenMP thread only adds
    # barriers, and on a busy 2-core machine those barriers made a step 25x slower (1250 ms vs 50 ms).
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (about a minute) for tests")
    ap.add_argument("--base", type=Path, default=None, metavar="DIR",
                    help="start from a base saved by an earlier run of the same size (its OUT/base) instead of "
                         "pretraining one (the fine-tuning batches then differ from a run that pretrains: the "
                         "pretraining draws from the same data stream)")
    args = ap.parse_args(argv)
    if args.base is not None and not (args.base / "config.json").is_file():
        ap.error(f"--base {args.base}: no config.json there (expected the base folder of an earlier run)")
    if args.nproc < 1:
        ap.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.r < 1 or args.bottleneck < 1 or args.virtual_tokens < 1:
        ap.error("--r, --bottleneck and --virtual-tokens must be >= 1")
    return args


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


ARGV_ENV = "LLMKERN_TRAIN_ARGV"
"""How the relaunched ranks get their flags: torchrun's own parser would otherwise take flags that
abbreviate its options (``--nproc`` for ``--nproc-per-node``, ``--r`` for ``--rdzv-*``)."""


def relaunch(nproc: int, argv: list[str]) -> int:
    """Runs this job on `nproc` local ranks under torchrun (gloo; the rendezvous picks a free port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmkern", "train"]
    print(f"llmkern demo: launching {nproc} ranks: torchrun {' '.join(cmd[3:])} (flags: {' '.join(argv)})", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **{ARGV_ENV: json.dumps(argv)})
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and _launched_by_torchrun() and ARGV_ENV in os.environ:
        argv = json.loads(os.environ[ARGV_ENV])
    args = parse_args(argv)
    if args.nproc > 1 and not _launched_by_torchrun():
        return relaunch(args.nproc, argv)
    d = Dist()
    if _launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
        d = Dist(dist.get_rank(), dist.get_world_size())
    try:
        return run(args, d)
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def run(args: argparse.Namespace, d: Dist) -> int:
    setup = QUICK if args.quick else FULL
    if setup.batch % d.world:
        raise ValueError(f"the global batch {setup.batch} does not split over {d.world} ranks")
    lr = args.lr if args.lr is not None else setup.finetune.lr * METHOD_LR[args.method]
    pretrain = replace(setup.pretrain, **({"steps": args.pretrain_steps} if args.pretrain_steps is not None else {}))
    finetune = replace(setup.finetune, lr=lr, **({"steps": args.steps} if args.steps is not None else {}))
    setup = replace(setup, pretrain=pretrain, finetune=finetune)
    margin = args.margin if args.margin is not None else MARGINS[args.method][1 if args.quick else 0]
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # its save/load bars would interleave with ours
    say = print if d.main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    out: Path = args.out

    task = Task(setup, seed=args.seed + 1, rank=d.rank)
    ranks = (f"{d.world} ranks (llmkern DDP, ring all-reduce over gloo)" if d.world > 1 else
             "1 rank (--nproc 1: no data parallelism)")
    say(f"llmkern demo: {args.method} fine-tune of a tiny Llama in {args.dtype}, on {ranks}; "
        f"{setup.n_eval} held-out strings of {setup.min_len}-{setup.max_len} digits; torch threads/rank "
        f"{torch.get_num_threads()}")

    # 1. The base: full fp32 training on the COPY and REV tasks (or one an earlier run saved).
    if args.base is not None:
        model = load_base(args.base, setup)
        say(f"\n[1/3] the base: loaded from {args.base} (no pretraining)")
        pre = None
    else:
        model = build_base(setup, args.seed)
        _, total = count_parameters(model)
        say(f"\n[1/3] pretraining the base on COPY and REV tasks: {total:,} parameters, {setup.layers} "
            f"layers, hidden {setup.hidden}, {setup.pretrain.steps} steps of {setup.batch} sequences")
        pre = train(model, task, ("copy", "reverse_marked"), setup.pretrain, setup, d, "pretrain", loss_scaling=False)
    if d.main:
        base = {w: accuracy(model, task, w) for w in ("copy", "reverse_marked", "reverse")}
        say(f"  base accuracy: COPY {base['copy']:.1%}, REV {base['reverse_marked']:.1%}, "
            f"reverse without a task token {base['reverse']:.1%}" +
            (f" (loss {pre['first_loss']:.3f} -> {pre['last_loss']:.3f}, {pre['steps_per_s']:.1f} steps/s)" if pre else ""))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out / "base"))
    d.barrier()

    # 2. The method on reversal without a task token, in 16-bit weights.
    model.to(dtype)
    torch.manual_seed(args.seed + 2)
    config = method_config(args)
    report = apply_method(model, args.method, config)
    trainable, total = count_parameters(model)
    scaling = dtype == torch.float16  # bf16 has fp32's exponent range and needs no loss scaling
    say(f"\n[2/3] {args.method} fine-tuning to reverse without a task token ({args.dtype} weights, fp32 masters in FusedAdamW"
        f"{', dynamic loss scaling' if scaling else ''}): {len(report.replaced)} modules, "
        f"lr {setup.finetune.lr:g}")
    say(f"  trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})")
    ft = train(model, task, ("reverse",), setup.finetune, setup, d, f"{args.method} reverse", loss_scaling=scaling)
    if d.world > 1:
        say(f"  DDP: {ft['comm_mib']:.1f} MiB sent per rank in {ft['comm_seconds']:.2f} s, "
            f"{ft['overlap']:.0%} of it overlapped with backward")
    if not d.main:
        d.barrier()
        return 0

    after_rev = accuracy(model, task, "reverse")
    after_copy = accuracy(model, task, "copy")
    say(f"  loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}, {ft['steps_per_s']:.1f} steps/s "
        f"({ft['seconds']:.1f} s)" + (f"; loss scale {ft['loss_scale']:.0f}, skipped steps {ft['skipped_steps']}"
                                      if scaling else ""))

    # 3. Save the adapter, reload it into a fresh base, compare logits.
    saved = save_method(model, args.method, config, out)
    model.eval()
    probe, _ = task.batch(("reverse",), 32)
    with torch.no_grad():
        ref_logits = model(input_ids=probe).logits
        diff = (ref_logits - load_method(out, args.method, dtype)(input_ids=probe).logits).abs().max().item()
        merged_diff = None
        if args.method == "lora":  # W + s·B·A folded into the weight: one plain GEMM per layer at inference
            lp.merge(model)
            merged_diff = (model(input_ids=probe).logits - ref_logits).abs().max().item()
            lp.unmerge(model)
        with lp.disable_adapters(model):  # the frozen base is untouched: without the adapter it copies again
            disabled_copy = accuracy(model, task, "copy")
    fmt = "PEFT's format" if args.method != "adapter" else "llmkern's format (PEFT has no bottleneck adapters)"
    say(f"\n[3/3] adapter saved to {saved} ({saved.stat().st_size / 1024:.0f} KiB, {fmt})")
    say(f"  reloaded into a fresh base: max |logits difference| = {diff:.3g} ({'identical' if diff == 0 else 'DIFFERENT'})")
    if merged_diff is not None:
        say(f"  merged into the base weights: max |logits difference| = {merged_diff:.2g} ({args.dtype} rounding)")
    say(f"  adapter disabled: copy accuracy {disabled_copy:.1%} (the frozen base is unchanged)")

    elapsed = time.perf_counter() - t_start
    gain = after_rev - base["reverse"]
    say("\nsummary")
    say(f"  held-out accuracy of reversal without a task token: before {base['reverse']:.1%}  after {after_rev:.1%}  "
        f"(gain {gain:+.1%}, required {margin:+.0%})")
    say(f"  copy accuracy: base {base['copy']:.1%}, with the adapter {after_copy:.1%}, adapter disabled "
        f"{disabled_copy:.1%}")
    if scaling:
        say(f"  fp16 loss scale at the end {ft['loss_scale']:.0f}; skipped (overflowed) steps {ft['skipped_steps']} "
            f"of {setup.finetune.steps}")
    say(f"  trainable {trainable:,} / total {total:,} parameters; steps/s: {args.method} {ft['steps_per_s']:.1f}"
        + (f", pretraining {pre['steps_per_s']:.1f}" if pre else "") + f"; {d.world} rank(s); total time {elapsed:.0f} s")
    rc = 0
    if diff != 0:
        say("FAILED: the reloaded adapter does not reproduce the trained model's logits")
        rc = 1
    elif gain < margin:
        say(f"FAILED: the accuracy gain {gain:+.1%} is below the required {margin:+.0%} "
            f"(try more --steps or a higher --lr)")
        rc = 1
    else:
        say("OK")
    d.barrier()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
