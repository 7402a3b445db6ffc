"""Static GPU checks without a GPU: registers, spills and shared memory of every shipped kernel.

- triton_report(): AOT-compiles every entry of every llmkern.triton_kernels module's AOT_CONFIGS for
  sm_80 and sm_90 (triton.compile on ASTSource, no driver needed) and parses the ptxas -v log that
  Triton prints when knobs.nvidia.dump_ptxas_log is set. CompiledKernel.n_regs/n_spills exist only
  after a driver loads the binary, so they cannot be used here.
- nvcc_report(): compiles every csrc/**/*.cu with nvcc -Xptxas -v for sm_80 and sm_90 and parses
  the per-kernel lines.

Both cache their rows under build/kernel_report/, keyed by a hash of the sources, flags and compiler
version: one .cu with torch headers takes about a minute on 2 cores. A row is
{kernel, config, arch, registers, spill_stores, spill_loads, shared_bytes}.

By default one summary line per kernel (register range, worst spill, largest shared memory);
--all-configs lists every compiled configuration.

    python -m llmkern.kernel_report [--no-triton] [--no-nvcc] [--no-cache] [--all-configs] [sources.cu ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ARCHS = (80, 90)
FIELDS = ("kernel", "config", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes")

_ROOT = Path(__file__).resolve().parent.parent  # the source tree (or site-packages when installed)
_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def _cache_dir() -> Path:
    d = Path(os.environ.get("LLMKERN_KERNEL_REPORT_CACHE", ""))
    if not str(d) or str(d) == ".":
        d = _ROOT / "build" / "kernel_report" if (_ROOT / "setup.py").exists() else (
            Path.home() / ".cache" / "llmkern" / "kernel_report")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cached(kind: str, key: str, compute, use_cache: bool):
    path = _cache_path(kind, key)
    if use_cache and path.exists():
        return json.loads(path.read_text())
    rows = compute()
    _write_json(path, rows)
    return rows


def parse_ptxas_log(log: str) -> list[dict]:
    """Per entry function and arch: registers, spill bytes and static shared memory from `ptxas -v`."""
    props: dict[tuple[str, str], tuple[int, int]] = {}
    entries: list[dict] = []
    current = None
    arch = None
    pending_props = None
    for line in log.splitlines():
        if m := _RE_ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "shared_bytes": 0}
            arch = m.group(2)
            entries.append(current)
        elif m := _RE_PROPS.search(line):
            pending_props = m.group(1)
        elif (m := _RE_SPILL.search(line)) and pending_props is not None:
            props[(pending_props, arch)] = (int(m.group(2)), int(m.group(3)))
            pending_props = None
        elif (m := _RE_USED.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
            if s := _RE_SMEM.search(line):
                current["shared_bytes"] = int(s.group(1))
    for e in entries:
        e["spill_stores"], e["spill_loads"] = props.get((e["kernel"], e["arch"]), (0, 0))
    return entries


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------
def _triton_modules():
    import llmkern.triton_kernels as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{pkg.__name__}.{info.name}")


def _unpack(cfg):
    """An AOT_CONFIGS entry, as (kernel, signature, constexprs, num_warps, num_stages, attrs, name).

    An entry is an object with those fields (attrs and name optional) or a
    (kernel, signature, constexprs, num_warps, num_stages) tuple.
    """
    if isinstance(cfg, tuple):
        kernel, signature, constexprs, num_warps, num_stages = cfg
        attrs, name = {}, None
    else:
        kernel, signature, constexprs = cfg.kernel, cfg.signature, cfg.constexprs
        num_warps, num_stages = cfg.num_warps, cfg.num_stages
        attrs, name = getattr(cfg, "attrs", {}) or {}, getattr(cfg, "name", None)
    if name is None:
        name = ",".join(f"{k}={v}" for k, v in constexprs.items()) + f",w{num_warps},s{num_stages}"
    return kernel, signature, constexprs, num_warps, num_stages, attrs, name


def compile_triton(kernel, signature, constexprs, num_warps, num_stages, arch: int, attrs=None) -> dict:
    """AOT-compiles one specialization for sm_<arch>; returns {arch, registers, spill_*, shared_bytes}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # always_compile: a cache hit would skip ptxas and print no log.
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs or {}),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    entries = parse_ptxas_log(buf.getvalue())
    if len(entries) != 1 or entries[0]["registers"] is None:
        raise RuntimeError(f"could not parse the ptxas log of {kernel.__name__} for sm_{arch}:\n"
                           f"{buf.getvalue()}")
    row = {k: entries[0][k] for k in ("arch", "registers", "spill_stores", "spill_loads", "shared_bytes")}
    # Triton's shared memory is dynamic, so ptxas reports 0 smem; the compiler's metadata has it.
    row["shared_bytes"] = max(row["shared_bytes"], int(compiled.metadata.shared))
    return row


def _compile_entry(module_name: str, index: int, arch: int) -> dict:
    """Worker: compiles entry `index` of module_name.AOT_CONFIGS (picklable by name)."""
    cfg = importlib.import_module(module_name).AOT_CONFIGS[index]
    kernel, signature, constexprs, warps, stages, attrs, _ = _unpack(cfg)
    return compile_triton(kernel, signature, constexprs, warps, stages, arch, attrs)


def _cache_path(kind: str, key: str) -> Path:
    return _cache_dir() / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # atomic: parallel runs never read half a file


def _triton_module_rows(module, archs, use_cache: bool, jobs: int) -> list[dict]:
    import triton

    work = []  # (row template, cache path, index, arch)
    for index, cfg in enumerate(getattr(module, "AOT_CONFIGS", [])):
        kernel, signature, constexprs, warps, stages, attrs, name = _unpack(cfg)
        for arch in archs:
            # JITFunction.cache_key hashes the kernel's source and every @triton.jit function it calls,
            # so comments and launchers can change without a recompile.
            key = "|".join([triton.__version__, kernel.cache_key, kernel.__name__,
                            json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
                            repr(sorted(attrs.items())), str(warps), str(stages), str(arch)])
            template = {"kernel": kernel.__name__, "config": name}
            work.append((template, _cache_path("triton", key), index, arch))
    todo = [w for w in work if not (use_cache and w[1].exists())]
    if todo:
        # Compiles are independent and mostly single-threaded (MLIR passes, then ptxas): one per core.
        if jobs > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                results = list(pool.map(_compile_entry, [module.__name__] * len(todo), [w[2] for w in todo],
                                        [w[3] for w in todo]))
        else:
            results = [_compile_entry(module.__name__, w[2], w[3]) for w in todo]
        for w, row in zip(todo, results):
            _write_json(w[1], row)
    rows = []
    for template, path, _, _ in work:
        row = json.loads(path.read_text())
        rows.append({**template, **{k: row[k] for k in FIELDS if k in row}})
    return rows


def triton_report(modules=None, archs=ARCHS, use_cache: bool = True, jobs: int | None = None) -> list[dict]:
    """Rows for every AOT_CONFIGS entry of every llmkern.triton_kernels module (or `modules`), per arch.

    A cold run compiles each entry for each arch (0.5-5 s each, `jobs` processes at once); later runs
    read build/kernel_report/ until the kernel's source (JITFunction.cache_key), the entry or triton's
    version changes.
    """
    jobs = jobs or os.cpu_count() or 1
    modules = list(modules if modules is not None else _triton_modules())
    if _interpreted(modules):
        # Imported under TRITON_INTERPRET=1 (as the op tests do), @triton.jit gives InterpretedFunctions,
        # which triton.compile cannot take: redo the report in a fresh process with the interpreter off.
        ctx = multiprocessing.get_context("spawn")
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                return pool.submit(_triton_report_by_name, [m.__name__ for m in modules], archs, use_cache,
                                   jobs).result()
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
    rows = []
    for module in modules:
        rows += _triton_module_rows(module, archs, use_cache, jobs)
    return rows


def _triton_report_by_name(names, archs, use_cache, jobs):
    return triton_report([importlib.import_module(n) for n in names], archs, use_cache, jobs)


def _interpreted(modules) -> bool:
    from triton.runtime.jit import JITFunction

    kernels = [_unpack(cfg)[0] for m in modules for cfg in getattr(m, "AOT_CONFIGS", [])]
    return any(not isinstance(k, JITFunction) for k in kernels)


# --------------------------------------------------------------------------------------------------
# nvcc
# --------------------------------------------------------------------------------------------------
def _site_include(name: str) -> list[str]:
    for site in sys.path:
        d = Path(site) / "nvidia" / name / "include"
        if d.is_dir():
            return [str(d)]
    return []


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the "No CUDA runtime is found" warning it logs on a
    machine without a GPU: that is the expected case here, and `llmkern info` says it in its own words."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def nvcc_flags(archs=ARCHS) -> list[str]:
    """The flags nvcc_report compiles with (include paths included)."""
    cpp_extension = _cpp_extension()

    flags = ["-std=c++20", "-O3", "-Xptxas", "-v"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    includes = [str(_ROOT / "csrc" / "include")]
    try:
        includes += cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        includes += cpp_extension.include_paths(cuda=True)
    includes += [sysconfig.get_paths()["include"]] + _site_include("cu13") + _site_include("nccl")
    flags += [f"-I{d}" for d in includes]
    flags += ["-DLLMKERN_NS=llmkern", "-DLLMKERN_DEVICE_KEY=CUDA"]
    return flags


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = os.environ.get("CUDA_HOME")
        if home and (Path(home) / "bin" / "nvcc").exists():
            nvcc = str(Path(home) / "bin" / "nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in $CUDA_HOME/bin")
    return nvcc


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    proc = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _source_key(source: Path, flags: list[str], nvcc_version: str) -> str:
    h = hashlib.sha256(source.read_bytes())
    # Local headers can change the kernels: hash every file under csrc/include and next to the source.
    for d in sorted({_ROOT / "csrc" / "include", source.parent}):
        for f in sorted(glob.glob(str(d / "**" / "*"), recursive=True)):
            if os.path.isfile(f) and f.endswith((".h", ".cuh", ".hpp", ".inc")):
                h.update(f.encode())
                h.update(Path(f).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(nvcc_version.encode())
    return h.hexdigest()


def compile_nvcc(source: Path, flags: list[str]) -> list[dict]:
    """Compiles one .cu and returns its per-kernel rows (demangled names)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [_nvcc(), *flags, "-c", str(source), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                           f"command: {' '.join(cmd)}")
    entries = parse_ptxas_log(proc.stdout + "\n" + proc.stderr)
    names = _demangle(sorted({e["kernel"] for e in entries}))
    rel = os.path.relpath(source, _ROOT) if str(source).startswith(str(_ROOT)) else str(source)
    return [{"kernel": names[e["kernel"]], "config": rel, "arch": e["arch"], "registers": e["registers"],
             "spill_stores": e["spill_stores"], "spill_loads": e["spill_loads"],
             "shared_bytes": e["shared_bytes"]} for e in entries]


def nvcc_report(sources=None, archs=ARCHS, use_cache: bool = True, jobs: int | None = None) -> list[dict]:
    """Rows for every kernel of every csrc/**/*.cu (or `sources`), for sm_80 and sm_90."""
    if sources is None:
        sources = sorted(glob.glob(str(_ROOT / "csrc" / "**" / "*.cu"), recursive=True))
    sources = [Path(s).resolve() for s in sources]
    if not sources:
        return []
    flags = nvcc_flags(archs)
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout

    def one(src: Path):
        return _cached("nvcc", _source_key(src, flags, version), lambda: compile_nvcc(src, flags), use_cache)

    jobs = jobs or min(len(sources), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # nvcc runs in subprocesses
        return [row for rows in pool.map(one, sources) for row in rows]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def spilling(rows: list[dict]) -> list[dict]:
    """The rows that spill registers to local memory."""
    return [r for r in rows if r["spill_stores"] or r["spill_loads"]]


def short_name(kernel: str) -> str:
    """`void llmkern::ops::detail::lora_fwd_kernel<float, 64>(const float*, ...)` -> `lora_fwd_kernel`."""
    depth, out = 0, []
    for ch in kernel:  # drop template arguments and the parameter list, however nested
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).split()[-1].split("::")[-1] if "".join(out).split() else kernel


def summarize(rows: list[dict]) -> list[dict]:
    """One row per kernel (its short name and where it comes from): how many compiled variants, the
    register range, the worst spill (bytes stored + loaded) and the largest shared memory."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        # nvcc rows carry the .cu path as config; Triton rows a constexpr list: the kernel is its own key.
        source = r["config"] if str(r["config"]).endswith(".cu") else "triton"
        groups.setdefault((short_name(r["kernel"]), source), []).append(r)
    out = []
    for (name, source), rs in groups.items():
        regs = [r["registers"] for r in rs if r["registers"] is not None]
        out.append({"kernel": name, "source": source, "variants": len(rs),
                    "archs": ",".join(sorted({str(r["arch"]).replace("sm_", "") for r in rs})),
                    "registers": f"{min(regs)}-{max(regs)}" if regs else "?",
                    "worst_spill": max(r["spill_stores"] + r["spill_loads"] for r in rs),
                    "max_shared_bytes": max(r["shared_bytes"] for r in rs)})
    return sorted(out, key=lambda r: (r["source"], r["kernel"]))


def format_summary(rows: list[dict]) -> str:
    """A Markdown table of summarize(rows): one line per kernel."""
    head = ["kernel", "source", "variants", "sm", "registers", "worst spill B", "max smem B"]
    keys = ["kernel", "source", "variants", "archs", "registers", "worst_spill", "max_shared_bytes"]
    return _markdown(head, [[str(r[k]) for k in keys] for r in summarize(rows)])


def format_report(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    head = ["kernel", "config", "arch", "regs", "spill st", "spill ld", "smem B"]
    return _markdown(head, [[str(r[f]) for f in FIELDS] for r in rows])


def _markdown(head: list[str], body: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", help=".cu files (default: csrc/**/*.cu)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-nvcc", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--all-configs", action="store_true",
                    help="one row per compiled configuration and arch (default: one row per kernel)")
    args = ap.parse_args(argv)
    rows = []
    if not args.no_triton:
        rows += triton_report(use_cache=not args.no_cache)
    if not args.no_nvcc:
        rows += nvcc_report(args.sources or None, use_cache=not args.no_cache)
    print(format_report(rows) if args.all_configs else format_summary(rows))
    bad = spilling(rows)
    if bad:
        print(f"\n{len(bad)} kernel(s) spill registers:\n" + format_report(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
