"""The tolerance table and the reference comparison every numerical test uses.

The rule (flash-attention's): against an fp64 oracle, our error may be at most 2x the error plain
PyTorch makes computing the same thing in the same dtype (3x for gradients), plus a small floor
so that an exact PyTorch result does not demand an exact result from us. There is no free atol:
the allowance comes from PyTorch's own error, measured on the same inputs in every test.

PyTorch's error on a tiny output is one lucky draw
--------------------------------------------------
PyTorch's max error is a stable yardstick when it is the max over many independent roundings. On a
tiny output it is one draw: a (1, 1) result, or a (48, 1) LoRA gradient that is one 64-term dot
product times 48 numbers (its 48 errors are the same draw, scaled). `python -m
llmkern.testing.calibrate` measures one fp32 dot of K randn terms, (1, K) @ (K, N) for N = 1 and
48, under MKL's AVX-512, AVX2 and COMPATIBLE code paths (MKL_CBWR), 3,000 draws per row. In units
of eps * sum_k |a_k b_k| (the dot's componentwise condition) its error has nearly the same
distribution for every K from 16 to 1025, every N and every code path:

    p50 0.07-0.14   p90 0.19-0.42   p95 0.25-0.53   p99 0.36-0.86   p99.9 0.56-1.31   max 1.72

A median draw is 7x smaller than a p99 draw, and the CPU's code path decides which draw a test
gets. "Our max error <= 2x (3x) PyTorch's" fails a kernel exactly as accurate as PyTorch, on a
result of n independent elements, this often (calibrate; max of n draws against max of n):

    n               1      8     32     64    128    512
    2x (outputs)   32%    14%   6.8%   4.0%   2.8%     0
    3x (gradients) 24%   4.6%   1.0%   0.3%      0     0

(the floor below lowers these rates a little). Issue 10's two failures were such draws. On the
(1,) x 64 -> 48, r = 1, p = 0.1 LoRA case (tests/ops/test_lora_linear.py) over 2,000 input draws,
PyTorch's grad_b error spans 0.13 (median) to 0.87 of that unit and our CPU kernel's 0.15 to
1.17: equally accurate, yet their ratio reached 29x. Run with OMP_NUM_THREADS=1 and oneDNN off,
the adapter tests failed three more: a (1,) down_bias gradient at 9x and a (40,) up_bias
gradient (40 column sums over 1030 rows) at 7.4x, where one thread's torch.sum is more accurate.

The choice: a forward error model of the reduction, where PyTorch's error is one draw
-----------------------------------------------------------------------------------
The caller passes `cond` wherever it can compute it: per element, the sum over the terms of the
reduction(s) of |term|, i.e. the oracle evaluated on |inputs| (exact for products and sums; see
assert_close_to_ref). Where a result is few draws, PyTorch's error is then taken as

    max(measured PyTorch error, cond_factor * acc_eps * max cond),   cond_factor = 1.0,

the 99.6th percentile of one draw (0.36% of 150,000 draws exceed it, K = 64 and 123): PyTorch is
credited with the error it makes on one input in 280 of this condition. On those draws
(calibrate's tail) a kernel exactly as accurate as PyTorch exceeds an output check (2 * 1.0
units) in 1.3e-5 to 2e-5 of single draws and a gradient check (3.0) in none. With 0.75 (the
p98.7) the output rate is 3e-4: on the (1, 1) case of tests/testing/test_tolerances.py a sum of
one term at a time, run backwards, reached 1.9 units on one of 40 draws. There, over 40 draws and
two summation orders, the old rule (no `cond`) failed an equally accurate kernel 17 times of 80
on the (1, 1) case and 3 times on the (48, 1) one on this machine; with `cond` never, while a
planted error 10x (outputs) or 4x (gradients) the error the rule credits PyTorch with,
bf16-rounded inputs and a lost term are caught on every draw. Real bugs are hundreds to thousands
of units off: a lost term of a 1025-term dot, ~1/(K eps) = 8000; TF32 inputs, ~2^13/sqrt(K) =
250-1000 for K = 1025-64.

The model is used for results of few independent draws, and only for them: outputs of fewer
than 512 elements and gradients of fewer than 128 (Tolerance.is_few_draws, from the table above),
and results the caller marks `shared`, whose elements share their reductions (one token: LoRA's
grad_b is u·gy). Elsewhere `cond` is checked and ignored: the measured max is stable there, and
the model, far above it, would loosen the check. Blocked GEMMs sum a long dot more accurately
than one gemv does (a 64x64 output has PyTorch's max at 1.36-1.92 units for K <= 123 but
0.37-0.62 at K = 1025 and 0.21-0.38 at K = 4096), and the oracle on |inputs| adds up the
condition of every stage of a chain of reductions, while the errors of a wide stage partly
cancel in the next. On the LoRA grid of
tests/ops/test_lora_linear.py at 74, 97 and 194 tokens, the model is 2-12x PyTorch's measured max
for y and grad_x and up to 48x for grad_b; on a 97x123x65x33 matmul chain, 3-7x.

The model covers the accumulator's rounding only: acc_eps is fp32's eps for fp32, fp16 and bf16
results (PyTorch accumulates those in fp32). A fp16/bf16 result's error is mostly its final
rounding, which is the same for our kernel and PyTorch given accurate fp32 values, so the
lucky-draw problem does not arise there and the model adds nothing (acc_eps is 2^-16 of bf16's eps).

Not chosen: several input draws per case would run every kernel S times (the Triton interpreter
takes seconds per case) and, as measured above, two maxima of 8 draws still differ by more than
2x 14% of the time. Taking PyTorch's error over a whole batch of cases makes a test's verdict
depend on which other cases ran (-k, a rerun of one failure), and lets a large case's error hide
a bug in a small one.
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

    acc_eps: float
    """Machine epsilon of the accumulator PyTorch reduces in for this dtype (fp32 for fp16/bf16):
    the unit of the error model that `cond` enables."""

    factor: float = 2.0
    """Forward outputs: our error <= factor * PyTorch's error + floor (flash-attention's 2x)."""

    grad_factor: float = 3.0
    """Gradients: a backward chains more roundings, and flash-attention allows 3x there."""

    cond_factor: float = 1.0
    """With `cond`, PyTorch's error is taken as at least cond_factor * acc_eps * max(cond): the
    99.6th percentile of one fp32 dot product's error in that unit (module docstring)."""

    few_draws: int = 512
    """`cond` is used for outputs of fewer elements: the max of fewer than 512 independent draws
    exceeds 2x another such max often enough to fail (module docstring). Above, it is ignored."""

    grad_few_draws: int = 128
    """The same for gradients, judged at 3x: below 128 elements."""

    def is_few_draws(self, numel: int, *, grad: bool = False) -> bool:
        """Whether PyTorch's max error over `numel` independent elements is too few draws to judge by."""
        return numel < (self.grad_few_draws if grad else self.few_draws)

    def baseline_error(self, measured: float, cond_max: float | None) -> float:
        """PyTorch's error as the rule uses it: the measured one, bounded below by the model."""
        return measured if cond_max is None else max(measured, self.cond_factor * self.acc_eps * cond_max)

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
    torch.float64: Tolerance(eps=_eps(torch.float64), floor=1024.0, acc_eps=_eps(torch.float64)),
    # fp32/fp16/bf16: PyTorch's error is nonzero for any real computation, so the 2x/3x rule
    # carries the check and the floor must stay below PyTorch's error or it would hide real bugs.
    # Measured on CPU for y = gelu(x @ w1) @ w2 (97x123x65x33) and its autograd gradients, PyTorch's
    # error is 0.50-0.60 eps*max|ref| in bf16, 0.58-0.89 in fp16 (it computes in fp32 and rounds
    # once) and 2.5-3.1 in fp32. A gradient 4x too far off is caught only if err > floor, so the
    # floor is 0.25, half the smallest measured error. The cost: where PyTorch is exact (copies,
    # masks, concatenation) we must be exact up to 0.25 eps*max|ref|, i.e. correctly rounded for
    # outputs below max|ref|/2; a kernel that rounds at all there should be tested on inputs where
    # PyTorch rounds too.
    # fp32 gets a floor of 1 ulp of max|ref|: a fused kernel legitimately rounds up to twice more
    # than the unfused chain (1/(1-p) folded into a scale after the dot), 0.5 ulp each, and a max
    # over fewer than ~100 fp32 draws is itself noisy (module docstring): with 0.25, the Triton
    # adapter's fp32 row means (97 rows of 1025 terms, tests/ops/test_adapter_triton.py) fail at
    # 2.34x PyTorch's error on this machine. A 4x gradient error is still caught: PyTorch's own
    # fp32 error on real computations measured 2.5-3.1 eps*max|ref| (4x = 10 eps > 3x + 1). The
    # lucky draw of a tiny output is `cond`'s job, not the floor's.
    torch.float32: Tolerance(eps=_eps(torch.float32), floor=1.0, acc_eps=_eps(torch.float32)),
    torch.float16: Tolerance(eps=_eps(torch.float16), floor=0.25, acc_eps=_eps(torch.float32)),
    torch.bfloat16: Tolerance(eps=_eps(torch.bfloat16), floor=0.25, acc_eps=_eps(torch.float32)),
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


def _cond_max(cond, ref: torch.Tensor, finite: torch.Tensor, where: str) -> float | None:
    """max(cond) over the oracle's finite positions, after checking that cond can be a condition."""
    if cond is None:
        return None
    if not isinstance(cond, torch.Tensor) or cond.dtype != torch.float64 or cond.shape != ref.shape:
        got = f"{cond.dtype} {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise TypeError(f"cond{where} must be a float64 tensor of ref's shape {tuple(ref.shape)}, got {got}")
    c64 = cond.detach().cpu()
    c, r = c64[finite], ref[finite]
    # sum_k |term_k| >= |sum_k term_k|: a cond below |ref| is not the condition of this result (both
    # are fp64 sums of the same terms, so they may differ by fp64 rounding, 1e-9 relative at most).
    bad = ~(c.isfinite() & (c >= r.abs() * (1 - 1e-9)))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"cond{where} is {c[i].item():.6g} where |ref| is {r[i].abs().item():.6g}: "
                         f"cond must be finite and at least |ref| (sum |terms| of the reduction, e.g. the "
                         f"oracle on |inputs|)")
    return float(c.max())


def _check_tensor(actual: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, grad: bool, name: str,
                  cond=None, shared: bool = False):
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
    cond_max = _cond_max(cond, r64, finite, where)
    if not (shared or tol.is_few_draws(actual.numel(), grad=grad)):
        cond_max = None  # enough draws: PyTorch's measured max is the yardstick
    err, worst = _max_err(a64, r64, finite)
    measured, _ = _max_err(b64, r64, finite & b64.isfinite())
    base_err = tol.baseline_error(measured, cond_max)
    ref_absmax = float(r64[finite].abs().max())
    allowed = tol.allowed(base_err, ref_absmax, grad=grad)
    if not err <= allowed:
        kind, k = ("gradient", tol.grad_factor) if grad else ("output", tol.factor)
        ratio = err / base_err if base_err > 0 else float("inf")
        model = "" if cond_max is None else (
            f"\n  error model    {tol.cond_factor * tol.acc_eps * cond_max:.6g}  ({tol.cond_factor:g} * "
            f"acc_eps {tol.acc_eps:.3g} * max cond {cond_max:.6g}); the rule uses the larger, {base_err:.6g}")
        raise AssertionError(
            f"{kind}{where} ({actual.dtype}, shape {tuple(actual.shape)}) is too far from the fp64 oracle:\n"
            f"  our error      {err:.6g}  at index {worst} (actual {a64[worst].item():.8g}, ref "
            f"{r64[worst].item():.8g}, PyTorch {b64[worst].item():.8g})\n"
            f"  PyTorch error  {measured:.6g}  (plain PyTorch in {baseline.dtype}){model}\n"
            f"  ratio          {ratio:.3g}x  (allowed {k:g}x + floor {tol.floor:g} eps * max|ref| = "
            f"{tol.floor * tol.eps * ref_absmax:.3g}; allowed error {allowed:.6g})")


def assert_close_to_ref(actual, ref, baseline, *, grad: bool = False, name: str = "", cond=None,
                        shared: bool = False) -> None:
    """Assert that `actual` is as close to the fp64 oracle as plain PyTorch is, within the rule.

    actual:   our result (any device, any dtype in TOLERANCES; integer/bool results must be equal).
    ref:      the oracle, float64, computed from the same inputs (usually `<op>_ref` on `.double()`).
    baseline: plain PyTorch computing the same thing in the same dtype as `actual`.
    grad:     judge as a gradient (3x instead of 2x).
    name:     a label for messages (the output or input the value belongs to).
    cond:     optional, float64 like `ref`: per element, the sum of |term| over the reduction(s) that
              make it, i.e. its componentwise condition. For an op built of products and sums
              (matmuls, LoRA, a dropout mask, their autograd gradients) it is the oracle run on
              |inputs| (and |grad_output|). It is used only where PyTorch's max error is over
              few draws: fewer elements than TOLERANCES[...].few_draws (grad_few_draws for
              gradients), or `shared`; elsewhere it is checked and ignored (module docstring).
    shared:   the elements share their reductions, so that however many there are they are few
              draws (one token: LoRA's grad_b is u·gy for a single u).

    Passes when max|actual - ref| <= factor * E + floor * eps * max|ref|, where E is
    max|baseline - ref|, or with `cond` (where used) the larger of that and
    cond_factor * acc_eps * max(cond),
    with the numbers from TOLERANCES[actual.dtype]. NaN/inf positions must match the oracle's;
    empty tensors of matching shape pass. Tuples and lists are compared pairwise (`cond` too, when
    given); a None in `actual` and `ref` at the same position (an input that needs no gradient) is
    skipped.
    """
    if isinstance(actual, (tuple, list)):
        conds = [None] * len(actual) if cond is None else cond
        if not all(isinstance(v, Sequence) for v in (ref, baseline, conds)) \
                or not len(actual) == len(ref) == len(baseline) == len(conds):
            def size(x):
                return len(x) if isinstance(x, Sequence) else type(x).__name__
            extra = f", cond {size(cond)}" if cond is not None else ""
            raise AssertionError(f"length mismatch{_where(name)}: actual {len(actual)}, ref {size(ref)}, "
                                 f"baseline {size(baseline)}{extra}")
        for i, (a, r, b, c) in enumerate(zip(actual, ref, baseline, conds)):
            assert_close_to_ref(a, r, b, grad=grad, name=f"{name}[{i}]", cond=c, shared=shared)
        return
    if actual is None or ref is None:
        if actual is None and ref is None:
            return
        raise AssertionError(f"one of actual/ref is None{_where(name)}: actual {type(actual).__name__}, "
                             f"ref {type(ref).__name__}")
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"actual{_where(name)} is {type(actual).__name__}, "
                        f"expected a tensor or a tuple of them")
    _check_tensor(actual, ref, baseline, grad, name, cond, shared)
