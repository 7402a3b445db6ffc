"""llmkern's command line: `llmkern info | bench | train`.

`info` tells what was built, which backends can run here and why the others cannot, and what the
CPU offers. It never raises because something is missing: it says so.
"""
from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys


def _cpu_lines() -> dict[str, str]:
    from llmkern import bench_env

    cpu = bench_env.cpu()
    return {"model": f"{cpu['model']} ({cpu['vendor'] or 'vendor unknown'})",
            "vector ISA": " ".join(cpu["isa"]) or "none of " + ", ".join(bench_env.ISA_FLAGS),
            "torch CPU capability": cpu.get("torch_capability", "?"),
            "cores (torch threads)": f"{cpu['cores']} ({cpu.get('torch_threads', '?')})"}


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


def info(kernels: bool = False, all_configs: bool = False) -> str:
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
              f"  GPU       {torch.cuda.get_device_name(0) if gpu else _no_gpu()}",
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
    lines += ["", "cpu"] + [f"  {k:22s} {v}" for k, v in _cpu_lines().items()]
    if kernels:
        lines += ["", "kernels (registers / spills / shared memory from ptxas, sm_80 and sm_90; cached under "
                      "build/kernel_report)"]
        try:
            from llmkern import kernel_report as kr
            rows = kr.triton_report() + kr.nvcc_report()
            lines.append(kr.format_report(rows) if all_configs else kr.format_summary(rows))
            bad = kr.spilling(rows)
            lines.append(f"{len(rows)} compiled variants, {len(bad)} spilling"
                         + ("" if all_configs else "; --all-configs lists every one"))
        except Exception as e:
            lines.append(f"  unavailable: {type(e).__name__}: {e}")
    return "\n".join(lines)


def _no_gpu() -> str:
    """CUDA's absence in info's own words (torch's own "No CUDA runtime is found" warning is not shown)."""
    if torch_cuda_built():
        return "none visible: CUDA kernels are compiled and checked statically (nvcc, ptxas), not run"
    return "none: this torch is a CPU-only build"


def torch_cuda_built() -> bool:
    import torch

    return torch.version.cuda is not None


EXAMPLES = """examples:
  llmkern info                      what was built, which backends run here and why the others do not
  llmkern info --kernels            registers / spills / shared memory per GPU kernel (from ptxas)
  llmkern bench ops --quick         the op benchmarks in seconds; ratios against PEFT and eager PyTorch
  llmkern bench all --out DIR       every benchmark, CSV/JSON/PNG under DIR
  llmkern bench ops --device cuda   on a GPU: the fused ops on Triton, with Liger-Kernel as a peer
  llmkern train --config FILE       any method on any layout from a YAML/JSON config (examples/configs/)
  llmkern train --resume RUN_DIR    continue a run from its newest checkpoint
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmkern", description=__doc__.splitlines()[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{info,bench,train}")
    p_info = sub.add_parser("info", help="versions, extensions, usable backends, CPU ISA")
    p_info.add_argument("--kernels", action="store_true",
                        help="also a per-kernel summary of registers, spills and shared memory for sm_80/sm_90 "
                             "(compiled once, then read from the cache under build/kernel_report)")
    p_info.add_argument("--all-configs", action="store_true",
                        help="with --kernels: one row per compiled configuration instead of one per kernel")
    sub.add_parser("bench", help="run the benchmarks against the peers; llmkern bench --help", add_help=False)
    sub.add_parser("train", help="train from a config file (llmkern train --config FILE --help)",
                   add_help=False)
    sub.add_parser("plan", help="a pipeline schedule's timeline, bubble and memory (llmkern plan --help); "
                   "--layout: a config's tp x pp x dp plan; --zero: ZeRO's bytes per rank", add_help=False)
    sub.add_parser("checkpoint", help="llmkern checkpoint consolidate DIR OUT: a ZeRO checkpoint as one "
                   "safetensors file", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        print(info(kernels=args.kernels, all_configs=args.all_configs))
        return 0
    if args.cmd == "bench":
        from llmkern import bench
        return bench.main(rest)
    if args.cmd == "train":
        from llmkern.train import runner
        if runner.is_config_run(rest):
            return runner.main(rest)
        from llmkern import demo  # the flag form: llmkern train --method lora --nproc 2 ...
        return demo.main(rest)
    if args.cmd == "checkpoint":
        from llmkern.parallel import checkpoint
        return checkpoint.main(rest)
    if args.cmd == "plan" and "--zero" in rest:
        from llmkern.parallel import memory
        return memory.main([a for a in rest if a != "--zero"])
    if args.cmd == "plan":
        from llmkern.parallel import plan
        return plan.main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
