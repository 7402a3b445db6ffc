"""llmkern installs like a library: `pip install --no-build-isolation .` (not editable) into a fresh venv
that already has torch gives a package that works from outside the source tree.

The venv sees this environment's torch (and the rest of requirements.txt) through a .pth file, as a
user's environment would already hold them, so nothing is downloaded. The wheel is built with
LLMKERN_CUDA=0, i.e. llmkern._C alone (the CUDA builds are checked by tests/static and tests/emu), from
the objects in build/temp/<torch>/_C that `make build` compiled with the same commands (setup.py), so
it links without compiling; alone on a fresh clone it compiles 11 units (minutes): marked slow."""
from __future__ import annotations

import os
import site
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # This environment's site-packages, after the venv's own: torch, triton, numpy, transformers, ...
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "_with_torch.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    proc = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-build-isolation",
                           "--no-deps", "--no-index", str(ROOT)], capture_output=True, text=True,
                          env=dict(env, LLMKERN_CUDA="0"), cwd=tmp, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env_dir, Path(purelib), env, tmp


def run(installed, *args, **kw):
    env_dir, _, env, tmp = installed
    return subprocess.run([str(env_dir / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=600, **kw)


def test_the_installed_package_is_imported_not_the_source_tree(installed):
    _, purelib, _, _ = installed
    out = run(installed, "python", "-c", "import llmkern; print(llmkern.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (purelib / "llmkern" / "__init__.py").resolve()


def test_extensions_are_found_and_run(installed):
    code = """
import torch
from llmkern import _ext
import llmkern.ops as ops
for name in _ext.EXTENSIONS:
    print(name, _ext.status(name))
assert _ext.available("_C"), _ext.status("_C")
x, w = torch.randn(5, 8), torch.randn(6, 8)
a, b = torch.randn(2, 8), torch.randn(6, 2)
y = ops.lora_linear(x, w, None, a, b, 0.5, 0.0, 0, 0, backend="cpu")
torch.testing.assert_close(y, x @ w.T + 0.5 * (x @ a.T) @ b.T)
print("op ok")
"""
    out = run(installed, "python", "-c", code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "_C built and imported" in out.stdout and "op ok" in out.stdout
    assert "_C_emu not built" in out.stdout  # LLMKERN_CUDA=0, and the tree's own .so files are not shipped


def test_triton_kernels_ship_as_files_and_import(installed):
    _, purelib, _, _ = installed
    pkg = purelib / "llmkern" / "triton_kernels"
    assert pkg.is_dir() and not pkg.is_symlink()
    assert {p.name for p in (ROOT / "triton_kernels").glob("*.py")} <= {p.name for p in pkg.glob("*.py")}
    out = run(installed, "python", "-c", "import llmkern.triton_kernels.lora_linear as k; print(k.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent.resolve() == pkg.resolve()


def test_llmkern_info_is_clean(installed):
    out = run(installed, "llmkern", "info")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("llmkern info\n")
    assert out.stderr == ""  # no warning before info's own words (torch's "No CUDA runtime is found")
    assert "llmkern._C       CPU C++ kernels (OpenMP): built and imported" in out.stdout


def test_bench_says_it_needs_the_source_checkout(installed):
    out = run(installed, "llmkern", "bench", "--quick")
    assert out.returncode == 2 and "not part of an installed package" in out.stderr
