"""Componentwise conditions of the adapter op's results, for llmkern.testing.assert_close_to_ref(cond=).

For an op built of products and sums the condition is the oracle run on |inputs| (the LoRA tests do
that). The adapter has a LayerNorm and an activation between its reductions, so its condition is
propagated by hand: each reduction contributes the sum of |terms| of its inputs' conditions, each
elementwise step multiplies by |its derivative| at the fp64 value (first order). The result is at
least |ref| everywhere (assert_close_to_ref checks that) and is used only where a result is few
draws (llmkern/testing/tolerances.py).
"""
import torch

from llmkern.ops.adapter_bottleneck import _act


def adapter_bottleneck_condition(inputs, scale, activation, grad_out):
    """The condition of out and of the gradients of (x, D, d, U, u, LN weight, LN bias, residual),
    in that order (None where the input is absent), for inputs as tests/ops/test_adapter_bottleneck.py
    makes them (LayerNorm eps 1e-5)."""
    x, dw, db, uw, ub, lw, lb, res = [v.double() if v is not None else None for v in inputs]
    cg = grad_out.double().abs()

    def rows(t):  # (..., n) -> (T, n)
        return t.reshape(-1, t.shape[-1])

    if lw is not None:
        rs = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x - x.mean(-1, keepdim=True)) * rs
        h = xhat * lw + (lb if lb is not None else 0)
        ch = (x.abs() + x.abs().mean(-1, keepdim=True)) * rs * lw.abs() + (lb.abs() if lb is not None else 0)
    else:
        h, ch = x, x.abs()
    z = (h @ dw.T + (db if db is not None else 0)).requires_grad_()
    a = _act(z, activation)
    (slope,) = torch.autograd.grad(a.sum(), z)
    slope = slope.abs()
    ca = slope * (ch @ dw.abs().T + (db.abs() if db is not None else 0)) + a.detach().abs()
    cout = (x if res is None else res).abs() + scale * (ca @ uw.abs().T + (ub.abs() if ub is not None else 0))
    cgz = scale * (cg @ uw.abs()) * slope  # (..., R)
    cgh = cgz @ dw.abs()  # (..., C)
    if lw is not None:
        cghw = cgh * lw.abs()
        cgx = rs * (cghw + cghw.mean(-1, keepdim=True)
                    + xhat.abs() * (cghw * xhat.abs()).mean(-1, keepdim=True))
        cglw, cglb = rows(cgh * xhat.abs()).sum(0), rows(cgh).sum(0) if lb is not None else None
    else:
        cgx, cglw, cglb = cgh, None, None
    if res is None:
        cgx = cgx + cg
    return [cout, cgx, rows(cgz).T @ rows(ch), rows(cgz).sum(0) if db is not None else None,
            scale * rows(cg).T @ rows(ca), scale * rows(cg).sum(0) if ub is not None else None, cglw, cglb,
            cg if res is not None else None]
