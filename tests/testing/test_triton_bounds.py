"""The Triton interpreter's bounds check (llmkern/testing/triton_interpret.py): an out-of-bounds
access fails its own test with a message naming the kernel and the argument, instead of reading a
neighbour's memory silently or killing the whole pytest process."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASK_LOAD:
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(x_ptr + offs)  # planted: the tail program reads past x
    if MASK_STORE:
        tl.store(y_ptr + offs, x * 2, mask=offs < n)
    else:
        tl.store(y_ptr + offs, x * 2)  # planted: the tail program writes past y


N, BLOCK = 1000, 128  # 7 full programs and a tail of 104: the tail's last 24 lanes are out of bounds


def _launch(x, y, mask_load=True, mask_store=True):
    _double_kernel[(triton.cdiv(N, BLOCK),)](x, y, N, BLOCK=BLOCK, MASK_LOAD=mask_load, MASK_STORE=mask_store)


def test_masked_kernel_runs(triton_interpret):
    x, y = torch.randn(N), torch.empty(N)
    _launch(x, y)
    assert torch.equal(y, x * 2)


def test_unmasked_load_is_reported(triton_interpret):
    # 24 floats past the end of x: inside the heap, so without the check this reads garbage silently.
    x, y = torch.randn(N), torch.empty(N)
    with pytest.raises(InterpreterError, match=r"out-of-bounds load in Triton kernel '_double_kernel' at "
                                               r"program_id \(7, 0, 0\): 24 of 128 addresses the mask lets "
                                               r"through lie outside tensor argument 'x_ptr' \(4000 bytes\); "
                                               r"the first is at byte offset 4000"):
        _launch(x, y, mask_load=False)


def test_store_past_a_view_is_refused_before_it_writes(triton_interpret):
    """y is the first N elements of a larger buffer: writing past y is a bug even inside the buffer,
    and the check runs before the store, so the rest of the buffer keeps its values."""
    x, buf = torch.randn(N), torch.full((N + BLOCK,), -7.0)
    with pytest.raises(InterpreterError, match=r"out-of-bounds store .* outside tensor argument 'y_ptr'"):
        _launch(x, buf[:N], mask_store=False)
    assert torch.equal(buf[:7 * BLOCK], x[:7 * BLOCK] * 2)  # programs 0-6 ran
    assert torch.equal(buf[7 * BLOCK:], torch.full((N + BLOCK - 7 * BLOCK,), -7.0))


@triton.jit
def _count_kernel(counts_ptr, idx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(idx_ptr + offs, mask=offs < n, other=0)
    tl.atomic_add(counts_ptr + idx, 1, mask=offs < n)


def test_atomics_are_checked(triton_interpret):
    counts = torch.zeros(4, dtype=torch.int32)
    _count_kernel[(1,)](counts, torch.tensor([0, 1, 1, 3]), 4, BLOCK=8)
    assert counts.tolist() == [1, 2, 0, 1]
    with pytest.raises(InterpreterError, match=r"out-of-bounds atomic .* 'counts_ptr' \(16 bytes\); the "
                                               r"first is at byte offset 16"):
        _count_kernel[(1,)](counts, torch.tensor([0, 4, 1]), 3, BLOCK=8)  # index 4 of a 4-element tensor


def test_strided_and_empty_arguments(triton_interpret):
    """A transposed view is addressed through its strides (its bytes span the whole base), and an
    empty tensor has no bytes: any access to it is out of bounds."""
    base = torch.randn(64, 16)
    y = torch.empty(N)
    _launch(base.t(), y)  # reads the first 1000 of the 1024 floats under the transposed view
    assert torch.equal(y, base.reshape(-1)[:N] * 2)
    with pytest.raises(InterpreterError, match=r"'x_ptr' \(0 bytes\)"):
        _launch(torch.empty(0), y)


_CHILD = textwrap.dedent('''
    import os
    import torch
    {setup}
    import triton
    import triton.language as tl


    @triton.jit
    def _far_store_kernel(y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64) + (1 << 44)  # planted: 2^46 bytes past y
        tl.store(y_ptr + offs, tl.zeros([BLOCK], tl.float32))


    def test_far_store():
        _far_store_kernel[(1,)](torch.empty(16), BLOCK=16)


    def test_after():
        assert torch.ones(2).sum() == 2
''')


def _run_child(tmp_path, setup):
    path = tmp_path / "test_planted_oob.py"
    path.write_text(_CHILD.format(setup=setup))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_planted_far_store_fails_one_test_not_the_run(tmp_path):
    """The test of the tests: a pytest run holding a kernel that stores 2^46 bytes past its tensor.
    Without the check the interpreter writes there and the process dies of SIGSEGV, taking every
    other test with it; with the check the run ends normally with that one test failed."""
    bare = _run_child(tmp_path, 'os.environ["TRITON_INTERPRET"] = "1"')
    assert bare.returncode == -11, (bare.returncode, bare.stdout[-2000:], bare.stderr[-2000:])  # SIGSEGV
    checked = _run_child(tmp_path, "from llmkern.testing import enable_triton_interpreter\n"
                                   "enable_triton_interpreter()")
    assert checked.returncode == 1, checked.stdout[-3000:]
    assert "1 failed, 1 passed" in checked.stdout, checked.stdout[-3000:]
    assert "out-of-bounds store in Triton kernel '_far_store_kernel'" in checked.stdout


@triton.jit
def _flagged_copy_kernel(x_ptr, y_ptr, flag_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    skip = tl.load(flag_ptr) != 0.0  # the mask of triton_kernels/fused_adamw.py
    mask = (offs < n) & (skip == 0)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


def test_mask_combined_with_a_loaded_scalar(triton_interpret):
    """Such a mask reaches the interpreter as 0/1 integers, not bools; read as indices it made a
    1-element copy look out of bounds (tests/optim/test_fused_adamw.py caught that)."""
    for n in (1, 5):
        x, y = torch.randn(n), torch.zeros(n)
        _flagged_copy_kernel[(1,)](x, y, torch.zeros(1), n, BLOCK=64)
        assert torch.equal(y, x)
        _flagged_copy_kernel[(1,)](x, y.zero_(), torch.ones(1), n, BLOCK=64)
        assert not y.any()
