"""csrc/comm/ring_schedule.h: simulated on 1..16 ranks in C++, and mirrored exactly by llmkern.parallel.ring.

The C++ test program is compiled with g++ once and cached under $TMPDIR keyed by a hash of its sources.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from llmkern.parallel import ring

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc/comm/ring_schedule.h"
SOURCE = Path(__file__).parent / "comm_programs/ring_schedule_test.cpp"
FLAGS = ["-std=c++20", "-O1", "-Wall", "-Werror"]


@pytest.fixture(scope="module")
def program() -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    key = hashlib.sha256(HEADER.read_bytes() + SOURCE.read_bytes() + " ".join(FLAGS).encode())
    key = key.hexdigest()[:16]
    exe = Path(tempfile.gettempdir()) / "llmkern-comm-tests" / f"ring_schedule_test-{key}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["g++", *FLAGS, f"-I{HEADER.parent}", str(SOURCE), "-o", str(tmp)], check=True)
        tmp.rename(exe)  # atomic: a concurrent run never executes a half-written binary
    return exe


def test_cpp_schedule_simulation(program):
    out = subprocess.run([str(program), "check"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def _python_dump(n: int) -> str:
    lines = []
    for world in range(1, 17):
        for c in range(world):
            off, cnt = ring.chunk_range(n, world, c)
            lines.append(f"chunk {world} {c} {off} {cnt}")
        for r in range(world):
            for s in range(ring.ring_steps(world)):
                a, b = ring.reduce_scatter_step(r, world, s), ring.all_gather_step(r, world, s)
                lines.append(f"step {world} {r} {s} {a[0]} {a[1]} {b[0]} {b[1]}")
            lines.append(f"rank {world} {r} {ring.next_rank(r, world)} {ring.prev_rank(r, world)} "
                         f"{ring.owned_chunk(r, world)} {ring.elements_sent(n, r, world)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n", [0, 1, 5, 16, 97, 1025, 4097])
def test_python_mirrors_cpp(program, n):
    out = subprocess.run([str(program), "dump", str(n)], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout == _python_dump(n)


@pytest.mark.parametrize("world", range(1, 17))
def test_python_ring_simulation(world):
    """The Python schedule reduces correctly on its own (exact integers), total traffic 2(w-1)·n."""
    for n in (0, 1, world - 1, world + 1, 97):
        if n < 0:
            continue
        bufs = [[(r + 1) * 1000 + i * 7 for i in range(n)] for r in range(world)]
        want = [sum(col) for col in zip(*bufs)] if n else []
        for phase in (ring.reduce_scatter_step, ring.all_gather_step):
            if phase is ring.all_gather_step:  # after reduce-scatter rank r holds the sum of chunk r
                for r in range(world):
                    assert ring.owned_chunk(r, world) == r
                    off, cnt = ring.chunk_range(n, world, r)
                    assert bufs[r][off:off + cnt] == want[off:off + cnt]
            for s in range(ring.ring_steps(world)):
                wire = []
                for r in range(world):
                    off, cnt = ring.chunk_range(n, world, phase(r, world, s)[0])
                    wire.append(bufs[r][off:off + cnt])
                for r in range(world):
                    off, cnt = ring.chunk_range(n, world, phase(r, world, s)[1])
                    got = wire[ring.prev_rank(r, world)]
                    assert len(got) == cnt
                    for i in range(cnt):
                        reduce = phase is ring.reduce_scatter_step
                        bufs[r][off + i] = bufs[r][off + i] + got[i] if reduce else got[i]
        assert all(b == want for b in bufs)
        assert sum(ring.elements_sent(n, r, world) for r in range(world)) == 2 * (world - 1) * n
