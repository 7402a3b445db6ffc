"""PNG plots of a ``llmkern bench`` run, drawn with matplotlib from the results documents.

Every plot reads the JSON documents that bench/_harness.write_results wrote (``{"name", "suite",
"env", "rows", "ratios"}``; ``suite`` is added by the runner), never the scripts themselves:

- ``ratios_<suite>.png``: one bar per Ratio of the suite, its min..max over rounds as an error bar,
  its goal as a black tick, green when met, red when missed, grey without a goal;
- one scaling plot per benchmark family, registered below with :func:`scaling_plot`.

The hook for a new scaling plot: write a function that takes the documents whose name starts with a
prefix and the output folder, draws one figure and returns its path (or None when the documents
lack what it needs), and register it for the prefix, e.g. for ``bench/parallel/bench_zero.py``
writing ``zero_w2.json`` with rows ``{"stage", "bytes_per_rank", ...}``::

    @scaling_plot("zero")
    def zero_bytes_per_stage(docs, out):
        fig, ax = new_figure("ZeRO: bytes per rank vs stage")
        ...
        return save(fig, out / "zero_bytes_per_stage.png")

The pipeline's step time vs micro-batches against the bubble prediction is ``pipeline_step_time``.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

ScalingPlot = Callable[[list[dict], Path], "Path | None"]
SCALING_PLOTS: dict[str, ScalingPlot] = {}
"""{results-name prefix: plot function}; see the module docstring."""

_COLOURS = {True: "#2a9d3f", False: "#d1495b", None: "#8d99ae"}


def scaling_plot(prefix: str) -> Callable[[ScalingPlot], ScalingPlot]:
    """Registers `fn` for the results documents whose name starts with `prefix`."""
    def register(fn: ScalingPlot) -> ScalingPlot:
        if prefix in SCALING_PLOTS:
            raise ValueError(f"a scaling plot is already registered for {prefix!r}: {SCALING_PLOTS[prefix].__name__}")
        SCALING_PLOTS[prefix] = fn
        return fn
    return register


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on these machines, none needed
    import matplotlib.pyplot as plt
    return plt


def new_figure(title: str, width: float = 9.0, height: float = 5.0):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return fig, ax


def save(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Writes `fig` to `path` and closes it; `rect` (left, bottom, right, top as figure fractions) is
    the area the axes are laid out in, leaving the rest for a figure legend or notes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _cpu_text(docs: list[dict]) -> str:
    cpu = next((d["env"]["cpu"] for d in docs if isinstance(d.get("env", {}).get("cpu"), dict)), None)
    if not cpu:
        return ""
    isa = [f for f in cpu.get("isa", []) if f.startswith(("avx512", "amx"))] or cpu.get("isa", [])[-2:]
    return f"{cpu.get('model', '?')} ({', '.join(isa)})"


def ratio_bars(suite: str, docs: list[dict], out: Path) -> Path | None:
    """One horizontal bar per ratio of the suite's documents, drawn from parity (1.0) to the value on
    a log axis, so that 2x better and 2x worse are the same length; a value <= 0 (an overhead
    fraction can be negative when llmkern is within noise of the base) is drawn at the left edge."""
    items = [(d["name"].removesuffix("_quick"), r) for d in docs for r in d.get("ratios", [])]
    if not items:
        return None
    values = [v for _, r in items for v in (r["value"], r.get("lo"), r.get("hi"), r.get("goal")) if v and v > 0]
    left, right = min(values + [1.0]) / 1.5, max(values + [1.0]) * 1.5
    labels = [textwrap.fill(f"{bench}: {r['name']} ({'↑' if r.get('higher_is_better', True) else '↓'} better)", 56)
              for bench, r in items]
    fig, ax = new_figure(f"llmkern vs peers measured in the same run: {suite} suite",
                         width=12, height=1.8 + 0.22 * sum(label.count("\n") + 1 for label in labels) + 0.1 * len(items))
    ys = list(range(len(items)))[::-1]
    for y, (_, r) in zip(ys, items):
        colour = _COLOURS[None if r.get("goal") is None else bool(r.get("met"))]
        v = r["value"] if r["value"] > 0 else left
        ax.barh(y, v - 1.0, left=1.0, color=colour, height=0.7)
        if r.get("lo") is not None and r["lo"] > 0:
            ax.plot([r["lo"], r["hi"]], [y, y], color="black", linewidth=0.9)
        if r.get("goal") is not None:
            ax.plot([r["goal"]], [y], marker="|", color="black", markersize=13, markeredgewidth=2.2)
        ax.annotate(f"{r['value']:.3g}", (v, y), xytext=(4 if v >= 1 else -4, -3), textcoords="offset points",
                    fontsize=7, ha="left" if v >= 1 else "right")
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio, log scale (bar from parity 1.0 to the median over rounds; line: min..max over rounds; "
                  "tick: goal)\ngreen: goal met; red: goal missed; grey: no goal", fontsize=8)
    fig.text(0.01, 0.005, _cpu_text(docs), fontsize=7, color="#555555")
    return save(fig, out / f"ratios_{suite}.png")


@scaling_plot("ring_all_reduce")
def ring_bandwidth(docs: list[dict], out: Path) -> Path | None:
    """Bus bandwidth against message size, one line per (collective, ranks), from rows with
    ``candidate`` (or ``op``), ``world``, ``mib`` and ``busbw_gbs``."""
    lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for d in docs:
        for row in d.get("rows", []):
            what = row.get("candidate") or row.get("op")
            if what is None or row.get("world") is None or row.get("mib") is None or row.get("busbw_gbs") is None:
                continue
            lines.setdefault((what, int(row["world"])), []).append((float(row["mib"]), float(row["busbw_gbs"])))
    if not lines:
        return None
    fig, ax = new_figure("ring all-reduce bus bandwidth vs message size and ranks (gloo, CPU)")
    names = sorted({k[0] for k in lines})
    worlds = sorted({k[1] for k in lines})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    for (what, world), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[worlds.index(world) % len(styles)],
                marker=markers[names.index(what) % len(markers)], color=f"C{names.index(what)}",
                label=f"{what}, {world} ranks")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("message size (MiB); line style: ranks\n" + _cpu_text(docs), fontsize=9)
    ax.set_ylabel("bus bandwidth (GB/s)\nall-reduce: 2(n-1)/n x bytes / time; sendrecv: bytes / time", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, out / "ring_bandwidth.png")


@scaling_plot("zero")
def zero_bytes_per_stage(docs: list[dict], out: Path) -> Path | None:
    """Model-state bytes per rank of each variant of bench/parallel/bench_zero.py, stacked by kind
    (parameters, gradients, optimizer states on the device, states on the host), one bar per
    candidate, from rows with ``candidate`` and ``params_bytes`` / ``grads_bytes`` / ``optim_bytes``."""
    rows = [r for d in docs for r in d.get("rows", []) if r.get("params_bytes") is not None]
    if not rows:
        return None
    fig, ax = new_figure(f"ZeRO: model-state bytes per rank vs stage ({rows[0].get('mode', '')})")
    names = [r["candidate"] for r in rows]
    left = [0.0] * len(rows)
    for key, label in (("params_bytes", "parameters"), ("grads_bytes", "gradients"),
                       ("optim_bytes", "optimizer states"), ("host_bytes", "host (offload)")):
        vals = [(r.get(key) or 0) / 2**20 for r in rows]
        ax.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("MiB per rank\n" + _cpu_text(docs), fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, out / "zero_bytes_per_stage.png")


@scaling_plot("pipeline")
def pipeline_step_time(docs: list[dict], out: Path) -> Path | None:
    """Step time against micro-batches m of bench/parallel/bench_pipeline.py's calibrated stages, one
    panel per pipeline size p: per schedule, llmkern's measured median (solid, markers) and the
    timing model's prediction of that schedule (dashed: schedules.simulate, which is (m + p - 1)(t_f
    + t_b) for gpipe and 1f1b), with torch.distributed.pipelining's measured time (dotted, faint)
    where it ran, and the bubble-free m(t_f + t_b) (grey). Reads the rows with ``op`` ==
    "pipeline_calibrated" and ``candidate``, ``schedule``, ``world``, ``microbatches``,
    ``median_ms``, ``predicted_ms`` and ``no_bubble_ms``."""
    need = ("candidate", "schedule", "world", "microbatches", "median_ms", "predicted_ms", "no_bubble_ms")
    rows = [r for d in docs for r in d.get("rows", [])
            if r.get("op") == "pipeline_calibrated" and all(r.get(k) is not None for k in need)]
    if not rows:
        return None
    worlds = sorted({int(r["world"]) for r in rows})
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    costs = sorted({(r.get("t_f_ms"), r.get("t_b_ms")) for r in rows}, key=str)
    cost_text = "; ".join(f"t_f = {f:g} ms, t_b = {b:g} ms" for f, b in costs if f is not None and b is not None)
    plt = _pyplot()
    from matplotlib.lines import Line2D

    # top: the step time itself; bottom: per micro-batch, where the bubble's share, (p - 1)/m of the
    # bubble-free time for gpipe and 1f1b, shows as the gap above the flat t_f + t_b line (at 40/80 ms
    # stages the top panel's lines lie within 7 % of each other and overlap)
    fig, axes = plt.subplots(2, len(worlds), figsize=(max(11.0, 5.5 * len(worlds)), 9.5), squeeze=False)
    fig.suptitle("Pipeline step time vs micro-batches m against the bubble prediction, per schedule, "
                 f"{' and '.join(f'p = {w}' for w in worlds)} stages\n"
                 f"calibrated stages: {cost_text or 't_f, t_b'} per stage (sleeps: the timing model's costs)",
                 fontsize=10)
    styles = {"llmkern": dict(linestyle="-", marker="o"), "torch": dict(linestyle=":", marker="x", alpha=0.6),
              "predicted": dict(linestyle="--", marker="_", markersize=12, linewidth=1.0)}
    for col, world in enumerate(worlds):
        mine = [r for r in rows if int(r["world"]) == world]
        for row, per_mb in enumerate((False, True)):
            ax = axes[row][col]
            ax.grid(True, alpha=0.3)

            def y(r, key, per_mb=per_mb):
                return float(r[key]) / (int(r["microbatches"]) if per_mb else 1)

            ideal = sorted({(int(r["microbatches"]), y(r, "no_bubble_ms")) for r in mine})
            ax.plot([x for x, _ in ideal], [v for _, v in ideal], color="#aaaaaa", linewidth=1.0, marker="_",
                    markersize=12)
            for i, schedule in enumerate(schedules):
                picked = [r for r in mine if r["schedule"] == schedule]
                lines = {"llmkern": sorted((int(r["microbatches"]), y(r, "median_ms")) for r in picked
                                           if r["candidate"].startswith("llmkern")),
                         "torch": sorted((int(r["microbatches"]), y(r, "median_ms")) for r in picked
                                         if r["candidate"].startswith("torch")),
                         "predicted": sorted({(int(r["microbatches"]), y(r, "predicted_ms")) for r in picked})}
                for who, pts in lines.items():
                    if pts:
                        ax.plot([x for x, _ in pts], [v for _, v in pts], color=f"C{i}", **styles[who])
            ax.set_xticks(sorted({x for x, _ in ideal}))
            if per_mb:
                ax.set_title(f"p = {world}: step time per micro-batch", fontsize=10)
                ax.set_xlabel("micro-batches m per step", fontsize=9)
                ax.set_ylabel("step time / m (ms)", fontsize=9)
            else:
                ax.set_title(f"p = {world}: step time", fontsize=10)
                ax.set_ylabel("step time (ms): slowest rank, median over steps", fontsize=9)
                ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=f"C{i}", linewidth=3) for i in range(len(schedules))]
    handles += [Line2D([], [], color="black", **styles[k]) for k in styles]
    handles.append(Line2D([], [], color="#aaaaaa", linewidth=1.0))
    labels = list(schedules) + ["llmkern, measured", "torch.distributed.pipelining, measured",
                                "predicted: schedules.simulate ((m + p - 1)(t_f + t_b) for gpipe, 1f1b)",
                                "no bubble: m(t_f + t_b)"]
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.015), ncol=3, fontsize=8, frameon=False,
               handlelength=3.5)
    fig.text(0.01, 0.005, _cpu_text(docs), fontsize=7, color="#555555")
    return save(fig, out / "pipeline_step_time.png", rect=(0, 0.08, 1, 1))


def make_plots(docs: list[dict], out: Path) -> list[Path]:
    """Every plot the documents support: ratio bars per suite, then the registered scaling plots."""
    made = []
    by_suite: dict[str, list[dict]] = {}
    for d in docs:
        by_suite.setdefault(d.get("suite", "other"), []).append(d)
    for suite, suite_docs in by_suite.items():
        made.append(ratio_bars(suite, suite_docs, out))
    for prefix, fn in SCALING_PLOTS.items():
        selected = [d for d in docs if d.get("name", "").startswith(prefix)]
        if selected:
            made.append(fn(selected, out))
    return [p for p in made if p is not None]
