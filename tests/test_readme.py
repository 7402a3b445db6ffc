"""Every ```python block of README.md runs as written, each in a fresh process outside the source tree.

A block whose first line is ``# torchrun ... --nproc-per-node N <file>`` runs under torchrun with N
ranks. The README's shell commands name only make targets, scripts and files that exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
TORCHRUN = re.compile(r"#\s*torchrun\b.*--nproc-per-node[ =](\d+)")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4  # LoRA, PEFT interop, mixed precision, data parallel


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_block_runs(index, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code = BLOCKS[index]
    script = tmp_path / f"readme_block{index}.py"
    script.write_text(code)
    first = code.splitlines()[0]
    m = TORCHRUN.match(first)
    cmd = [sys.executable, str(script)]
    if m:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={m.group(1)}",
               str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index}:\n{code}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                 f"--- stderr\n{proc.stderr[-3000:]}"


def test_commands_and_paths_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"\bmake ([a-z][a-z-]*)", README)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, not in the Makefile"
    for path in set(re.findall(r"`((?:examples|bench|llmkern|tests|csrc|triton_kernels)/[\w./-]+\.(?:py|cu|cpp|h))`",
                               README)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    assert "../shared" not in README and "research/" not in README
