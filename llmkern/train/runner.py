"""`llmkern train --config FILE [--set a.b=value ...] [--resume RUN_DIR]`.

One run, from a checked TrainConfig (llmkern/train/config.py) to a folder of results:

    runs/<name>-<UTC timestamp>/
        config.yaml      the resolved config (what --resume reads back)
        metrics.jsonl    one line per logged step (loss, lr, loss scale, tokens/s), eval and summary lines
        loss.png         training and held-out loss against the step (matplotlib)
        base/            the frozen base the method was trained on (Hugging Face format)
        checkpoints/step-N/   torch.distributed.checkpoint of every rank's training state
        adapter/         the method in PEFT's format (PeftModel.from_pretrained(base, adapter) loads it)

The config is checked before anything starts; with parallel.nproc > 1 the command relaunches itself
under torchrun (``python -m torch.distributed.run --standalone``, gloo) and every rank rebuilds the
same config from the same file. Rank 0 shows a tqdm bar with the loss, the loss scale and tokens/s.
The layout (llmkern/train/layout.py) is any of DDP, ZeRO 1-3 with offload, a pipeline, tensor
parallelism, and their composition through llmkern.parallel.parallelize.

Evaluation and the saved method read a whole model on rank 0. Where rank 0's own model is not whole
(a pipeline stage, tp slices, ZeRO-3 shards at rest), a copy made before the layout was applied is
refreshed with every trainable parameter before each use: tp slices all-gathered over the tp group,
each stage's parameters sent by its ranks of tp and dp coordinate 0. So a tp run's adapter is saved
whole, in PEFT's format.

A checkpoint holds, per rank and keyed by parameter name: the trainable parameters, FusedAdamW's
state (moments, fp32 masters, step counts) and hyperparameters, the lr schedule, the loss scaler,
the data stream's generator and torch's RNG (dropout). Under ZeRO the parameters and optimizer state
are the engine's shards, written by llmkern.parallel.save_checkpoint (ZeRO over dp alone) or by
llmkern.parallel.tensor_parallel.checkpoint (ZeRO under tp or pp: dense names and shapes); without
ZeRO each tp rank's slices are keyed by its coordinate. `--resume RUN_DIR` loads the newest one and
continues the same run, drawing the same batches and dropout masks, so its losses equal the
uninterrupted run's (tests/train/test_resume.py; composed layouts in tests/train/test_smoke.py).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

import llmkern.peft as lp
from llmkern import demo
from llmkern.train import config as C
from llmkern.train import data as D
from llmkern.train.layout import parallelize

ENV_ARGV = "LLMKERN_TRAIN_RUN_ARGV"
"""The flags of the relaunched ranks (torchrun's own parser would take flags that abbreviate its options)."""
ENV_RUN_DIR = "LLMKERN_TRAIN_RUN_DIR"
"""The run folder the launcher made, so every rank writes into the same one."""
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_config_run(argv: list[str]) -> bool:
    """Whether `llmkern train` was given a config run (the other form is llmkern.demo's flags)."""
    return ENV_ARGV in os.environ or any(a.split("=")[0] in ("--config", "--resume", "--help", "-h") for a in argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmkern train", description="Train any method on any layout from a config file.",
                                 epilog="examples:\n  llmkern train --config examples/configs/lora.yaml\n"
                                        "  llmkern train --config examples/configs/dp.yaml --set optim.lr=1e-3\n"
                                        "  llmkern train --resume runs/lora-20260101-120000\n"
                                        "the older flag form, llmkern train --method lora --nproc 2 ..., runs "
                                        "llmkern/demo.py",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML (.yaml/.yml) or JSON (.json) file of a TrainConfig")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one field, typed by the field (repeatable)")
    ap.add_argument("--resume", type=Path, metavar="RUN_DIR",
                    help="continue a run from the newest checkpoint in RUN_DIR/checkpoints")
    ap.add_argument("--check", action="store_true", help="check the config, print it and exit")
    args = ap.parse_args(argv)
    if (args.config is None) == (args.resume is None):
        ap.error("give exactly one of --config FILE and --resume RUN_DIR")
    return args


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / ".metadata").is_file()]
    return max(found) if found else None


def resolve(args: argparse.Namespace) -> tuple[C.TrainConfig, Path, bool]:
    """(config, run folder, resuming). Raises ConfigError before anything is started."""
    if args.resume is not None:
        run_dir = args.resume
        if not (run_dir / "config.yaml").is_file():
            raise C.ConfigError(f"--resume {run_dir}: no config.yaml there (expected a folder made by llmkern train)")
        if latest_checkpoint(run_dir) is None:
            raise C.ConfigError(f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'} "
                                f"(set checkpoint.every to save them)")
        return C.load_config(run_dir / "config.yaml", args.overrides), run_dir, True
    config = C.load_config(args.config, args.overrides)
    if ENV_RUN_DIR in os.environ:
        return config, Path(os.environ[ENV_RUN_DIR]), False
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(config.logging.out_dir) / f"{config.logging.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():  # two runs started in the same second get their own folders too
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return config, run_dir, False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and ENV_ARGV in os.environ:
        argv = json.loads(os.environ[ENV_ARGV])
    args = parse_args(argv)
    try:
        config, run_dir, resuming = resolve(args)
    except C.ConfigError as e:
        print(f"llmkern train: bad config: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump(C.to_dict(config), sort_keys=False), end="")
        return 0
    if not resuming and not _launched_by_torchrun():
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(C.to_dict(config), sort_keys=False))
    nproc = config.parallel.nproc
    if nproc > 1 and not _launched_by_torchrun():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "llmkern", "train"]
        print(f"llmkern train: {nproc} ranks under torchrun, run folder {run_dir}", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(config.schedule.threads),
                   **{ENV_ARGV: json.dumps(argv), ENV_RUN_DIR: str(run_dir)})
        return subprocess.call(cmd, env=env)
    world = int(os.environ.get("WORLD_SIZE", "1")) if _launched_by_torchrun() else 1
    if world != nproc:
        print(f"llmkern train: parallel.nproc is {nproc} but torchrun started {world} processes", file=sys.stderr)
        return 2
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=config.parallel.timeout_s))
    try:
        return Run(config, run_dir, resuming).run()
    finally:
        if world > 1:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------

def choose_precision(requested: str) -> tuple[str, str]:
    """(dtype, why) for precision.dtype."""
    if requested != "auto":
        return requested, "set in the config"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "a GPU with bf16: fp32's exponent range, no loss scaling needed"
        return "fp16", "a GPU without bf16: fp16 with the dynamic loss scaler"
    # The demo's LoRA fine-tune on this project's 2-core CPUs ran 20.7 steps/s in fp32, 7.4 in bf16 and
    # 1.9 in fp16 (torch's 16-bit CPU matmuls are slower than its fp32 ones), so fp32 is the CPU default.
    return "fp32", "a CPU: torch's fp32 matmuls are faster here than its bf16 and fp16 ones"


def kernels_note(c: C.TrainConfig) -> str:
    """Which of llmkern's fused kernels the run uses, in words."""
    parts = ["FusedAdamW (unscale, clip and AdamW in one fused step over fp32 masters)"]
    if c.method.name == "lora":
        parts.append(f"the fused lora_linear op (backend {c.kernels.lora_backend or 'chosen per device and dtype'})")
    elif c.method.name == "adapter":
        parts.append("the fused adapter_bottleneck op")
    if c.kernels.patch:
        parts.append("llmkern.patch.apply_llmkern_kernels (fused RMSNorm, SwiGLU, RoPE and loss)")
    else:
        parts.append("kernels.patch is off, so norms, SwiGLU, RoPE and the loss stay transformers'")
    return "; ".join(parts)


def lr_factor(step: int, s: C.ScheduleConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to min_lr_ratio."""
    warm = max(1, round(s.steps * s.warmup_fraction)) if s.warmup_fraction > 0 else 0
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, s.steps - warm)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def lm_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the scored tokens (labels != -100). Prompt tuning and
    P-tuning prepend virtual positions to the logits: the last T-1 positions are the ones scored."""
    inputs = tokens[:, :-1]
    logits = model(input_ids=inputs).logits[:, -inputs.shape[1]:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def method_config(m: C.MethodConfig, k: C.KernelsConfig):
    return {
        "lora": lambda: lp.LoraConfig(r=m.r, alpha=m.alpha, dropout=m.dropout, target_modules=list(m.target_modules),
                                      backend=k.lora_backend),
        "adapter": lambda: lp.AdapterConfig(bottleneck=m.bottleneck, activation="gelu"),
        "prefix": lambda: lp.PrefixTuningConfig(num_virtual_tokens=m.virtual_tokens, projection=True),
        "prompt": lambda: lp.PromptTuningConfig(num_virtual_tokens=m.virtual_tokens),
        "ptuning": lambda: lp.PTuningConfig(num_virtual_tokens=m.virtual_tokens, encoder="mlp"),
    }[m.name]()


class Run:
    """One rank's part of a run."""

    def __init__(self, config: C.TrainConfig, run_dir: Path, resuming: bool):
        self.c, self.dir, self.resuming = config, run_dir, resuming
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.main = self.rank == 0

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k, flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # --- building -------------------------------------------------------------------------------

    def _data_replica(self) -> int:
        import llmkern.parallel as lpar

        p = self.c.parallel
        if self.world == 1:
            return 0
        dims = lpar.ParallelDims.from_config(lpar.ParallelConfig(dp=p.dp, tp=p.tp, pp=p.pp), self.world)
        return dims.coordinates(self.rank)["dp"]

    def _setup(self) -> demo.Setup:
        c = self.c
        return demo.Setup(hidden=c.model.hidden, layers=c.model.layers, heads=c.model.heads,
                          intermediate=c.model.intermediate, min_len=c.data.min_len, max_len=c.data.max_len,
                          batch=c.data.batch_size, pretrain=demo.Phase(steps=max(1, c.schedule.pretrain_steps),
                                                                       lr=c.schedule.pretrain_lr),
                          finetune=demo.Phase(steps=c.schedule.steps, lr=c.optim.lr), n_eval=c.eval.examples,
                          log_every=max(1, c.schedule.pretrain_steps // 4))

    def _build_data(self):
        c = self.c
        if c.data.source == "synthetic":
            return D.SyntheticData(self._setup(), c.schedule.seed, self.replica)
        return D.JsonlData(c.data.path, c.data.tokenizer, c.data.seq_len, c.data.eval_fraction, c.schedule.seed,
                           self.replica)

    def _build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        c, data = self.c, self.data
        if (self.dir / "base" / "config.json").is_file() and self.resuming:
            return LlamaForCausalLM.from_pretrained(str(self.dir / "base")) if c.model.source == "tiny" else \
                AutoModelForCausalLM.from_pretrained(str(self.dir / "base"), local_files_only=True)
        if c.model.source == "local":
            return AutoModelForCausalLM.from_pretrained(c.model.path, local_files_only=True, dtype=torch.float32)
        torch.manual_seed(c.schedule.seed)
        max_pos = (2 * c.data.max_len + 4 if c.data.source == "synthetic" else c.data.seq_len) + c.method.virtual_tokens
        m = c.model
        cfg = LlamaConfig(vocab_size=data.vocab_size, hidden_size=m.hidden, intermediate_size=m.intermediate,
                          num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.heads,
                          max_position_embeddings=max_pos, pad_token_id=data.pad_token_id,
                          bos_token_id=data.bos_token_id, eos_token_id=data.eos_token_id, tie_word_embeddings=False,
                          attn_implementation="sdpa")
        return LlamaForCausalLM(cfg)

    def _pretrain(self, model: nn.Module) -> None:
        """Full fp32 training of the tiny base on COPY and REV, data-parallel over every rank."""
        c = self.c
        setup = self._setup()
        task = demo.Task(setup, seed=c.schedule.seed + 1, rank=self.rank)
        d = demo.Dist(self.rank, self.world)
        self.say(f"pretraining the base on COPY and REV: {c.schedule.pretrain_steps} steps of {setup.batch} sequences "
                 f"on {self.world} rank(s)")
        stats = demo.train(model, task, ("copy", "reverse_marked"), setup.pretrain, setup, d, "pretrain",
                           loss_scaling=False)
        self.say(f"  pretraining loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} "
                 f"({stats['steps_per_s']:.1f} steps/s)")

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        c = self.c
        torch.set_num_threads(c.schedule.threads)
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        t_start = time.perf_counter()
        self.dtype_name, why = choose_precision(c.precision.dtype)
        dtype = DTYPES[self.dtype_name]
        self.replica = self._data_replica()
        self.data = self._build_data()
        self.say(f"llmkern train: {c.logging.name}: {c.method.name} on {self._layout_words()}, {self.dtype_name} "
                 f"weights ({why}); run folder {self.dir}")

        self.say(f"  kernels: {kernels_note(c)}")
        model = self._build_model()
        fresh_base = not (self.resuming and (self.dir / "base" / "config.json").is_file())
        if fresh_base and c.schedule.pretrain_steps:
            self._pretrain(model)
        if self.main and fresh_base and c.method.name != "full" and not (self.dir / "base").exists():
            model.save_pretrained(str(self.dir / "base"))  # the adapter's base, for PEFT and for --resume
        self.barrier()
        self.metrics_path = self.dir / "metrics.jsonl"
        synthetic = c.data.source == "synthetic"
        before = None
        if self.resuming:
            step0 = latest_checkpoint(self.dir)[0]
            if self.main:
                before = self._truncate_metrics(step0)
        elif self.main:
            before = self.data.accuracy(model) if synthetic else None
            self._log({"event": "start", "accuracy_before": before, "dtype": self.dtype_name, "precision_reason": why,
                       "world": self.world})
            if synthetic:
                self.say(f"  held-out exact match before training: {before:.1%}")

        model.to(dtype)
        torch.manual_seed(c.schedule.seed + 2)
        self.peft_config = None
        if c.method.name != "full":
            self.peft_config = method_config(c.method, c.kernels)
            demo.apply_method(model, c.method.name, self.peft_config)
        # Rank 0 evaluates and saves a whole copy, refreshed from every rank before each use (_full_model),
        # where its own model is not whole: a pipeline stage, tp slices, or ZeRO-3's shards at rest. It is
        # copied before the kernels are patched in (a patched model holds modules deepcopy cannot copy;
        # the patch keeps every parameter's name, so the copy takes the trained values by name).
        self.model_is_whole = c.parallel.pp == 1 and c.parallel.tp == 1 and c.parallel.zero_stage != 3
        self.eval_model = copy.deepcopy(model) if self.main and not self.model_is_whole else None
        if c.kernels.patch:
            from llmkern.patch import apply_llmkern_kernels
            report = apply_llmkern_kernels(model)
            self.say("  " + str(report).replace("\n", "\n  "))
        trainable, total = lp.count_parameters(model)
        self.say(f"  trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})")
        from llmkern.optim import FusedAdamW
        self.layout = parallelize(model, c.parallel, optimizer_class=FusedAdamW,
                                  optimizer_kwargs={"lr": c.optim.lr, "betas": c.optim.betas, "eps": c.optim.eps,
                                                    "weight_decay": c.optim.weight_decay})
        self.model = model
        rc = self._train(dtype, before, trainable, total, t_start)
        self.layout.close()
        return rc

    def _layout_words(self) -> str:
        p = self.c.parallel
        if p.nproc == 1:
            return "1 process"
        parts = [f"dp {p.dp}"] + ([f"pp {p.pp} ({p.schedule}, {p.microbatches} micro-batches)"] if p.pp > 1 else [])
        parts += ([f"tp {p.tp}"] if p.tp > 1 else []) + ([f"ZeRO-{p.zero_stage}"] if p.zero_stage else [])
        parts += ["optimizer offloaded to the CPU"] if p.offload else []
        return f"{p.nproc} ranks ({', '.join(parts)})"

    def _train(self, dtype, before, trainable, total, t_start) -> int:
        from tqdm import tqdm

        from llmkern.optim import DynamicLossScaler, LossScalerConfig

        c, layout = self.c, self.layout
        opt = layout.optimizer
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c.schedule))
        scaler = None
        if self.dtype_name == "fp16":
            scaler = DynamicLossScaler(LossScalerConfig(init_scale=c.precision.init_scale,
                                                        growth_interval=c.precision.growth_interval),
                                       process_group=dist.group.WORLD if self.world > 1 else None)
        self.opt, self.sched, self.scaler = opt, sched, scaler
        start = 0
        if self.resuming:
            start = self._load_checkpoint()
            self.say(f"  resumed from {self.dir / 'checkpoints' / f'step-{start}'}")
        elif c.eval.every:
            self._evaluate(0, None)  # the curve's starting point
        per_replica = c.data.batch_size // layout.data_world
        bar = tqdm(range(start, c.schedule.steps), initial=start, total=c.schedule.steps, desc=c.logging.name,
                   unit="step", dynamic_ncols=True, mininterval=0.5, disable=not (self.main and c.logging.progress))
        tokens_seen, t_window, t0 = 0, time.perf_counter(), time.perf_counter()
        last_loss = None
        model = self.model
        model.train()
        for step in bar:
            tokens, labels = self.data.batch(per_replica)
            if layout.pipe is not None:
                loss = layout.pipe.train_step(tokens, labels, scaler=scaler)
            else:
                loss = lm_loss(layout.forward, tokens, labels)
                (scaler.scale(loss) if scaler else loss).backward()  # DDP reduces buckets during this
            if c.optim.clip_norm is not None:
                opt.clip_grad_norm_(c.optim.clip_norm)  # applied inside the fused step
            if scaler:
                scaler.step(opt, lr_scheduler=sched)  # a skipped step advances neither weights nor lr
                scaler.update()
            else:
                opt.step()
                if not opt.last_step_skipped:
                    sched.step()
            if layout.pipe is not None and layout.zero is None:
                layout.pipe.zero_grad()
            else:  # ZeRO's gradients are views into its buckets: its optimizer zeroes them
                opt.zero_grad(set_to_none=True)
            tokens_seen += int((labels != -100).sum()) * layout.data_world
            done = step + 1
            if done % c.logging.log_every == 0 or done == c.schedule.steps:
                last_loss = self._mean(loss.detach().float().item())
                now = time.perf_counter()
                tps = tokens_seen / max(now - t_window, 1e-9)
                tokens_seen, t_window = 0, now
                row = {"step": done, "loss": last_loss, "lr": sched.get_last_lr()[0], "tokens_per_s": tps}
                if scaler:
                    row.update(scale=scaler.get_scale(), skipped=scaler.overflow_steps)
                if self.main:
                    self._log(row)
                    bar.set_postfix(loss=f"{last_loss:.3f}", **({"scale": f"{scaler.get_scale():.0f}"} if scaler else {}),
                                    tok_s=f"{tps:.0f}")
            if c.eval.every and done % c.eval.every == 0 and done != c.schedule.steps:
                self._evaluate(done, bar)
            if c.checkpoint.every and done % c.checkpoint.every == 0:
                self._save_checkpoint(done)
        bar.close()
        seconds = time.perf_counter() - t0
        steps_run = c.schedule.steps - start
        full = self._evaluate(c.schedule.steps, None)
        bytes_rank = self._bytes_per_rank()
        after = self.data.accuracy(full) if c.data.source == "synthetic" and self.main else None
        if not self.main:
            self.barrier()
            return 0
        saved = self._save_method(full) if c.checkpoint.save_adapter else None
        png = self._plot() if c.logging.plot else None
        summary = {"event": "end", "accuracy_before": before, "accuracy_after": after,
                   "steps_per_s": steps_run / seconds if seconds > 0 else None, "steps": steps_run,
                   "skipped_steps": scaler.overflow_steps if scaler else 0,
                   "loss_scale": scaler.get_scale() if scaler else None, "last_loss": last_loss,
                   "bytes_per_rank": bytes_rank, "trainable": trainable, "total": total,
                   "seconds": time.perf_counter() - t_start}
        self._log(summary)
        rc = self._summarize(summary, saved, png)
        self.barrier()
        return rc

    def _mean(self, x: float) -> float:
        if self.world == 1 or self.layout.pipe is not None:  # the pipeline's loss is already the batch mean
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    # --- eval, metrics, plot, summary ---------------------------------------------------------

    @torch.no_grad()
    def _full_model(self) -> nn.Module | None:
        """On rank 0: the whole trained model; None on the other ranks. Where rank 0's model is not
        whole (a pipeline stage, tp slices, ZeRO-3 shards) its copy is refreshed with every trainable
        parameter: tp slices all-gathered over the tp group, then each stage's from the ranks of tp and
        dp coordinate 0. A collective then (every rank calls it)."""
        layout = self.layout
        if self.model_is_whole:  # one process, DDP, ZeRO 1-2 (after the last step's all-gather)
            if layout.zero is not None:
                layout.zero.wait_for_parameters()
            return self.model if self.main else None
        from llmkern.parallel.tensor_parallel import TP_LAYOUT

        mine = {}
        with layout.whole_parameters():
            for name, p in layout.named_parameters():
                if not p.requires_grad:
                    continue  # frozen weights are the copy's own
                t = p.detach()
                split = getattr(p, TP_LAYOUT, None)
                if split is not None:  # torch's all_gather, not llmkern's: the summary's bytes sent are training's
                    blocks = [torch.empty_like(t) for _ in range(split.world)]
                    dist.all_gather(blocks, t.contiguous(), group=layout.run.mesh["tp"].get_group())
                    t = split.unshard(torch.cat(blocks, split.dim))
                mine[name] = t.cpu().clone()
        if layout.pipe is not None:
            coords = layout.run.coordinates
            shards = [None] * self.world if self.main else None
            dist.gather_object(mine if coords["tp"] == 0 and coords["dp"] == 0 else {}, shards, dst=0)
            if self.main:
                mine = {k: v for s in shards for k, v in s.items()}
        if not self.main:
            return None
        params = dict(self.eval_model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in mine)
        if missing or set(mine) - set(params):
            raise RuntimeError(f"the ranks hold no value for {missing[:3]} and values for unknown parameters "
                               f"{sorted(set(mine) - set(params))[:3]}")
        for n, t in mine.items():
            params[n].copy_(t)
        return self.eval_model

    @torch.no_grad()
    def _evaluate(self, step: int, bar) -> nn.Module | None:
        full = self._full_model()
        if self.main:
            was = full.training
            full.eval()
            tokens, labels = self.data.eval_batch()
            loss = float(lm_loss(full, tokens, labels))
            full.train(was)
        if self.main:
            self._log({"step": step, "eval_loss": loss})
            if bar is not None:
                bar.write(f"  step {step}: held-out loss {loss:.4f}")
        self.barrier()
        return full

    def _log(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, step: int):
        """Drops the lines written after checkpoint `step` (the resumed run writes them again);
        returns the accuracy before training that the first run measured."""
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()] if self.metrics_path.exists() else []
        kept = [r for r in rows if r.get("event") == "start" or r.get("step", 0) <= step and "event" not in r]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return next((r["accuracy_before"] for r in rows if r.get("event") == "start"), None)

    def _plot(self) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="training loss")
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (scored tokens)")
        ax.set_yscale("log")
        c = self.c
        ax.set_title(f"{c.logging.name}: {c.method.name}, {self._layout_words()}, {self.dtype_name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _bytes_per_rank(self) -> list[dict]:
        """Per rank: bytes of parameters, gradients and optimizer state held, and bytes sent."""
        if self.layout.zero is not None:  # the engine's own count: shards, freed buckets, host states
            mem = self.layout.zero.memory()
            mine = {"rank": self.rank, "params": mem.parameters, "grads": mem.gradients,
                    "optimizer": mem.optimizer_states + mem.host_optimizer_states, "sent": self.layout.bytes_sent()}
            out = [None] * self.world
            dist.all_gather_object(out, mine)
            return out
        params = sum(t.numel() * t.element_size() for t in {id(p): p for p in self._local_params()}.values())
        grads = sum(p.numel() * p.element_size() for p in self.layout.parameters())
        optim = sum(v.numel() * v.element_size() for st in self.opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
        mine = {"rank": self.rank, "params": params, "grads": grads, "optimizer": optim,
                "sent": self.layout.bytes_sent()}
        if self.world == 1:
            return [mine]
        out = [None] * self.world
        dist.all_gather_object(out, mine)
        return out

    def _local_params(self):
        return [p for _, p in self.layout.named_parameters()]

    def _save_method(self, model: nn.Module) -> Path:
        out = self.dir / ("model" if self.c.method.name == "full" else "adapter")
        if self.c.method.name == "full":
            model.save_pretrained(str(out))
            return out
        return demo.save_method(model, self.c.method.name, self.peft_config, out)

    def _summarize(self, s: dict, saved: Path | None, png: Path | None) -> int:
        c = self.c
        mib = 2 ** 20
        self.say("\nsummary")
        if s["accuracy_after"] is not None:
            gain = s["accuracy_after"] - (s["accuracy_before"] or 0.0)
            self.say(f"  held-out exact match: before {s['accuracy_before']:.1%}  after {s['accuracy_after']:.1%}  "
                     f"(gain {gain:+.1%})")
        self.say(f"  steps/s {s['steps_per_s']:.2f} over {s['steps']} steps; last loss {s['last_loss']:.4f}; "
                 f"skipped steps {s['skipped_steps']}" + (f"; loss scale {s['loss_scale']:.0f}" if s["loss_scale"] else ""))
        for b in s["bytes_per_rank"]:
            self.say(f"  rank {b['rank']}: parameters {b['params'] / mib:.2f} MiB, gradients {b['grads'] / mib:.2f} MiB, "
                     f"optimizer state {b['optimizer'] / mib:.2f} MiB, sent {b['sent'] / mib:.1f} MiB")
        self.say(f"  trainable {s['trainable']:,} of {s['total']:,} parameters; {self.dtype_name}; "
                 f"total time {s['seconds']:.0f} s")
        if saved is not None:
            self.say(f"  saved {saved}")
        if png is not None:
            self.say(f"  loss curve {png}")
        threshold = c.eval.min_accuracy_gain
        if threshold is not None and s["accuracy_after"] is not None:
            gain = s["accuracy_after"] - (s["accuracy_before"] or 0.0)
            if gain < threshold:
                self.say(f"FAILED: the accuracy gain {gain:+.1%} is below eval.min_accuracy_gain {threshold:+.0%}")
                return 1
        self.say("OK")
        return 0

    # --- checkpoints ----------------------------------------------------------------------------

    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        src = self.layout.named_parameters()
        # Each tp rank holds its own slices under one name: its coordinate keeps them apart.
        prefix = f"tp{self.layout.tp_rank}." if self.c.parallel.tp > 1 else ""
        return [(prefix + n, p) for n, p in src if p.requires_grad]

    def _state(self, template: bool) -> dict:
        """This rank's training state keyed for torch.distributed.checkpoint. Parameters and optimizer
        state are keyed by parameter name (replicas save one copy; pipeline stages hold disjoint
        names); what differs per rank (RNG, data stream) is under this rank's own key.
        template: tensors shaped like the state, for a load to fill in place."""
        named = self._named_trainable()
        opt = self.opt
        optim = {}
        for n, p in named:
            if template:
                st = {k: torch.zeros(p.shape, dtype=opt.state_dtype) for k in opt.fused_update.state_keys}
                if opt.master_weights and p.dtype in (torch.float16, torch.bfloat16):
                    st["master_param"] = torch.zeros(p.shape, dtype=torch.float32)
                st["step"] = torch.zeros((), dtype=torch.float32)
            else:
                st = {k: (v.detach().reshape(()).float() if k == "step" else v.detach())
                      for k, v in opt.state[p].items() if torch.is_tensor(v)}
            optim[n] = st
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        return {
            "model": {n: (torch.zeros_like(p) if template else p.detach()) for n, p in named},
            "optim": optim,
            f"rank{self.rank}": {**self._rank_state(), "groups": groups},
        }

    def _rank_state(self) -> dict:
        """What differs per rank: the RNG, the data stream, the lr schedule and the loss scaler."""
        return {"rng": torch.get_rng_state(), "data": self.data.state_dict()["generator"],
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def _load_rank_state(self, mine: dict) -> None:
        self.sched.load_state_dict(mine["sched"])
        if self.scaler is not None:
            self.scaler.load_state_dict(mine["scaler"])
        self.data.load_state_dict({"generator": mine["data"]})
        torch.set_rng_state(mine["rng"])

    def _save_checkpoint(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.dir / "checkpoints" / f"step-{step}"
        if self.layout.zero is not None:  # ZeRO's sharded state, keyed by parameter name (any world, any stage)
            extra = {f"rank{self.rank}": self._rank_state()}
            if self.layout.run is not None:  # dense names and shapes, reshardable across tp, pp and dp
                from llmkern.parallel.tensor_parallel import checkpoint as tp_checkpoint
                tp_checkpoint.save_checkpoint(path, self.layout.run, self.opt, **extra)
            else:
                import llmkern.parallel as lpar
                lpar.save_checkpoint(path, self.layout.zero, self.opt, **extra)
        else:
            dcp.save(self._state(template=False), checkpoint_id=str(path))
        self.barrier()

    @torch.no_grad()
    def _load_checkpoint(self) -> int:
        import torch.distributed.checkpoint as dcp

        step, path = latest_checkpoint(self.dir)
        if self.layout.zero is not None:
            mine = {f"rank{self.rank}": None}
            if self.layout.run is not None:
                from llmkern.parallel.tensor_parallel import checkpoint as tp_checkpoint
                got = tp_checkpoint.load_checkpoint(path, self.layout.run, self.opt, **mine)
            else:
                import llmkern.parallel as lpar
                got = lpar.load_checkpoint(path, self.layout.zero, self.opt, **mine)
            self._load_rank_state(got[f"rank{self.rank}"])
            return step
        state = self._state(template=True)
        dcp.load(state, checkpoint_id=str(path))
        named = self._named_trainable()
        for n, p in named:
            p.copy_(state["model"][n])
        mine = state[f"rank{self.rank}"]
        index = {id(p): i for i, p in enumerate(q for g in self.opt.param_groups for q in g["params"])}
        groups = []
        for g, saved in zip(self.opt.param_groups, mine["groups"]):
            groups.append({**saved, "params": [index[id(p)] for p in g["params"]]})
        self.opt.load_state_dict({"state": {index[id(p)]: state["optim"][n] for n, p in named},
                                  "param_groups": groups})
        self._load_rank_state(mine)
        return step
