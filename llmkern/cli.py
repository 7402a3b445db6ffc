"""`llmkern info | train | bench`.

`info` tells what was built, which backends can run here and why the others cannot, and what the
CPU offers. It never raises because something is missing: it says so.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys


def _cpu_isa() -> dict[str, str]:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    vec = [name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512F"),
                                   ("avx512bw", "AVX-512BW"), ("avx512_bf16", "AVX-512-BF16"),
                                   ("avx512_fp16", "AVX-512-FP16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    import torch
    return {"model": model, "vector ISA": ", ".join(vec) or "none of AVX2/AVX-512",
            "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
            "cores (torch threads)": f"{os.cpu_count()} ({torch.get_num_threads()})"}


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"release ([\d.]+)", out)
        return f"{m.group(1)} ({nvcc})" if m else out.strip().splitlines()[-1]
    except Exception as e:  # pragma: no cover
        return f"failed: {e}"


def _nccl_version() -> str:
    import torch
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


def info(kernels: bool = False) -> str:
    import torch

    import llmkern
    from llmkern import _ext
    from llmkern.ops import _backends

    lines = ["llmkern info", ""]
    try:
        import triton
        triton_v = triton.__version__
    except Exception as e:
        triton_v = f"not importable ({e})"
    gpu = torch.cuda.is_available()
    lines += ["versions",
              f"  llmkern   {llmkern.__version__}",
              f"  python    {platform.python_version()}",
              f"  torch     {torch.__version__} (built with CUDA {torch.version.cuda})",
              f"  triton    {triton_v}",
              f"  nvcc      {_nvcc_version()}",
              f"  NCCL      {_nccl_version()} (torch's)",
              f"  GPU       {torch.cuda.get_device_name(0) if gpu else 'none visible'}",
              "", "extensions"]
    for name, what in _ext.EXTENSIONS.items():
        mod = _ext.load(name)
        # The SIMD level matters for the host-compiled kernels only (_C, _C_emu).
        extra = f"; compiled for {mod.simd}" if mod is not None and name != "_C_cuda" else ""
        lines.append(f"  llmkern.{name:8s} {what}: {_ext.status(name)}{extra}")
    lines += ["", "backends (for a float32 op on this machine's tensors)"]
    from llmkern.ops.lora_linear import UNAVAILABLE
    probe_cpu = [torch.empty(0)]
    for b in _backends.BACKENDS:
        if b == "cuda" or (b == "triton" and gpu):
            probe = [torch.empty(0, device="cuda")] if gpu else [torch.empty(0, device="meta")]
        else:
            probe = probe_cpu
        reasons = _backends.not_supported_reasons(b, probe, (torch.float32,), UNAVAILABLE)
        if b == "cuda" and not gpu:
            reasons = ["no CUDA device is visible"] + [r for r in reasons if "meta" not in r]
        lines.append(f"  {b:7s} {'usable' if not reasons else 'not usable: ' + '; '.join(reasons)}")
    lines += ["", "cpu"] + [f"  {k:22s} {v}" for k, v in _cpu_isa().items()]
    if kernels:
        lines += ["", "kernels (registers / spills / shared memory from ptxas, sm_80 and sm_90)"]
        try:
            from llmkern import kernel_report
            lines.append(kernel_report.format_report(kernel_report.triton_report() + kernel_report.nvcc_report()))
        except Exception as e:
            lines.append(f"  unavailable: {type(e).__name__}: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkern", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="versions, extensions, usable backends, CPU ISA")
    p_info.add_argument("--kernels", action="store_true",
                        help="also compile every kernel for sm_80/sm_90 and list registers, spills, smem")
    sub.add_parser("train", help="the demo fine-tune (examples/finetune_lora.py); extra args are passed on",
                   add_help=False)
    sub.add_parser("plan", help="a pipeline schedule's timeline, bubble and memory (llmkern plan --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        print(info(kernels=args.kernels))
        return 0
    if args.cmd == "train":
        from llmkern import demo
        return demo.main(rest)
    if args.cmd == "plan":
        from llmkern.parallel import plan
        return plan.main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
