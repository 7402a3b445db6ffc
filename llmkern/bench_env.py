"""What a benchmark result depends on besides the code: the CPU, the library versions and the load.

Used by the environment block of every benchmark results file (bench/_harness.py) and by
`llmkern info`. Nothing here imports a peer library: versions are read from package metadata, so
describing the environment never triggers DeepSpeed's JIT build or transformers' import time.
"""
from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

# The /proc/cpuinfo flags that change which kernels torch and llmkern run. The CPU model string alone
# does not tell them apart: "Intel(R) Xeon(R) Processor" names machines with and without avx512_bf16.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

# The packages whose version a benchmark row depends on: llmkern's own stack and the peers it is
# measured against. DeepSpeed is looked up in $LLMKERN_DEEPSPEED_PATH too (`make bench` installs it
# there, outside the test environment).
PACKAGES = ("llmkern", "torch", "triton", "numpy", "transformers", "peft", "accelerate", "deepspeed")


def cpu() -> dict:
    """{model, vendor, isa: [flags of ISA_FLAGS present], cores, torch_capability, torch_threads}."""
    model, vendor, flags = platform.processor() or platform.machine(), "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    info = {"model": model, "vendor": vendor, "isa": [f for f in ISA_FLAGS if f in flags],
            "cores": os.cpu_count()}
    try:
        import torch

        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def versions() -> dict[str, str | None]:
    """{package: version or None when not installed} for PACKAGES, read from installed metadata."""
    out: dict[str, str | None] = {}
    extra = os.environ.get("LLMKERN_DEEPSPEED_PATH")
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
        if out[name] is None and name == "deepspeed" and extra:
            found = [d.version for d in metadata.distributions(path=[extra]) if d.metadata["Name"] == name]
            out[name] = found[0] if found else None
    return out


def _proc_stat() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def load(sample_seconds: float = 0.5) -> dict:
    """How busy the machine is: the load averages and, over `sample_seconds`, the share of all CPUs
    that was busy (any process, this one included), stolen by the hypervisor, and idle."""
    out: dict = {}
    try:
        out["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        out["loadavg"] = None
    a = _proc_stat()
    if a is None or sample_seconds <= 0:
        return out
    time.sleep(sample_seconds)
    b = _proc_stat()
    d = [y - x for x, y in zip(a, b)]  # user nice system idle iowait irq softirq steal
    total = sum(d) or 1
    out["busy_share"] = round((total - d[3] - d[4]) / total, 3)
    out["steal_share"] = round(d[7] / total, 3)
    out["idle_share"] = round((d[3] + d[4]) / total, 3)
    out["sample_seconds"] = sample_seconds
    return out


def git_commit(root: Path) -> str | None:
    """HEAD of the checkout at `root` (+dirty when tracked files changed), or None outside one."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
