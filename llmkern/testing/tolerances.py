"""The tolerance table and the reference comparison every numerical test uses.

The rule (flash-attention's): against an fp64 oracle, our error may be at most 2x the error plain
PyTorch makes computing the same thing in the same dtype (3x for gradients), plus a small floor
so that an exact PyTorch result does not demand an exact result from us. There is no free atol:
the allowance comes from PyTorch's own error, measured on the same inputs in every test.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """How closely a result in one dtype must match the fp64 oracle."""

    eps: float
    """Machine epsilon of the dtype (torch.finfo(dtype).eps): the spacing of numbers at 1.0."""

    floor: float
    """Absolute error always allowed, in units of eps * max|ref|. It matters only when PyTorch's
    own error is ~0 (exact ops, or fp64 where the oracle and PyTorch run the same arithmetic)."""

    factor: float = 2.0
    """Forward outputs: our error <= factor * PyTorch's error + floor (flash-attention's 2x)."""

    grad_factor: float = 3.0
    """Gradients: a backward chains more roundings, and flash-attention allows 3x there."""

    def allowed(self, baseline_err: float, ref_absmax: float, *, grad: bool = False) -> float:
        """The largest error accepted given PyTorch's error and the oracle's largest magnitude."""
        k = self.grad_factor if grad else self.factor
        return k * baseline_err + self.floor * self.eps * ref_absmax


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


TOLERANCES: dict[torch.dtype, Tolerance] = {
    # fp64: the oracle is usually the same PyTorch code in fp64, so PyTorch's error is exactly 0 and
    # the floor is the whole allowance. It must absorb a different summation order: measured on
    # randn (97 x K) @ (K x 33), blocked vs torch.mm, the error is 9, 30 and 76 eps*max|ref| for
    # K = 1025, 8192, 65536 (sqrt(K)-like growth). 1024 covers K up to ~10^7 and is still 2e-13
    # relative, ten orders of magnitude below any indexing or math bug.
    torch.float64: Tolerance(eps=_eps(torch.float64), floor=1024.0),
    # fp32/fp16/bf16: PyTorch's error is nonzero for any real computation, so the 2x/3x rule
    # carries the check and the floor must stay below PyTorch's error or it would hide real bugs.
    # Measured on CPU for y = gelu(x @ w1) @ w2 (97x123x65x33) and its autograd gradients, PyTorch's
    # error is 0.50-0.60 eps*max|ref| in bf16, 0.58-0.89 in fp16 (it computes in fp32 and rounds
    # once) and 2.5-3.1 in fp32. A gradient 4x too far off is caught only if err > floor, so the
    # floor is 0.25, half the smallest measured error. The cost: where PyTorch is exact (copies,
    # masks, concatenation) we must be exact up to 0.25 eps*max|ref|, i.e. correctly rounded for
    # outputs below max|ref|/2; a kernel that rounds at all there should be tested on inputs where
    # PyTorch rounds too.
    # fp32 gets a floor of 1 ulp of max|ref|: a fused kernel legitimately rounds once more than
    # the unfused chain (e.g. folding 1/(1-p) into a scale after the dot). On a (1, 1) output of a
    # 123-term dot, PyTorch happened to land 0.78 ulp off and the Triton kernel 2.2 ulp: a single
    # draw, well inside one extra rounding. A 4x gradient error is still caught, since PyTorch's
    # own fp32 error on real computations measured 2.5-3.1 eps*max|ref| (4x = 10 eps > 3x + 1).
    torch.float32: Tolerance(eps=_eps(torch.float32), floor=1.0),
    torch.float16: Tolerance(eps=_eps(torch.float16), floor=0.25),
    torch.bfloat16: Tolerance(eps=_eps(torch.bfloat16), floor=0.25),
}


def _where(name: str) -> str:
    return f" [{name}]" if name else ""


def _max_err(x64: torch.Tensor, ref: torch.Tensor, finite: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """Max |x - ref| over the positions in `finite`, and where it is (an index into x)."""
    diff = torch.where(finite, (x64 - ref).abs(), torch.zeros((), dtype=torch.float64))
    diff = torch.nan_to_num(diff, nan=float("inf"))  # a NaN at a finite ref position is the worst error
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), index


def _wider(a: torch.dtype, b: torch.dtype) -> bool:
    """True when float dtype `a` holds every value of float dtype `b` exactly (fp32 vs fp16/bf16)."""
    if not (a.is_floating_point and b.is_floating_point):
        return False
    fa, fb = torch.finfo(a), torch.finfo(b)
    return fa.bits > fb.bits and fa.eps <= fb.eps and fa.max >= fb.max


def _check_tensor(actual: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, grad: bool, name: str):
    where = _where(name)
    for what, t in (("ref", ref), ("baseline", baseline)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}{where} is {type(t).__name__}, expected a tensor like `actual`")
    if actual.shape != ref.shape or baseline.shape != ref.shape:
        raise AssertionError(f"shape mismatch{where}: actual {tuple(actual.shape)}, ref {tuple(ref.shape)}, "
                             f"baseline {tuple(baseline.shape)}")
    if baseline.dtype != actual.dtype and not _wider(actual.dtype, baseline.dtype):
        raise TypeError(f"baseline{where} is {baseline.dtype} but actual is {actual.dtype}: the baseline "
                        f"must be plain PyTorch in the same dtype as the result it judges (or, for a "
                        f"kernel that returns an fp32 intermediate from fp16/bf16 inputs, in the inputs' dtype)")

    if not actual.dtype.is_floating_point:
        # Integer and bool results (indices, masks, counts) have no rounding: they must be equal.
        if not torch.equal(actual.cpu(), ref.cpu().to(actual.dtype)):
            bad = (actual.cpu() != ref.cpu().to(actual.dtype)).nonzero()
            raise AssertionError(f"{actual.dtype} result differs from ref at {bad.shape[0]} positions"
                                 f"{where}, first at {tuple(bad[0].tolist())}")
        return
    if ref.dtype != torch.float64:
        raise TypeError(f"ref{where} is {ref.dtype}: the oracle must be computed in float64 "
                        f"from the same inputs")
    if actual.dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {actual.dtype}{where}; add a row to llmkern.testing.TOLERANCES")
    if actual.numel() == 0:
        return

    # A wider result (an fp32 intermediate of a bf16 op) is judged by the inputs' dtype: its floor.
    tol = TOLERANCES[baseline.dtype if baseline.dtype in TOLERANCES else actual.dtype]
    a64 = actual.detach().cpu().to(torch.float64)
    b64 = baseline.detach().cpu().to(torch.float64)
    r64 = ref.detach().cpu()

    # NaN and inf must sit where the oracle has them (same sign for inf): an op that overflows or
    # makes NaN where the math does not is wrong, however small its error elsewhere.
    ref_nan, a_nan = r64.isnan(), a64.isnan()
    ref_inf, a_inf = r64.isinf(), a64.isinf()
    bad = (ref_nan != a_nan) | (ref_inf != a_inf) | (ref_inf & a_inf & (r64.sign() != a64.sign()))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"non-finite mismatch{where} ({actual.dtype}) at {int(bad.sum())} positions, "
                             f"first at {first}: actual {a64[first].item()}, ref {r64[first].item()}")
    finite = r64.isfinite()
    if not bool(finite.any()):
        return
    # Where PyTorch itself overflowed (inf/NaN at a finite oracle position) its error says nothing
    # about the dtype's rounding, so the baseline error is taken over the positions it got finite.
    err, worst = _max_err(a64, r64, finite)
    base_err, _ = _max_err(b64, r64, finite & b64.isfinite())
    ref_absmax = float(r64[finite].abs().max())
    allowed = tol.allowed(base_err, ref_absmax, grad=grad)
    if not err <= allowed:
        kind, k = ("gradient", tol.grad_factor) if grad else ("output", tol.factor)
        ratio = err / base_err if base_err > 0 else float("inf")
        raise AssertionError(
            f"{kind}{where} ({actual.dtype}, shape {tuple(actual.shape)}) is too far from the fp64 oracle:\n"
            f"  our error      {err:.6g}  at index {worst} (actual {a64[worst].item():.8g}, ref "
            f"{r64[worst].item():.8g}, PyTorch {b64[worst].item():.8g})\n"
            f"  PyTorch error  {base_err:.6g}  (plain PyTorch in {actual.dtype})\n"
            f"  ratio          {ratio:.3g}x  (allowed {k:g}x + floor {tol.floor:g} eps * max|ref| = "
            f"{tol.floor * tol.eps * ref_absmax:.3g}; allowed error {allowed:.6g})")


def assert_close_to_ref(actual, ref, baseline, *, grad: bool = False, name: str = "") -> None:
    """Assert that `actual` is as close to the fp64 oracle as plain PyTorch is, within the rule.

    actual:   our result (any device, any dtype in TOLERANCES; integer/bool results must be equal).
    ref:      the oracle, float64, computed from the same inputs (usually `<op>_ref` on `.double()`).
    baseline: plain PyTorch computing the same thing in the same dtype as `actual`.
    grad:     judge as a gradient (3x instead of 2x).
    name:     a label for messages (the output or input the value belongs to).

    Passes when max|actual - ref| <= factor * max|baseline - ref| + floor * eps * max|ref|, with the
    numbers from TOLERANCES[actual.dtype]. NaN/inf positions must match the oracle's; empty
    tensors of matching shape pass. Tuples and lists are compared pairwise; a None in `actual` and
    `ref` at the same position (an input that needs no gradient) is skipped.
    """
    if isinstance(actual, (tuple, list)):
        if not isinstance(ref, Sequence) or not isinstance(baseline, Sequence) \
                or not len(actual) == len(ref) == len(baseline):
            def size(x):
                return len(x) if isinstance(x, Sequence) else type(x).__name__
            raise AssertionError(f"length mismatch{_where(name)}: actual {len(actual)}, ref {size(ref)}, "
                                 f"baseline {size(baseline)}")
        for i, (a, r, b) in enumerate(zip(actual, ref, baseline)):
            assert_close_to_ref(a, r, b, grad=grad, name=f"{name}[{i}]")
        return
    if actual is None or ref is None:
        if actual is None and ref is None:
            return
        raise AssertionError(f"one of actual/ref is None{_where(name)}: actual {type(actual).__name__}, "
                             f"ref {type(ref).__name__}")
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"actual{_where(name)} is {type(actual).__name__}, "
                        f"expected a tensor or a tuple of them")
    _check_tensor(actual, ref, baseline, grad, name)
