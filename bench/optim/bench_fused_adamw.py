"""CPU benchmark of the fused optimizer step against its peers, all measured in the same run.

    python bench/optim/bench_fused_adamw.py            # 16Mi params (default, ~1 min)
    python bench/optim/bench_fused_adamw.py --full     # 64Mi params
    python bench/optim/bench_fused_adamw.py --quick    # 1Mi params, 3 rounds: seconds (the smoke test)

Groups (bytes moved per parameter in brackets; GB/s = bytes / time). The candidates of a group run
interleaved, round by round (bench/_harness.measure), so every ratio is a median of per-round ratios
with its min-max over the rounds:
  fp32 AdamW      in-place axpy y += a*x [12] (the memory roofline of this machine, right now) ·
                  torch AdamW(fused=True) · DeepSpeedCPUAdam · llmkern CPUAdam and FusedAdamW [28]
  mixed fp16      fp16 model grads -> fp32 masters -> fp16 model copy, loss scale 1024:
                  torch: grad.float() + GradScaler-style unscale_ + AdamW(fused) + copy_  [48]
                  llmkern: FusedAdamW(master_weights) + DynamicLossScaler (overflow pass [2] + fused step [28]) [30]
                  DeepSpeedCPUAdam with fp16 params and fp32 states (no fp32 master) [22]
  bf16 states     torch AdamW(fused) on bf16 params and states · llmkern bf16 params, state_dtype=bf16,
                  rounded to nearest and stochastically [14]
Goals: CPUAdam and FusedAdamW >= 0.95 of the roofline (28 B/param at the axpy bandwidth), CPUAdam
>= 1.0x torch fused and DeepSpeed; the mixed step >= 1.5x the torch composition (and, keeping fp32
masters, 0.9x DeepSpeed on fp16 params without them); bf16 states >= 1.6x torch fused bf16.
DeepSpeed is imported from $LLMKERN_DEEPSPEED_PATH (a pip --target folder) when set, else from the
environment; when it is missing its rows say so and are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from llmkern.optim import CPUAdam, DynamicLossScaler, FusedAdamW, LossScalerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import Ratio, environment, format_ratios, format_table, measure, write_results  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
AXPY = "in-place axpy y += a*x"
TORCH32, DS32, OURS32, FUSED32 = "torch AdamW(fused=True)", "DeepSpeedCPUAdam", "llmkern CPUAdam", "llmkern FusedAdamW"
TORCH_MIX, OURS_MIX = "torch cast+unscale_+AdamW(fused)+copy_", "llmkern FusedAdamW+DynamicLossScaler"
DS_MIX = "DeepSpeedCPUAdam fp16 params (no master)"
TORCH_BF16, OURS_BF16 = "torch AdamW(fused) bf16 params+states", "llmkern FusedAdamW bf16 params+states"
OURS_BF16_SR = "llmkern FusedAdamW bf16 params+states, stochastic rounding"
BYTES_PER_PARAM = {AXPY: 12, TORCH32: 28, DS32: 28, OURS32: 28, FUSED32: 28, TORCH_MIX: 48, OURS_MIX: 30,
                   DS_MIX: 22, TORCH_BF16: 14, OURS_BF16: 14, OURS_BF16_SR: 14}


def deepspeed_adam():
    extra = os.environ.get("LLMKERN_DEEPSPEED_PATH")
    if extra:
        sys.path.insert(0, extra)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam, None
    except Exception as e:  # noqa: BLE001 - any import/JIT-build failure means "not available"
        return None, f"{type(e).__name__}: {e}"


def fp32_group(n: int, ds_cls) -> dict:
    """One fp32 parameter with a gradient, stepped by every optimizer in turn (each keeps its own
    moments), and the axpy that measures the bandwidth in the same rounds."""
    x, y = torch.randn(n), torch.randn(n)
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n) * 1e-2
    calls = {AXPY: lambda: y.add_(x, alpha=1e-3), TORCH32: torch.optim.AdamW([p], fused=True, **HP).step}
    if ds_cls is not None:
        calls[DS32] = ds_cls([p], adamw_mode=True, **HP).step
    calls[OURS32] = CPUAdam([p], **HP).step
    calls[FUSED32] = FusedAdamW([p], **HP).step
    return calls


def mixed_group(n: int, ds_cls, scale: float = 1024.0) -> dict:
    g16 = (torch.randn(n) * 1e-2 * scale).half()
    master = torch.nn.Parameter(torch.randn(n))
    model16 = master.detach().half()
    master.grad = torch.empty(n)
    topt = torch.optim.AdamW([master], fused=True, **HP)
    inv, found = torch.full((1,), 1.0 / scale), torch.zeros(1)

    def torch_mixed():
        master.grad.copy_(g16)                                                     # fp16 grad -> fp32
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([master.grad], found, inv)  # GradScaler.unscale_
        if found.item() == 0:                                                      # GradScaler.step's check
            topt.step()
        model16.copy_(master.detach())                                             # fp32 master -> fp16

    p16 = torch.nn.Parameter(torch.randn(n).half())
    p16.grad = g16
    opt = FusedAdamW([p16], **HP)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=scale, growth_interval=10 ** 9))

    def ours_mixed():
        scaler.step(opt)
        scaler.update()

    calls = {TORCH_MIX: torch_mixed, OURS_MIX: ours_mixed}
    if ds_cls is not None:
        pd = torch.nn.Parameter(torch.randn(n).half())
        pd.grad = (torch.randn(n) * 1e-2).half()
        calls[DS_MIX] = ds_cls([pd], adamw_mode=True, fp32_optimizer_states=True, **HP).step
    return calls


def bf16_group(n: int) -> dict:
    pb = torch.nn.Parameter(torch.randn(n).bfloat16())
    pb.grad = (torch.randn(n) * 1e-2).bfloat16()
    return {TORCH_BF16: torch.optim.AdamW([pb], fused=True, **HP).step,
            OURS_BF16: FusedAdamW([pb], master_weights=False, state_dtype=torch.bfloat16, **HP).step,
            OURS_BF16_SR: FusedAdamW([pb], master_weights=False, state_dtype=torch.bfloat16,
                                     state_rounding="stochastic", **HP).step}


def speedup(res, ours: str, peer: str, name: str, goal: float | None) -> Ratio:
    """peer time / our time per round: > 1 means llmkern is faster."""
    return Ratio.from_rounds(name, [1 / r for r in res.round_ratios(ours, peer)], peer=peer, goal=goal)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=None, help="parameters (default 16Mi; 64Mi with --full)")
    ap.add_argument("--full", action="store_true", help="64Mi parameters")
    ap.add_argument("--quick", action="store_true", help="1Mi parameters and 3 rounds: seconds")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, 3 with --quick)")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args(argv)
    n = args.numel or (2 ** 20 if args.quick else 64 * 2 ** 20 if args.full else 16 * 2 ** 20)
    rounds = args.rounds or (3 if args.quick else 7)
    torch.manual_seed(0)
    ds_cls, ds_why = (None, "skipped (--no-deepspeed)") if args.no_deepspeed else deepspeed_adam()
    if ds_cls is None:
        print(f"DeepSpeed is not available ({ds_why}): its rows are skipped")
    print(f"bench_fused_adamw: {n / 2 ** 20:g}Mi params, {torch.get_num_threads()} threads, {rounds} rounds")

    rows, ratios, contention = [], [], []
    for group, build in (("fp32", lambda: fp32_group(n, ds_cls)), ("mixed fp16", lambda: mixed_group(n, ds_cls)),
                         ("bf16 states", lambda: bf16_group(n))):
        calls = build()
        res = measure(calls, warmup=2, repeats=1, rounds=rounds)
        contention.append(res.contention)
        peer = next(c for c in calls if c.startswith("torch"))
        for c in calls:
            t = res.median_ms(c)
            ts = res.samples[c]
            rows.append({"op": "adamw_step", "candidate": c, "dtype": group, "shape": f"numel={n}", "mode": "step",
                         "median_ms": t, "min_ms": min(ts), "max_ms": max(ts),
                         "ratio_vs_baseline": res.ratio(c, peer), "baseline": peer,
                         "gbytes_per_s": BYTES_PER_PARAM[c] * n / t / 1e6, "bytes_per_param": BYTES_PER_PARAM[c],
                         "mparam_per_s": n / t / 1e3, "contention": res.contention})
        if group == "fp32":
            for ours in (OURS32, FUSED32):  # roofline time: 28 B/param at the axpy's 12 B/param bandwidth
                ratios.append(Ratio.from_rounds(f"fp32 {ours} / roofline (28 B/param at the axpy bandwidth)",
                                                [28 / 12 * r for r in res.round_ratios(AXPY, ours)],
                                                peer="roofline", goal=0.95))
            ratios.append(speedup(res, OURS32, TORCH32, f"fp32 {OURS32} speed-up over {TORCH32}", 1.0))
            if DS32 in calls:
                ratios.append(speedup(res, OURS32, DS32, f"fp32 {OURS32} speed-up over {DS32}", 1.0))
        elif group == "mixed fp16":
            ratios.append(speedup(res, OURS_MIX, TORCH_MIX, "mixed fp16 step speed-up over the torch composition",
                                  1.5))
            if DS_MIX in calls:  # 30 B with fp32 masters vs DeepSpeed's 22 B: 0.73 is the bandwidth bound
                ratios.append(speedup(res, OURS_MIX, DS_MIX, f"mixed fp16 step (fp32 masters) speed-up over {DS_MIX}",
                                      0.9))
        else:
            ratios.append(speedup(res, OURS_BF16, TORCH_BF16, "bf16 states speed-up over torch fused bf16", 1.6))
            ratios.append(speedup(res, OURS_BF16_SR, TORCH_BF16,
                                  "bf16 states, stochastic rounding, speed-up over torch fused bf16", None))
        del calls

    worst = max((c for c in contention if c is not None), default=None)
    env = environment(contention=worst, contention_per_measurement=contention, rounds=rounds, numel=n,
                      quick=args.quick, deepspeed="measured" if ds_cls else f"not available ({ds_why})")
    name = "optim_fused_adamw_quick" if args.quick else "optim_fused_adamw"
    csv_path, json_path = write_results(name, rows, env, ratios)
    print(format_table(rows, ["dtype", "candidate", "median_ms", "min_ms", "max_ms", "gbytes_per_s",
                              "ratio_vs_baseline"]))
    print()
    print(format_ratios(ratios))
    print(f"\ncontention (largest share of the CPU other processes took during a measurement): "
          f"{'n/a' if worst is None else f'{worst:.0%}'}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
