"""Block-level emulation: barriers, shared memory (static and dynamic), and the barrier misuse the
emulator must expose, under the forward, reverse and random thread schedules."""
import pytest

from emu_build import RELEASE, SCHEDULES


@pytest.fixture(scope="module")
def matmul(program):
    return program("matmul")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tiled_half_matmul(matmul, schedule):
    (r,) = matmul.results("matmul", schedule)
    assert float(r["err"]) < 1e-4  # fp32 accumulation of 112 products of halves


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["matmul_no_sync_after_load", "matmul_no_sync_after_compute"])
def test_missing_syncthreads_gives_wrong_result(matmul, case, schedule):
    # Planted bug: a tile barrier is missing. Random inputs, so stale and fresh values differ.
    (r,) = matmul.results(case, schedule)
    assert float(r["err"]) > 0.1


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_neighbour_read_with_barrier(matmul, schedule):
    (r,) = matmul.results("shift", schedule)
    assert r["bad"] == "0"


def test_neighbour_read_without_barrier_fails_in_reverse(matmul):
    # Reading s[tid - 1] without a barrier is right in forward order (the writer ran first) and wrong
    # in reverse order: the reason every kernel test runs both.
    assert matmul.results("shift_no_sync", "forward")[0]["bad"] == "0"
    assert int(matmul.results("shift_no_sync", "reverse")[0]["bad"]) == 63


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_divergent_barrier_is_reported(matmul, schedule):
    msg = matmul.kernel_error("divergent", schedule)
    assert "divergent_barrier" in msg and "divergent barrier" in msg and "matmul.cu:" in msg


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_early_exit_before_barrier_is_reported(matmul, schedule):
    msg = matmul.kernel_error("early_exit", schedule)
    assert "early_return" in msg and "early return before a barrier" in msg


def test_early_exit_allowed_when_not_strict(matmul):
    # LLMKERN_EMU_STRICT=0 counts exited threads as arrived, as current GPUs do in practice.
    out = matmul.run("early_exit", LLMKERN_EMU_STRICT=0).stdout
    assert "KERNEL_ERROR" not in out


def test_deadlock_is_reported(matmul):
    msg = matmul.kernel_error("deadlock")
    assert "warp_vs_block" in msg and "deadlock" in msg and "__syncwarp" in msg


def test_trap_and_exceptions_are_reported(matmul):
    assert "__trap() called" in matmul.kernel_error("trap")
    msg = matmul.kernel_error("exception")
    assert "throws_in_kernel" in msg and "block (1,0,0) thread (9,0,0)" in msg and "boom from kernel code" in msg


def test_launch_configuration_is_checked(matmul):
    assert "1025 threads per block" in matmul.kernel_error("too_many_threads")


def test_dynamic_shared_memory(matmul):
    first, second = matmul.results("dyn_smem")
    assert first["limit_reported"] == "1"  # 64 KiB without cudaFuncSetAttribute
    assert second["nan"] == "1" and second["last"] == "16383"  # 0xFF-filled, exact size usable


def test_launches_after_errors_still_work(matmul):
    rows = matmul.results("recover")
    assert all(r.get("bad", "0") == "0" for r in rows)
    assert float(rows[-1]["err"]) < 1e-4 and "missed_error" not in str(rows)


def test_workers(matmul):
    # Blocks on 2 OS threads; static __shared__ is per OS thread.
    (r,) = matmul.results("matmul", LLMKERN_EMU_WORKERS=2)
    assert float(r["err"]) < 1e-4
    # An error on a worker thread is thrown on the launching thread.
    assert "divergent barrier" in matmul.kernel_error("divergent", LLMKERN_EMU_WORKERS=2)
    assert float(matmul.results("matmul_no_sync_after_load", LLMKERN_EMU_WORKERS=2)[0]["err"]) > 0.1


def test_bad_schedule_is_rejected(matmul):
    assert "LLMKERN_EMU_SCHEDULE=sideways" in matmul.kernel_error("matmul", "sideways")


def test_ucontext_fallback(program):
    # The portable context switch (used off x86-64) runs the same kernels and reports the same errors.
    p = program("matmul", RELEASE + ["-DCUEMU_UCONTEXT"])
    assert float(p.results("matmul", "reverse")[0]["err"]) < 1e-4
    assert float(p.results("matmul_no_sync_after_load", "forward")[0]["err"]) > 0.1
    assert "divergent barrier" in p.kernel_error("divergent")
    assert p.results("recover")[0]["bad"] == "0"

