"""A finite gradient whose norm passes fp32's range is not an overflow: FusedAdamW clips and steps
(torch.nn.utils.clip_grad_norm_ in fp64 gives the same update), where an fp32 sum of squares
(multi_tensor_sumsq before it returned float64) made the optimizer skip the step as if the
gradients held an inf."""
from __future__ import annotations

import torch

from llmkern.optim import FusedAdamW


def test_clip_of_a_huge_finite_gradient_steps():
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(97, generator=g), torch.randn(33, 17, generator=g)]
    grads = [torch.randn(p.shape, generator=g) * 1e20 for p in init]  # norm ~ 3e21: its square is 9e42
    assert all(torch.isfinite(x).all() for x in grads)
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.double().clone()) for p in init]
    opt = FusedAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for p, x in zip(ours, grads):
        p.grad = x.clone()
    for p, x in zip(theirs, grads):
        p.grad = x.double()
    norm = opt.clip_grad_norm_(1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.isfinite(norm) and abs(float(norm) / float(ref_norm) - 1) < 1e-6
    opt.step()
    ref.step()
    for a, b, p0 in zip(ours, theirs, init):
        a, b = a.detach().double(), b.detach()
        assert not torch.equal(a, p0.double())  # it stepped (an fp32 sum of squares was inf: a skipped step)
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6  # as tests/optim/test_optimizers.py
