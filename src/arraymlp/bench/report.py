"""Reporting a run: the terminal table, the CPU/GPU crossover, the plot and JSON.

:func:`format_table` lays out one block per case and one row per candidate;
:func:`crossover_batch` finds the batch from which the GPU stays ahead of the CPU;
:func:`plot_throughput` draws throughput against batch size. Results are written as
JSON with the encoder's fallback for NumPy scalars.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy

from .workloads import TARGETS

__all__ = ["SPREAD_LIMIT", "crossover_batch", "format_table", "plot_throughput", "ratio_legend", "spread_warnings"]

#: Relative spread (interquartile range / median) above which a case's ratios are flagged.
SPREAD_LIMIT = 0.2


def _fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_rate(r: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            return f"{r / scale:.3g}{unit}"
    return f"{r:.3g}"


def ratio_legend(cases: Sequence[dict[str, Any]]) -> list[str]:
    """What the ratio columns of :func:`format_table` mean, one line per column present.

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`.

    Returns
    -------
    list of str
        Empty when no case has a candidate.
    """
    peers: list[str] = []
    for case in cases:
        for r in case["candidates"]:
            if r["role"] == "peer" and r["name"] not in peers:
                peers.append(r["name"])
    if not any(case["candidates"] for case in cases):
        return []
    out = ["ratio columns: the row's median time divided by another's, in the same case; "
           "below 1 is faster, above 1 slower",
           "  x floor: / the row's GEMM floor (the step's matrix products alone, in the row's own library)"]
    out += [f"  x {name}: / the median of {name} doing the same work" for name in peers]
    return out


def spread_warnings(cases: Sequence[dict[str, Any]], limit: float = SPREAD_LIMIT) -> list[str]:
    """One warning per candidate whose relative spread exceeds ``limit``.

    The relative spread is ``(q3 - q1) / median``; above ``limit`` the ratios of that
    case depend on which rounds the machine was busy in.

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`.
    limit : float
        Largest relative spread taken as reliable.

    Returns
    -------
    list of str
    """
    out = []
    for case in cases:
        for r in case["candidates"]:
            median = r["median"]
            rel = (r["q3"] - r["q1"]) / median if median > 0 else math.inf
            if rel > limit:
                out.append(f"warning: {case['workload']} batch {case['batch']} {case['dtype']}: {r['name']} spread "
                           f"(IQR / median) {rel:.2f} > {limit:.2f}, so this case's ratios are unreliable; "
                           "rerun with --threads 1 or on a quieter machine")
    return out


def format_table(cases: Sequence[dict[str, Any]], *, spread_limit: float = SPREAD_LIMIT) -> str:
    """The terminal table of a run: one block per case, one row per candidate.

    Columns: median time, spread (interquartile range, first to third quartile),
    throughput (samples/s), and the ratio of the median to the candidate's GEMM floor
    (``x floor``) and to each peer (``x torch[cpu]``, ``x sklearn`` ...): time ratios,
    below 1 is faster. The table ends with a legend of those columns and a warning for
    each candidate whose spread exceeds ``spread_limit`` times its median.

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`.
    spread_limit : float
        See :func:`spread_warnings`.

    Returns
    -------
    str
    """
    lines: list[str] = []
    for case in cases:
        rows = case["candidates"]
        if not rows:
            continue
        refs = ["floor"] + [r["name"] for r in rows if r["role"] == "peer"]
        head = (f"{case['workload']}  {case['title']}  {case['arch']}  batch {case['batch']}  "
                f"{case['dtype']}  [{case['device']}]")
        lines.append(head)
        width = max(len("candidate"), *(len(r["name"]) for r in rows))
        cols = [f"{'candidate':<{width}}", f"{'median':>11}", f"{'spread (IQR)':>23}", f"{'samples/s':>10}"]
        cols += [f"{'x ' + ref:>{max(8, len(ref) + 2)}}" for ref in refs]
        lines.append("  " + "  ".join(cols))
        for r in rows:
            ratio = case["ratios"].get(r["name"], {})
            spread = f"{_fmt_time(r['q1'])} - {_fmt_time(r['q3'])}"
            cells = [f"{r['name']:<{width}}", f"{_fmt_time(r['median']):>11}", f"{spread:>23}",
                     f"{_fmt_rate(r['samples_per_s']):>10}"]
            for ref in refs:
                w = max(8, len(ref) + 2)
                cells.append(f"{ratio[ref]:>{w}.3f}" if ref in ratio else f"{'-':>{w}}")
            lines.append("  " + "  ".join(cells))
        lines.append("")
    lines += ratio_legend(cases)
    lines += spread_warnings(cases, spread_limit)
    return "\n".join(lines)


def crossover_batch(cpu: dict[int, float], gpu: dict[int, float]) -> int | None:
    """Smallest batch from which the GPU's throughput stays above the CPU's.

    Parameters
    ----------
    cpu, gpu : dict of batch -> samples/s

    Returns
    -------
    int or None
        ``None`` when the GPU never overtakes (or there is no common batch).
    """
    common = sorted(set(cpu) & set(gpu))
    best = None
    for b in reversed(common):
        if gpu[b] > cpu[b]:
            best = b
        else:
            break
    return best


def _crossovers(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and dtype swept over several batches: the CPU/GPU crossover."""
    out: dict[str, Any] = {}
    lines: dict[tuple[str, str, str], dict[int, float]] = {}
    for case in cases:
        for r in case["candidates"]:
            if r["role"] != "ours":
                continue
            lines.setdefault((case["workload"], case["dtype"], r["target"]), {})[case["batch"]] = r["samples_per_s"]
    keys = {(w, d) for (w, d, _) in lines}
    for w, d in sorted(keys):
        cpu = [t for (w2, d2, t) in lines if (w2, d2) == (w, d) and not TARGETS[t].gpu]
        gpu = [t for (w2, d2, t) in lines if (w2, d2) == (w, d) and TARGETS[t].gpu]
        if not cpu or not gpu or len(lines[(w, d, cpu[0])]) < 2:
            continue
        c, g = cpu[0], gpu[0]
        out.setdefault(w, {})[d] = {"cpu": c, "gpu": g,
                                    "batch": crossover_batch(lines[(w, d, c)], lines[(w, d, g)])}
    return out


def plot_throughput(cases: Sequence[dict[str, Any]], path: str, *, title: str | None = None) -> str:
    """Write a PNG of throughput (samples/s) against batch size, one line per candidate.

    CPU candidates are drawn in blue tones, GPU ones in red; arraymlp solid, GEMM
    floors dotted, peers dashed. Both axes are logarithmic. Uses matplotlib's Agg
    canvas directly (no global backend switch).

    Parameters
    ----------
    cases : sequence of dict
        As returned by :func:`run_case`; the training-step cases of the workload with
        the most batch sizes are drawn (all cases when none has several).
    path : str
    title : str, optional

    Returns
    -------
    str
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts: dict[tuple[str, str], set[int]] = {}
    for c in cases:
        counts.setdefault((c["workload"], c["dtype"]), set()).add(c["batch"])
    if not counts:
        msg = "nothing to plot: no cases"
        raise ValueError(msg)
    wl, dt = max(counts, key=lambda k: (len(counts[k]), k[0] == "W5"))
    chosen = [c for c in cases if (c["workload"], c["dtype"]) == (wl, dt)]
    series: dict[tuple[str, str, str], dict[int, float]] = {}
    for c in chosen:
        for r in c["candidates"]:
            series.setdefault((r["name"], r["role"], c["device"]), {})[c["batch"]] = r["samples_per_s"]
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cpu_colors = iter(["#1f4e9c", "#4a90d9", "#7fb3e6", "#0b2a5c", "#9cc7f0", "#3d6fb5"])
    gpu_colors = iter(["#b8262b", "#e0605f", "#f09a8f", "#7a1114", "#f5b7ae", "#c9473f"])
    styles = {"ours": "-", "floor": ":", "peer": "--"}
    for (name, role, device), pts in sorted(series.items(), key=lambda kv: (kv[0][2], kv[0][1] != "ours", kv[0][0])):
        xs = sorted(pts)
        color = next(gpu_colors if device == "gpu" else cpu_colors, None)
        ax.plot(xs, [pts[b] for b in xs], styles.get(role, "-"), marker="o", markersize=3, color=color,
                label=f"{name} ({device})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    arch = chosen[0]["arch"]
    ax.set_title(title or f"{wl}: {chosen[0]['title']} ({arch}, {dt})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (numpy.integer,)):
        return int(o)
    if isinstance(o, (numpy.floating,)):
        return float(o)
    return str(o)
