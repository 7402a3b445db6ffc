"""`llmkern info` tells the truth about this machine; `llmkern --help` names only what exists."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkern import _ext, cli

ROOT = Path(__file__).resolve().parents[1]


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


def test_help_names_only_what_exists(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "{info,bench,train}" in text
    for path in re.findall(r"\b(?:examples|bench)/[\w./]+", text):
        assert (ROOT / path).exists(), path
    # every example line is a command the parser takes
    for line in text.split("examples:")[1].strip().splitlines():
        argv = line.strip().split("  ")[0].split()[1:]
        assert argv[0] in ("info", "bench", "train"), line
        if argv[0] == "bench":
            from llmkern import bench
            bench.parse_args(argv[1:])
    with pytest.raises(SystemExit):
        cli.main(["info", "--no-such-flag"])


def test_bench_and_train_help_come_from_their_own_parsers(capsys):
    for cmd, words in (("bench", "--compare FILE"), ("train", "--method")):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0 and words in capsys.readouterr().out


def test_info_output_starts_with_its_own_words():
    out = subprocess.run([sys.executable, "-m", "llmkern", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("llmkern info\n")
    assert out.stderr == "", out.stderr
    if not torch.cuda.is_available():
        assert "  GPU       none" in out.stdout


def test_cpp_extension_warning_is_silenced_at_the_source():
    """torch.utils.cpp_extension logs "No CUDA runtime is found" at import on a machine with CUDA headers
    but no GPU; `llmkern info --kernels` imports it through kernel_report._cpp_extension, which does not."""
    code = "import sys; from llmkern import kernel_report; kernel_report._cpp_extension(); print('ok')"
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0 and "No CUDA runtime" not in ours.stderr, ours.stderr
    plain = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True, text=True,
                           timeout=300)
    if "No CUDA runtime" not in plain.stderr:
        pytest.skip("torch does not warn on this machine (a GPU is visible, or no CUDA toolkit was found)")


def test_kernel_summary_is_one_line_per_kernel():
    from llmkern import kernel_report as kr

    assert kr.short_name("void llmkern::ops::detail::lora_fwd_kernel<float, 64>(const float*, int)") == "lora_fwd_kernel"
    assert kr.short_name("_adamw_kernel") == "_adamw_kernel"
    rows = [{"kernel": "void ns::k<float, (int)4>(float*)", "config": "csrc/ops/cuda/a.cu", "arch": "sm_80",
             "registers": 40, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0},
            {"kernel": "void ns::k<c10::Half, (int)8>(c10::Half*)", "config": "csrc/ops/cuda/a.cu", "arch": "sm_90",
             "registers": 72, "spill_stores": 8, "spill_loads": 4, "shared_bytes": 1024},
            {"kernel": "_t_kernel", "config": "BLOCK=64,w4,s2", "arch": 80, "registers": 30, "spill_stores": 0,
             "spill_loads": 0, "shared_bytes": 4096}]
    summary = kr.summarize(rows)
    assert [(s["kernel"], s["variants"], s["registers"], s["worst_spill"], s["max_shared_bytes"]) for s in summary] == [
        ("k", 2, "40-72", 12, 1024), ("_t_kernel", 1, "30-30", 0, 4096)]
    assert len(kr.format_summary(rows).splitlines()) == 2 + 2


@pytest.mark.slow
def test_info_kernels_is_a_short_summary():
    """Cold, this compiles every kernel for sm_80/sm_90 (minutes); tests/static fills the same cache first."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "llmkern", "info", "--kernels"], capture_output=True, text=True,
                         timeout=3000)
    assert out.returncode == 0 and out.stdout.startswith("llmkern info\n") and out.stderr == "", out.stderr
    table = out.stdout.split("kernels (registers")[1]
    assert "unavailable" not in table, table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert 3 <= len(lines) <= 120 and max(map(len, lines)) <= 160
    assert "--all-configs lists every one" in table
