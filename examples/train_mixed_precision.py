"""Mixed-precision training with llmkern's fused optimizer and dynamic loss scaler.

    python examples/train_mixed_precision.py [--dtype float16|bfloat16] [--steps 200]

A small MLP is trained with fp16 (or bf16) weights and gradients. FusedAdamW keeps fp32 master
weights and, in one fused pass per step, unscales, checks for overflow, clips, updates the masters
and moments and writes the 16-bit weights. With fp16 the DynamicLossScaler starts at 2^16 and
doubles after every 50 clean steps; a step whose gradients overflow is skipped (nothing changes,
not even the lr schedule) and halves the scale. The script prints the loss, the gradient norm, the
loss scale and the number of skipped steps.
"""
from __future__ import annotations

import argparse

import torch

from llmkern.optim import DynamicLossScaler, FusedAdamW, LossScalerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro-batches", type=int, default=2, help="gradient accumulation")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    y = torch.sin(x @ torch.randn(32, 1)) * 4
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)).to(dtype)
    opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01)   # fp32 masters for the 16-bit weights
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
    scaler = DynamicLossScaler(LossScalerConfig(growth_interval=50)) if dtype == torch.float16 else None
    chunks = list(zip(x.chunk(args.micro_batches), y.chunk(args.micro_batches)))
    for step in range(1, args.steps + 1):
        total = 0.0
        for xb, yb in chunks:
            loss = (model(xb.to(dtype)).float() - yb).pow(2).mean() / len(chunks)
            (scaler.scale(loss) if scaler else loss).backward()
            total += loss.item()
        # The clip applies inside the next step's fused update; the norm is that of the unscaled
        # gradients (the scaler hands its scale to the optimizer).
        norm = scaler.clip_grad_norm_(opt, 1.0) if scaler else opt.clip_grad_norm_(1.0)
        if scaler:
            scaler.step(opt, lr_scheduler=sched)   # a skipped step advances neither the weights nor the lr
            scaler.update()
        else:
            opt.step()
            if not opt.last_step_skipped:          # a non-finite gradient norm skips the step
                sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == 1:
            extra = (f"  loss scale {scaler.get_scale():9.0f}  skipped steps {scaler.overflow_steps}"
                     if scaler else "")
            print(f"step {step:4d}  loss {total:.4f}  grad norm {float(norm):.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}{extra}")


if __name__ == "__main__":
    main()
