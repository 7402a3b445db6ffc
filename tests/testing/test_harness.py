"""The harness must be able to fail: planted errors are rejected, correct results accepted, broken
ranks reported, hung ranks killed, and the Triton interpreter patches do what they claim."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from llmkern.testing import (TOLERANCES, RankFailedError, Tolerance, assert_close_to_ref,
                             is_interpreted, run_distributed)

LOW = [torch.float32, torch.float16, torch.bfloat16]


def _matmul_case(dtype, m=97, k=123, n=65):
    """Inputs exactly representable in `dtype`, the fp64 oracle, and plain PyTorch in `dtype`."""
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(k, n) / k**0.5).to(dtype)
    return x, w, x.double() @ w.double(), x @ w


def _plant(ref, baseline, times):
    """A result whose error is `times` the baseline's, elementwise, rounded to the baseline's dtype."""
    return (ref + times * (baseline.double() - ref)).to(baseline.dtype)


# ---------------------------------------------------------------- assert_close_to_ref

def test_table_covers_dtypes_and_eps():
    for dtype in (torch.float64, *LOW):
        tol = TOLERANCES[dtype]
        assert isinstance(tol, Tolerance)
        assert tol.eps == torch.finfo(dtype).eps
        assert (tol.factor, tol.grad_factor) == (2.0, 3.0)


@pytest.mark.parametrize("dtype", LOW)
def test_rejects_planted_10x_error(dtype):
    _, _, ref, baseline = _matmul_case(dtype)
    assert_close_to_ref(baseline, ref, baseline)  # PyTorch itself passes (1x)
    with pytest.raises(AssertionError) as info:
        assert_close_to_ref(_plant(ref, baseline, 10), ref, baseline, name="out")
    msg = str(info.value)
    for part in ("out", str(dtype), "our error", "PyTorch error", "ratio", "at index"):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accepts_fused_fp32_compute(dtype):
    # What a fused kernel does: accumulate in fp32 and round once at the end.
    x, w, ref, baseline = _matmul_case(dtype)
    assert_close_to_ref((x.float() @ w.float()).to(dtype), ref, baseline)


def _mlp_grads(x, w1, w2):
    x, w1 = x.clone().requires_grad_(), w1.clone().requires_grad_()
    y = torch.nn.functional.gelu(x @ w1) @ w2
    y.backward(torch.ones_like(y))
    return x.grad, w1.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejects_planted_4x_gradient_error(dtype):
    x, w1, w2 = torch.randn(97, 123), torch.randn(123, 65) / 11, torch.randn(65, 33) / 8
    ref = _mlp_grads(x.double(), w1.double(), w2.double())
    baseline = _mlp_grads(x.to(dtype), w1.to(dtype), w2.to(dtype))
    assert_close_to_ref(baseline, ref, baseline, grad=True, name="grad")
    planted = (_plant(ref[0], baseline[0], 4), baseline[1])
    with pytest.raises(AssertionError, match=r"gradient \[grad\[0\]\]"):
        assert_close_to_ref(planted, ref, baseline, grad=True, name="grad")


def test_gradients_get_3x_outputs_2x():
    # fp32 PyTorch error here is ~2.5 eps*max|ref|, so 2.5x sits clearly between 2x+floor and 3x.
    x, w1, w2 = torch.randn(97, 123), torch.randn(123, 65) / 11, torch.randn(65, 33) / 8
    ref = _mlp_grads(x.double(), w1.double(), w2.double())[0]
    baseline = _mlp_grads(x, w1, w2)[0]
    actual = _plant(ref, baseline, 2.5)
    assert_close_to_ref(actual, ref, baseline, grad=True)
    with pytest.raises(AssertionError):
        assert_close_to_ref(actual, ref, baseline, grad=False)


def test_fp64_exact_baseline_uses_floor():
    # In fp64 the oracle and PyTorch are the same arithmetic: PyTorch's error is 0 and the floor is
    # the allowance. A different summation order passes; a 1e-10 relative error does not.
    x = torch.randn(64, 1025, dtype=torch.float64)
    w = torch.randn(1025, 33, dtype=torch.float64)
    ref = x @ w
    blocked = sum(x[:, k:k + 128] @ w[k:k + 128] for k in range(0, 1025, 128))
    assert_close_to_ref(blocked, ref, ref.clone())
    with pytest.raises(AssertionError):
        assert_close_to_ref(ref * (1 + 1e-10), ref, ref.clone())


def test_nan_and_inf_positions():
    ref = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0], dtype=torch.float64)
    same = ref.to(torch.float16)
    assert_close_to_ref(same, ref, same.clone())
    moved = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf"), 2.0], dtype=torch.float16)
    with pytest.raises(AssertionError, match="non-finite mismatch"):
        assert_close_to_ref(moved, ref, same)
    flipped = torch.tensor([1.0, float("nan"), -float("inf"), -float("inf"), 2.0], dtype=torch.float16)
    with pytest.raises(AssertionError, match="non-finite mismatch"):
        assert_close_to_ref(flipped, ref, same)
    # PyTorch overflowing where the math is finite is excluded from PyTorch's error, not a free pass.
    ref2 = torch.tensor([1.0, 70000.0], dtype=torch.float64)
    base2 = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    with pytest.raises(AssertionError, match="non-finite mismatch"):
        assert_close_to_ref(base2, ref2, base2)


def test_shapes_empty_ints_tuples():
    e = torch.empty(0, 3)
    assert_close_to_ref(e, e.double(), e)
    with pytest.raises(AssertionError, match="shape mismatch"):
        assert_close_to_ref(torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="float64"):
        assert_close_to_ref(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    i = torch.tensor([1, 2, 3])
    assert_close_to_ref(i, i.clone(), i.clone())
    with pytest.raises(AssertionError):
        assert_close_to_ref(i, torch.tensor([1, 2, 4]), i.clone())
    a = torch.ones(4)
    assert_close_to_ref((a, None), (a.double(), None), (a, None))
    with pytest.raises(AssertionError, match=r"\[pair\[1\]\]"):
        assert_close_to_ref((a, a + 1), (a.double(), a.double()), (a, a), name="pair")
    with pytest.raises(AssertionError, match="length mismatch"):
        assert_close_to_ref((a,), (a.double(), a.double()), (a,))
    s = torch.tensor(2.0)  # 0-d
    assert_close_to_ref(s, s.double(), s)


# ---------------------------------------------------------------- run_distributed
# Rank functions live at module level: the spawned ranks import them by name.

def _rank_report(rank, world_size):
    t = torch.tensor([rank + 1.0, 2.0**rank])
    dist.all_reduce(t)
    return dict(rank=dist.get_rank(), world=dist.get_world_size(), env_rank=os.environ["RANK"],
                threads=torch.get_num_threads(), sum=t, marker=os.environ.get("LLMKERN_HARNESS_MARK"))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_run_distributed_results_and_all_reduce(world_size, monkeypatch):
    # Ranks see the parent's environment as it is at the call, even with a long-lived forkserver.
    monkeypatch.setenv("LLMKERN_HARNESS_MARK", f"ws{world_size}")
    out = run_distributed(_rank_report, world_size, timeout=60)
    assert [o["marker"] for o in out] == [f"ws{world_size}"] * world_size
    assert [o["rank"] for o in out] == list(range(world_size))
    assert all(o["world"] == world_size and o["threads"] == 1 for o in out)
    assert [o["env_rank"] for o in out] == [str(r) for r in range(world_size)]
    expected = torch.tensor([world_size * (world_size + 1) / 2, 2.0**world_size - 1])
    for o in out:
        assert torch.equal(o["sum"], expected)


def _raise_on_rank1(rank, world_size, message):
    if rank == 1:
        raise ValueError(message)
    dist.barrier()  # rank 0 waits for rank 1 forever: the runner must kill it


@pytest.mark.distributed
def test_run_distributed_reports_rank_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        run_distributed(_raise_on_rank1, 2, args=("planted failure",), timeout=60)
    assert info.value.rank == 1
    assert "ValueError: planted failure" in info.value.remote_traceback
    assert "_raise_on_rank1" in str(info.value)
    assert time.monotonic() - t0 < 60  # reported at once, not at the timeout


def _exit_on_rank1(rank, world_size):
    if rank == 1:
        os._exit(3)  # what a segfaulting C++ kernel looks like from outside: no traceback, no result
    dist.barrier()


@pytest.mark.distributed
def test_run_distributed_reports_dead_rank():
    with pytest.raises(RankFailedError, match="rank 1 of 2 died without reporting") as info:
        run_distributed(_exit_on_rank1, 2, timeout=60)
    assert info.value.rank == 1


def _hang_on_rank1(rank, world_size, folder):
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(f"{os.getpid()} {time.time()}")
    if rank == 1:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))  # the other ranks wait in a collective


@pytest.mark.distributed
def test_run_distributed_timeout_kills_all(tmp_path):
    timeout = 5.0
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1, 2\] of 3 still running"):
        run_distributed(_hang_on_rank1, 3, args=(str(tmp_path),), timeout=timeout)
    raised = time.time()
    records = [(tmp_path / f"rank{r}").read_text().split() for r in range(3)]
    fn_started = max(float(t) for _, t in records)
    # fn started after the timeout clock (which starts once all ranks joined), so this bounds it.
    assert raised - fn_started < timeout + 3.0
    for pid, _ in records:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_run_distributed_rejects_lambda():
    with pytest.raises(TypeError, match="module level"):
        run_distributed(lambda r, w: r, 2)


# ---------------------------------------------------------------- Triton interpreter

@triton.jit
def _bf16_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def test_triton_bf16_dot(triton_interpret):
    assert is_interpreted(_bf16_dot_kernel)
    a = torch.randn(32, 16).to(torch.bfloat16)
    b = torch.randn(16, 64).to(torch.bfloat16)
    c = torch.empty(32, 64)
    _bf16_dot_kernel[(1,)](a, b, c, 32, 64, 16)
    # bf16 x bf16 products are exact in fp32, so the fp32 result is judged like a fp32 matmul.
    assert_close_to_ref(c, a.double() @ b.double(), a.float() @ b.float())


@triton.autotune(configs=[triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 256})], key=["n"])
@triton.jit
def _autotuned_scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3.0, mask=mask)


def test_triton_autotune_runs_first_config(triton_interpret):
    n = 300
    x, y = torch.randn(n), torch.empty(n)
    _autotuned_scale_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    assert torch.equal(y, x * 3.0)
    assert _autotuned_scale_kernel.best_config.kwargs == {"BLOCK": 64}


@triton.jit
def _masked_block_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + pid, tl.sum(x, axis=0))


def test_triton_masked_load_tail(triton_interpret):
    n, block = 1000, 128  # 7 full blocks and a tail of 104
    buf = torch.full((8 * block,), float("nan"))  # past n: NaN, which a missing mask would sum in
    buf[:n] = torch.randn(n)
    out = torch.empty(8)
    _masked_block_sum_kernel[(8,)](buf, out, n, BLOCK=block)
    padded = torch.nn.functional.pad(buf[:n], (0, 8 * block - n)).view(8, block)
    assert_close_to_ref(out, padded.double().sum(1), padded.sum(1))


# ---------------------------------------------------------------- conftest behaviour

@pytest.mark.cuda
def test_cuda_marker_keeps_cpu_case(device):
    # Without a GPU, the "cuda" case of this test is skipped and the "cpu" case runs.
    assert torch.empty(1, device=device).device.type == device


def test_seed_is_reset_per_test():
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(0)))


def test_wider_result_is_judged_by_the_inputs_dtype():
    """An fp32 intermediate of a bf16 op is compared with PyTorch's bf16 error; a narrower result
    than its baseline is still refused."""
    import pytest as _pytest

    x = torch.randn(64, 64, dtype=torch.float64)
    ref = x @ x
    baseline = (x.bfloat16() @ x.bfloat16())
    assert_close_to_ref((x.bfloat16().float() @ x.bfloat16().float()), ref, baseline)
    with _pytest.raises(AssertionError):
        assert_close_to_ref((ref + 1.0).float(), ref, baseline)
    with _pytest.raises(TypeError, match="same dtype"):
        assert_close_to_ref(baseline, ref, ref.float())
