"""Every barrier of the CUDA adapter kernels is checked under every emulator schedule.

A missing __syncthreads in csrc/ops/cuda/adapter_bottleneck_kernel.cu was once caught only by the
reverse schedule. Here each barrier is removed in turn from an emulated build of that file (a copy
in which every `__syncthreads();` becomes `LLMKERN_PLANTED_SYNC(i);`, skipped when
LLMKERN_PLANT_NO_SYNC=i), and the forward, reverse and random schedules must each give a wrong
result, on shapes chosen so that threads of a block share a shared-memory value across the barrier
in every order.
"""
import hashlib
import os
import re

import pytest
import torch

from emu_build import BASE_FLAGS, CACHE, INCLUDES, ROOT

SOURCE = ROOT / "csrc/ops/cuda/adapter_bottleneck_kernel.cu"
SCHEMA = ROOT / "csrc/ops/adapter_bottleneck.cpp"
NS = "llmkern_emu_plant"
PRELUDE = """#include <cstdlib>
// Test build (tests/emu/test_adapter_barriers.py): barrier i is skipped, by every thread alike,
// when LLMKERN_PLANT_NO_SYNC=i.
static bool llmkern_planted_skip(int id) {
  const char* v = std::getenv("LLMKERN_PLANT_NO_SYNC");
  return v && std::atoi(v) == id;
}
#define LLMKERN_PLANTED_SYNC(id) do { if (!llmkern_planted_skip(id)) __syncthreads(); } while (0)
"""
# The row kernels loop over rows n = blockIdx.x, += gridDim.x, with the grid capped at 65535 blocks,
# so the barriers that guard shared memory across rows act only past 65535 rows: far beyond what
# the emulator runs. The test build caps the grid at 2 blocks instead, taking the same loop at T = 5.
ROW_GRID = ("std::min<int64_t>(n, 65535)", "std::min<int64_t>(n, 2)")


def planted_source() -> tuple[str, dict[int, str]]:
    """The kernel source with numbered barriers, and each barrier's line and comment."""
    text = SOURCE.read_text()
    assert text.count(ROW_GRID[0]) == 1, f"{SOURCE} no longer caps the row grid with {ROW_GRID[0]!r}"
    lines, barriers = text.replace(*ROW_GRID).splitlines(), {}
    for no, line in enumerate(lines):
        if "__syncthreads();" in line:
            i = len(barriers) + 1
            barriers[i] = f"line {no + 1}: {line.strip()}"
            lines[no] = line.replace("__syncthreads();", f"LLMKERN_PLANTED_SYNC({i});")
    return PRELUDE + f'#line 1 "{SOURCE}"\n' + "\n".join(lines) + "\n", barriers


def build_planted():
    """Compiles the planted copy and the adapter schema into torch ops under `llmkern_emu_plant`
    (cached under $TMPDIR/llmkern-emu-tests by a hash of every input; minutes the first time)."""
    from torch.utils.cpp_extension import load

    text, barriers = planted_source()
    flags = ["-O2", *BASE_FLAGS[1:], "-std=c++20", f"-DLLMKERN_NS={NS}", "-DLLMKERN_EMU=1",
             "-DLLMKERN_DEVICE_KEY=CPU", "-Wno-unknown-pragmas"]
    h = hashlib.sha256(text.encode() + SCHEMA.read_bytes() + " ".join(flags).encode())
    for f in sorted((ROOT / "csrc/emu").glob("*")) + sorted((ROOT / "csrc/include/llmkern").glob("*")) + [
            SOURCE.parent.parent / "adapter_bottleneck.h"]:
        h.update(f.name.encode() + f.read_bytes())
    build_dir = CACHE / f"adapter_plant-{h.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / "adapter_planted_emu.cpp"
    if not source.exists() or source.read_text() != text:  # a new mtime would make ninja rebuild
        source.write_text(text)
    os.environ.setdefault("MAX_JOBS", "1")
    load(name="llmkern_adapter_plant", sources=[str(source), str(SCHEMA)],
         extra_include_paths=[str(p) for p in INCLUDES[:4]] + [str(SOURCE.parent)],
         extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
         is_python_module=False, verbose=False)
    return getattr(torch.ops, NS), barriers


def run_planted(op, t, c, r, schedule, planted, seed=0):
    """Forward and backward of the planted build on fp32 inputs with LayerNorm (every barrier is on
    that path); returns (ours, ref, PyTorch) lists of out and the seven gradients."""
    from llmkern.ops.adapter_bottleneck import adapter_bottleneck_ref

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, c, generator=g) * 2 + 0.5
    params = [torch.randn(r, c, generator=g) / c**0.5, torch.randn(r, generator=g),
              torch.randn(c, r, generator=g) / r**0.5, torch.randn(c, generator=g),
              1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)]
    gy = torch.randn(t, c, generator=g)
    os.environ.update(LLMKERN_EMU_SCHEDULE=schedule, LLMKERN_PLANT_NO_SYNC=str(planted))
    try:
        dw, db, uw, ub, lw, lb = params
        out, z, mean, rstd = op.adapter_bottleneck(x, dw, db, uw, ub, 1.5, "gelu", lw, lb, 1e-5, None)
        grads = op._adapter_bottleneck_backward(gy, x, dw, db, uw, 1.5, "gelu", lw, lb, z, mean, rstd, True)
    finally:
        del os.environ["LLMKERN_PLANT_NO_SYNC"], os.environ["LLMKERN_EMU_SCHEDULE"]

    def torch_run(dtype):
        leaves = [v.to(dtype).requires_grad_() for v in (x, *params)]
        y = adapter_bottleneck_ref(*leaves[:5], 1.5, "gelu", leaves[5], leaves[6], 1e-5, None)
        return [y.detach(), *torch.autograd.grad(y, leaves, gy.to(dtype))]

    return [out, *grads], torch_run(torch.float64), torch_run(torch.float32)


def wrong_outputs(ours, ref, base) -> list[int]:
    """Indices of the results the error rule rejects."""
    from llmkern.testing import assert_close_to_ref

    bad = []
    for i, (o, rf, b) in enumerate(zip(ours, ref, base)):
        try:
            assert_close_to_ref(o, rf, b, grad=i > 0)
        except AssertionError:
            bad.append(i)
    return bad


# T = 5 rows on the 2-block grid: each block loops over rows. R = 10: the last chunk of kRC = 8
# ranks has two, written by threads 0 and 1 and read by every thread after the "as[] complete" /
# "gzs[] complete" barrier, so without it thread 0 reads rank 9 before thread 1 writes it even in
# forward order. tests/ops/test_adapter_bottleneck.py runs R = 9, whose last chunk has one rank:
# thread 0 reads only its own write and the forward schedule misses both barriers (measured).
T, C, R = 5, 70, 10
SCHEDULES = ("forward", "reverse", "random:7")
# Not needed for correctness: the next row's first block_sum barrier (line 62) already separates the
# last reads of as[]/gzs[]/tot[] from their next writes, so removing these changes no result.
REDUNDANT = ("as[] and tot[] are rewritten by the next row", "gzs[] and tot[] are rewritten by the next row")
BARRIERS = planted_source()[1]
NEEDED = [i for i, b in BARRIERS.items() if not b.endswith(REDUNDANT)]


@pytest.fixture(scope="module")
def planted(program):  # `program` skips where g++ or the CUDA headers are missing
    op, barriers = build_planted()
    assert barriers == BARRIERS
    return op


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unplanted_build_is_right(planted, schedule):
    assert wrong_outputs(*run_planted(planted, T, C, R, schedule, planted=0)) == []


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("barrier", NEEDED, ids=[BARRIERS[i].split(":")[0].replace(" ", "") for i in NEEDED])
def test_missing_barrier_is_caught_by_every_schedule(planted, barrier, schedule):
    bad = wrong_outputs(*run_planted(planted, T, C, R, schedule, planted=barrier))
    assert bad, f"removing the barrier at {BARRIERS[barrier]} went unnoticed under the {schedule} schedule"


def test_row_loop_barriers_are_redundant(planted):
    """If a change makes one of these needed, this fails: move it out of REDUNDANT."""
    assert len(BARRIERS) - len(NEEDED) == len(REDUNDANT)
    for i in set(BARRIERS) - set(NEEDED):
        for schedule in SCHEDULES:
            assert wrong_outputs(*run_planted(planted, T, C, R, schedule, planted=i)) == [], BARRIERS[i]
