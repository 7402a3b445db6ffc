"""Warp collectives, atomics and wmma under the emulator, and the warp-level misuse it must report."""
import pytest

from emu_build import SCHEDULES


@pytest.fixture(scope="module")
def reduce(program):
    return program("reduce")


@pytest.fixture(scope="module")
def wmma(program):
    return program("wmma")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["sum", "sum_dyn", "warp_sum_full"])
def test_block_reduce(reduce, case, schedule):
    (r,) = reduce.results(case, schedule)
    assert float(r["err"]) < 1e-3  # fp32 sums of 1e5 values in [-1, 1)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", ["half_warps", "vote", "atomics_half"])
def test_collectives_and_atomics(reduce, case, schedule):
    (r,) = reduce.results(case, schedule)
    assert r["bad"] == "0"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shuffle_mask_naming_missing_lanes(reduce, schedule):
    # Planted bug: 200-thread blocks; the last warp has 8 lanes but the shuffle mask names 32.
    msg = reduce.kernel_error("sum_partial_warp", schedule)
    assert "warp_sum" in msg and "do not exist" in msg and "0xffffff00" in msg


def test_shuffle_in_divergent_branch(reduce):
    msg = reduce.kernel_error("shfl_divergent")
    assert "shfl_in_branch" in msg and "__shfl_xor_sync" in msg


def test_shuffle_reading_lane_outside_mask(reduce):
    msg = reduce.kernel_error("shfl_excludes_self")
    assert "reads lane 16, which is not in the mask" in msg


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_wmma_gemm(wmma, schedule):
    (r,) = wmma.results("gemm", schedule)
    assert float(r["err"]) < 1e-4


def test_wmma_misuse(wmma):
    assert "not 32-byte aligned" in wmma.kernel_error("gemm_misaligned")
    msg = wmma.kernel_error("wmma_partial_warp")
    assert "wmma_half_warp" in msg and "wmma::store_matrix_sync" in msg
