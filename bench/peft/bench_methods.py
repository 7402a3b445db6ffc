"""One training step of a tiny Llama for each parameter-efficient method, in one table.

Model: ``LlamaForCausalLM`` from a config (hidden 256, 4 layers, 4 heads, MLP 688, vocab 1024; no
download), fp32, batch 8 × 128 tokens, torch threads 2. A step is forward + loss + backward +
``torch.optim.AdamW`` on the trainable parameters (the same optimizer for every row, so the rows
differ only in the method). Rows:

- ``full``: every parameter trained (the reference the methods are meant to undercut);
- ``lora_llmkern``: llmkern.peft.apply_lora, r=8 on all linear layers (fused ``LoRALinear``, dropout 0.05);
- ``lora_peft``: PEFT's ``get_peft_model`` with the same LoRA config;
- ``adapter``: llmkern bottleneck adapters (series, bottleneck 16) after attention and MLP;
- ``prefix``: llmkern prefix tuning, 16 virtual tokens with the MLP reparameterisation;
- ``prompt``: llmkern prompt tuning, 16 virtual tokens; ``ptuning``: P-tuning, 16 tokens, MLP encoder.

Columns: median step time and its ratio to ``full`` (all rows interleaved in one process,
bench/_harness.py), trainable parameters, bytes of the tensors autograd saves for backward
(``saved_tensors_hooks``; parameters excluded, each storage once), trainable-state bytes (parameter,
gradient and two AdamW moments, fp32), and the peak resident memory of a fresh process that builds
the model and runs 3 steps of that method alone (``VmHWM``; skipped with ``--quick``).
Ratios (bench/_harness.Ratio, median and min-max of the per-round ratios): llmkern's LoRA step time
and saved activations against PEFT's, and every method's step time against full fine-tuning.

    python bench/peft/bench_methods.py            # the sizes above (about 1-2 minutes)
    python bench/peft/bench_methods.py --quick    # a smaller model, seconds (the smoke test)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import (Ratio, environment, format_ratios, format_table, measure, saved_storages,  # noqa: E402
                      wait_for_quiet_cpu, write_results)

METHODS = ("full", "lora_llmkern", "lora_peft", "adapter", "prefix", "prompt", "ptuning")
FULL_SIZE = dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=1024, batch=8, seq=128)
QUICK_SIZE = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=256, batch=2, seq=32)


def build_base(size: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                      num_key_value_heads=size["heads"], max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def apply(method: str, model):
    """`model` with `method` applied (PEFT returns a wrapper; llmkern modifies in place)."""
    import llmkern.peft as lp

    if method == "full":
        return model
    if method == "lora_llmkern":
        lp.apply_lora(model, lp.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear", backend="cpu"))
        return model
    if method == "lora_peft":
        import peft
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                          target_modules="all-linear"))
    if method == "adapter":
        lp.apply_adapters(model, lp.AdapterConfig(bottleneck=16))
    elif method == "prefix":
        lp.apply_prefix_tuning(model, lp.PrefixTuningConfig(num_virtual_tokens=16, projection=True))
    elif method == "prompt":
        lp.apply_prompt_tuning(model, lp.PromptTuningConfig(num_virtual_tokens=16))
    elif method == "ptuning":
        lp.apply_p_tuning(model, lp.PTuningConfig(num_virtual_tokens=16, encoder="mlp"))
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return model


class Step:
    """One training step of one method on fixed data."""

    def __init__(self, method: str, base, size: dict):
        self.model = apply(method, copy.deepcopy(base)).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g)

    def loss(self):
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def __call__(self):
        loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def saved_bytes(self) -> int:
        return sum(saved_storages(self.loss, self.model.parameters()).values())

    def state_bytes(self) -> int:
        # parameter + gradient + AdamW's exp_avg and exp_avg_sq, all fp32 here
        return sum(4 * p.numel() * p.element_size() for p in self.params)


def child(method: str, quick: bool) -> None:
    """Peak RSS of a process running only `method`: printed as one JSON line."""
    torch.set_num_threads(2)
    size = QUICK_SIZE if quick else FULL_SIZE
    base = build_base(size)
    before = _hwm_kib()
    step = Step(method, base, size)
    del base
    for _ in range(3):
        step()
    peak = _hwm_kib()
    print(json.dumps({"method": method, "peak_rss_mib": peak / 1024, "step_rss_mib": (peak - before) / 1024}))


def _hwm_kib() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent through fork and exec, so every child reported the parent's growing peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss(method: str, quick: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                     os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, __file__, "--child", method] + (["--quick"] if quick else []),
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model and few rounds (the smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7, 2 with --quick)")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.quick)
        return 0
    # --quick: one thread, as the smoke test runs beside other tests on 2 cores, where OpenMP
    # barriers of a 2-thread pool cost more than these tiny ops.
    torch.set_num_threads(1 if args.quick else 2)
    size = QUICK_SIZE if args.quick else FULL_SIZE
    rounds = args.rounds or (2 if args.quick else 7)
    base = build_base(size)
    steps = {m: Step(m, base, size) for m in METHODS}
    if not args.quick:
        wait_for_quiet_cpu()
    meas = measure(steps, warmup=1, repeats=1 if args.quick else 2, rounds=rounds)
    rows = []
    for m, st in steps.items():
        trainable = sum(p.numel() for p in st.params)
        total = sum(p.numel() for p in st.model.parameters())
        row = {"bench": "peft_methods", "candidate": m, "dtype": "fp32", "median_ms": meas.median_ms(m),
               "ratio_vs_full": meas.ratio(m, "full"), "trainable_params": trainable, "total_params": total,
               "saved_mib": st.saved_bytes() / 2**20, "state_mib": st.state_bytes() / 2**20}
        if not args.quick:
            row["peak_rss_mib"] = peak_rss(m, args.quick)["peak_rss_mib"]
        rows.append(row)
    sb = {r["candidate"]: r["saved_mib"] for r in rows}
    ratios = [Ratio.from_rounds("LoRA step time / PEFT's", meas.round_ratios("lora_llmkern", "lora_peft"),
                                peer="peft", higher_is_better=False),
              Ratio(name="LoRA saved activations / PEFT's", value=sb["lora_llmkern"] / sb["lora_peft"], peer="peft",
                    higher_is_better=False)]
    ratios += [Ratio.from_rounds(f"{m} step time / full fine-tuning's", meas.round_ratios(m, "full"),
                                 peer="full fine-tuning", higher_is_better=False) for m in METHODS if m != "full"]
    cols = ["candidate", "median_ms", "ratio_vs_full", "trainable_params", "saved_mib", "state_mib"]
    cols += ["peak_rss_mib"] if not args.quick else []
    print(f"one training step, tiny Llama {size} (fp32, AdamW, torch threads {torch.get_num_threads()}, "
          f"contention {meas.contention if meas.contention is not None else float('nan'):.0%})")
    print(format_table(rows, cols))
    print()
    print(format_ratios(ratios))
    name = "peft_methods_quick" if args.quick else "peft_methods"
    paths = write_results(name, rows, environment(meas.contention, size=size, rounds=rounds, quick=args.quick),
                          ratios)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
