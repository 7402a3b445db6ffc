"""AddressSanitizer on emulated kernels (-fsanitize=address -DCUEMU_SHARED_STATIC)."""
import pytest

from emu_build import ASAN


@pytest.fixture(scope="module")
def oob(program):
    return program("oob", ASAN)


def test_clean_kernel_has_no_report(oob):
    # Barriers and shuffles switch fibers; the switches are annotated, so ASan stays quiet.
    r = oob.run("clean")
    assert "AddressSanitizer" not in r.stderr, r.stderr
    assert "RESULT case=clean out0=32" in r.stdout


def test_out_of_bounds_global_write(oob):
    # Planted bug: `if (i <= n)`. cudaMalloc allocates the exact size, so the write hits a redzone.
    r = oob.run("oob_global", check=False)
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "scale_off_by_one" in r.stderr and "oob.cu:28" in r.stderr


def test_out_of_bounds_shared_write(oob):
    # Planted bug: a 65th thread indexes a 64-element static __shared__ array.
    r = oob.run("oob_shared", check=False)
    assert r.returncode != 0
    assert "global-buffer-overflow" in r.stderr and "shared_overflow" in r.stderr
