"""CPU benchmark of the fused optimizer step against its peers, all measured in the same run.

    python bench/optim/bench_fused_adamw.py            # 16Mi params (default, ~1 min)
    python bench/optim/bench_fused_adamw.py --full     # 64Mi params, the size of research/baselines.md
    python bench/optim/bench_fused_adamw.py --numel N --reps R --out DIR

Rows (bytes moved per parameter in brackets; GB/s = bytes / time):
  axpy            y += a*x in place [12]: the in-place memory roofline of this machine, right now
  fp32 AdamW      torch AdamW(fused=True) · DeepSpeedCPUAdam · llmkern CPUAdam (fused_adamw_) [28]
  mixed fp16      fp16 model grads -> fp32 masters -> fp16 model copy, loss scale 1024:
                  torch: grad.float() + GradScaler-style unscale_ + AdamW(fused) + copy_  [48]
                  llmkern: FusedAdamW(master_weights) + DynamicLossScaler (overflow pass [2] + fused step [28]) [30]
                  DeepSpeedCPUAdam with fp16 params and fp32 states (no fp32 master) [22]
  bf16 states     torch AdamW(fused) on bf16 params and states · llmkern bf16 params, state_dtype=bf16,
                  rounded to nearest and stochastically [14]
Ratios are printed against the peers measured in this run; results go to CSV and JSON.
DeepSpeed is imported from $LLMKERN_DEEPSPEED_PATH (a pip --target folder) when set, else from the
environment; when it is missing its rows say so and are skipped.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from llmkern.optim import CPUAdam, DynamicLossScaler, FusedAdamW, LossScalerConfig


def timeit(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def deepspeed_adam():
    extra = os.environ.get("LLMKERN_DEEPSPEED_PATH")
    if extra:
        sys.path.insert(0, extra)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam, None
    except Exception as e:  # noqa: BLE001 - any import/JIT-build failure means "not available"
        return None, f"{type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=16 * 2 ** 20)
    ap.add_argument("--full", action="store_true", help="64Mi parameters")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args()
    n = 64 * 2 ** 20 if args.full else args.numel
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rows = []

    def record(group, name, seconds, bytes_per_param):
        gbs = bytes_per_param * n / seconds / 1e9
        rows.append(dict(group=group, name=name, numel=n, ms=seconds * 1e3, bytes_per_param=bytes_per_param,
                         gb_s=gbs, mparam_s=n / seconds / 1e6, threads=torch.get_num_threads()))
        print(f"{group:10s} {name:44s} {seconds * 1e3:9.2f} ms {gbs:7.1f} GB/s", flush=True)
        return seconds

    torch.manual_seed(0)
    # ---- roofline ------------------------------------------------------------------------------
    x, y = torch.randn(n), torch.randn(n)
    t_axpy = record("roofline", "in-place axpy y += a*x", timeit(lambda: y.add_(x, alpha=1e-3), args.reps), 12)
    bw = 12 * n / t_axpy
    del x, y

    def grad32():
        return torch.randn(n) * 1e-2

    # ---- fp32 AdamW ----------------------------------------------------------------------------
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = grad32()
    opt = torch.optim.AdamW([p], fused=True, **hp)
    t_torch = record("fp32", "torch AdamW(fused=True)", timeit(opt.step, args.reps), 28)
    del opt
    ds_cls, ds_why = (None, "skipped (--no-deepspeed)") if args.no_deepspeed else deepspeed_adam()
    t_ds = None
    if ds_cls is not None:
        opt = ds_cls([p], adamw_mode=True, **hp)
        t_ds = record("fp32", "DeepSpeedCPUAdam", timeit(opt.step, args.reps), 28)
        del opt
    else:
        print(f"fp32       DeepSpeed not installed ({ds_why})")
    opt = CPUAdam([p], **hp)
    t_ours = record("fp32", "llmkern CPUAdam", timeit(opt.step, args.reps), 28)
    del opt
    opt = FusedAdamW([p], **hp)
    t_ours2 = record("fp32", "llmkern FusedAdamW", timeit(opt.step, args.reps), 28)
    del opt, p

    # ---- mixed precision: fp16 grads -> fp32 master -> fp16 copy ---------------------------------
    scale = 1024.0
    g16 = (torch.randn(n) * 1e-2 * scale).half()
    master = torch.nn.Parameter(torch.randn(n))
    model16 = master.detach().half()
    master.grad = torch.empty(n)
    topt = torch.optim.AdamW([master], fused=True, **hp)
    inv = torch.full((1,), 1.0 / scale)
    found = torch.zeros(1)

    def torch_mixed():
        master.grad.copy_(g16)                                                     # fp16 grad -> fp32
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([master.grad], found, inv)  # GradScaler.unscale_
        if found.item() == 0:                                                      # GradScaler.step's check
            topt.step()
        model16.copy_(master.detach())                                             # fp32 master -> fp16
    t_tmix = record("mixed", "torch cast+unscale_+AdamW(fused)+copy_", timeit(torch_mixed, args.reps), 48)
    del topt, master

    p16 = torch.nn.Parameter(torch.randn(n).half())
    p16.grad = g16
    opt = FusedAdamW([p16], **hp)
    scaler = DynamicLossScaler(LossScalerConfig(init_scale=scale, growth_interval=10 ** 9))

    def ours_mixed():
        scaler.step(opt)
        scaler.update()
    t_omix = record("mixed", "llmkern FusedAdamW+DynamicLossScaler", timeit(ours_mixed, args.reps), 30)
    del opt, p16
    t_dsmix = None
    if ds_cls is not None:
        p16 = torch.nn.Parameter(torch.randn(n).half())
        p16.grad = (torch.randn(n) * 1e-2).half()
        opt = ds_cls([p16], adamw_mode=True, fp32_optimizer_states=True, **hp)
        t_dsmix = record("mixed", "DeepSpeedCPUAdam fp16 params (no master)", timeit(opt.step, args.reps), 22)
        del opt, p16

    # ---- bf16 params and states --------------------------------------------------------------
    pb = torch.nn.Parameter(torch.randn(n).bfloat16())
    pb.grad = (torch.randn(n) * 1e-2).bfloat16()
    opt = torch.optim.AdamW([pb], fused=True, **hp)
    t_tbf = record("bf16", "torch AdamW(fused) bf16 params+states", timeit(opt.step, args.reps), 14)
    del opt
    opt = FusedAdamW([pb], master_weights=False, state_dtype=torch.bfloat16, **hp)
    t_obf = record("bf16", "llmkern FusedAdamW bf16 params, bf16 states", timeit(opt.step, args.reps), 14)
    del opt
    opt = FusedAdamW([pb], master_weights=False, state_dtype=torch.bfloat16, state_rounding="stochastic", **hp)
    t_obf_sr = record("bf16", "llmkern FusedAdamW bf16 params, bf16 states, stochastic rounding",
                      timeit(opt.step, args.reps), 14)
    del opt, pb

    # ---- ratios ---------------------------------------------------------------------------------
    roof = 28 * n / bw
    ratios = {
        "fp32 CPUAdam / roofline (28 B at axpy bandwidth)": roof / t_ours,
        "fp32 FusedAdamW / roofline": roof / t_ours2,
        "fp32 CPUAdam vs torch fused (speed-up)": t_torch / t_ours,
        "mixed llmkern vs torch composition (speed-up)": t_tmix / t_omix,
        "bf16 states llmkern vs torch fused bf16 (speed-up)": t_tbf / t_obf,
        "bf16 states stochastic rounding vs torch fused bf16 (speed-up)": t_tbf / t_obf_sr,
        "bf16 states stochastic rounding / nearest (time, the hash's cost)": t_obf_sr / t_obf,
    }
    if t_ds is not None:
        ratios["fp32 CPUAdam vs DeepSpeedCPUAdam (speed-up)"] = t_ds / t_ours
    if t_dsmix is not None:
        ratios["mixed llmkern (fp32 masters) vs DeepSpeed fp16 params (speed-up)"] = t_dsmix / t_omix
    print(f"\nin-place bandwidth {bw / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, {n / 2 ** 20:.0f}Mi params")
    for k, v in ratios.items():
        print(f"  {k:66s} {v:5.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "optim_fused_adamw.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "optim_fused_adamw.json").write_text(json.dumps(
        {"rows": rows, "ratios": ratios, "inplace_bandwidth_gb_s": bw / 1e9,
         "deepspeed": "measured" if ds_cls else f"not installed ({ds_why})"}, indent=1))
    print(f"wrote {out / 'optim_fused_adamw.csv'} and .json")


if __name__ == "__main__":
    main()
