"""`llmkern info` tells the truth about this machine."""
import subprocess
import sys

import torch

from llmkern import _ext, cli


def test_info_reports_extensions_backends_and_isa():
    text = cli.info()
    assert f"torch     {torch.__version__}" in text
    assert "llmkern._C       CPU C++ kernels (OpenMP): built and imported" in text
    for name in ("_C_cuda", "_C_emu"):
        line = next(line for line in text.splitlines() if f"llmkern.{name}" in line)
        assert _ext.status(name) in line  # built, or the reason it is not
    assert "  cpu     usable" in text and "  ref     usable" in text
    if not torch.cuda.is_available():
        assert "  cuda    not usable: no CUDA device is visible" in text
    assert "vector ISA" in text and "torch CPU capability" in text


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "llmkern", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llmkern info" in out.stdout and "Traceback" not in out.stderr


def test_import_is_quiet():
    """Importing llmkern and its ops never prints (no traceback even when an extension is missing)."""
    out = subprocess.run([sys.executable, "-c", "import llmkern, llmkern.ops, llmkern.nn"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
