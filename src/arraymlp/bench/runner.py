"""Running the benchmark: its cases, a whole run, and the ``bench`` command.

:func:`run_case` builds every candidate of one (workload, batch, dtype, device) case
and times them side by side; :func:`run` runs the cases of the requested workloads on
the requested targets and adds the environment and the memory measurement;
:func:`main` is ``python -m arraymlp bench``: it checks the options, runs, prints the
table and writes the JSON file and the plot.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from .candidates import (
    Candidate,
    make_arraymlp,
    make_gemm_floor,
    make_sklearn,
    make_torch,
)
from .machine import environment
from .memory import measure_memory
from .report import _crossovers, _json_default, format_table, plot_throughput
from .timing import compute_ratios, interleaved, limit_threads, summarize
from .workloads import (
    TARGETS,
    WORKLOADS,
    Target,
    Workload,
    _has,
    _torch_cuda,
    available_targets,
)

__all__ = ["SWITCH_TIME", "main", "run", "run_case"]


def _gpu_device_group(targets: Iterable[Target]) -> dict[bool, list[Target]]:
    groups: dict[bool, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.gpu, []).append(t)
    return groups


def _build_candidates(workload: Workload, batch: int, dtype: str, targets: list[Target], gpu: bool,
                      peers: bool, errors: list[str]) -> list[Candidate]:
    cands: list[Candidate] = []

    def add(name, role, tgt, builder):
        try:
            fn = builder()
            fn()  # a first call here: a candidate that cannot run is skipped, not fatal
            cands.append(Candidate(name, role, tgt, fn))
        except Exception as exc:  # a peer missing a dtype, a device out of memory ...
            errors.append(f"{workload.name} batch {batch} {dtype}: {name} skipped: {type(exc).__name__}: {exc}")

    for t in targets:
        add(f"arraymlp[{t.name}]", "ours", t.name, lambda t=t: make_arraymlp(t, workload, batch, dtype))
    if workload.kind == "ensemble":  # peers: torch.func.vmap over stacked modules; no floor, no sklearn
        if peers and _has("torch") and (not gpu or _torch_cuda()) and dtype in ("float32", "float64"):
            dev = "cuda" if gpu else "cpu"
            add(f"torch.vmap[{dev}]", "peer", dev, lambda: make_torch(dev, workload, batch, dtype))
        return cands
    for t in targets:
        add(f"floor[{t.name}]", "floor", t.name,
            lambda t=t: make_gemm_floor(t, workload.sizes, batch, workload.kind, dtype))
    if peers and _has("torch") and (not gpu or _torch_cuda()):
        dev = "cuda" if gpu else "cpu"
        if gpu or dtype in ("float32", "float64"):
            add(f"torch[{dev}]", "peer", dev, lambda: make_torch(dev, workload, batch, dtype))
    if peers and not gpu and _has("sklearn") and dtype in ("float32", "float64"):
        add("sklearn", "peer", "cpu", lambda: make_sklearn(workload, batch, dtype))
    return cands


SWITCH_TIME = 0.15
"""Seconds a candidate runs untimed after one of another threading runtime (see
:func:`interleaved`): longer than OpenBLAS's idle workers keep spinning after a
product, so that the first timed call finds them asleep."""


def _runtime(c: Candidate) -> str:
    """The threading runtime a candidate's work runs on: NumPy's BLAS (arraymlp and its
    floor on NumPy, scikit-learn), PyTorch's (CPU or CUDA), CuPy's."""
    if c.role == "peer":
        return "numpy" if c.name == "sklearn" else f"torch-{c.target}"
    t = TARGETS.get(c.target)
    if t is None:
        return c.target
    return t.backend if t.backend != "torch" else f"torch-{t.device}"


def _free_device_memory() -> None:
    gc.collect()
    if sys.modules.get("cupy") is not None:
        try:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
    if sys.modules.get("torch") is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_case(workload: Workload, batch: int, dtype: str, targets: list[Target], *, gpu: bool,
             repeat: int, min_time: float, peers: bool = True, errors: list[str] | None = None) -> dict[str, Any]:
    """Build and time every candidate of one (workload, batch, dtype, device) case.

    Returns
    -------
    dict
        ``workload``, ``batch``, ``dtype``, ``device`` (``"cpu"``/``"gpu"``),
        ``candidates`` (name, role, target, times and their :func:`summarize`,
        ``samples_per_s``) and ``ratios`` (:func:`compute_ratios`).
    """
    errors = errors if errors is not None else []
    cands = _build_candidates(workload, batch, dtype, targets, gpu, peers, errors)
    groups = {c.name: _runtime(c) for c in cands}
    times = (interleaved({c.name: c.fn for c in cands}, repeat=repeat, min_time=min_time, groups=groups,
                         switch_time=SWITCH_TIME) if cands else {})
    rows = []
    for c in cands:
        s = summarize(times[c.name])
        rows.append({"name": c.name, "role": c.role, "target": c.target, "times": times[c.name], **s,
                     "samples_per_s": batch / s["median"]})
    ratios = compute_ratios({r["name"]: r["median"] for r in rows},
                            {r["name"]: (r["role"], r["target"]) for r in rows})
    del cands
    _free_device_memory()
    return {"workload": workload.name, "title": workload.title, "kind": workload.kind,
            "arch": workload.arch, "batch": batch, "dtype": dtype, "device": "gpu" if gpu else "cpu",
            "candidates": rows, "ratios": ratios}


def _resolve_targets(spec: Sequence[str] | None) -> tuple[list[Target], list[str]]:
    avail = available_targets()
    notes: list[str] = []
    if not spec:
        names = ["numpy"] + [t for t in avail if TARGETS[t].gpu]
    else:
        names = []
        for item in spec:
            for name in item.split(","):
                name = name.strip()
                if not name:
                    continue
                if name == "all":
                    names.extend(avail)
                    continue
                if name not in TARGETS:
                    msg = f"unknown backend {name!r}; known: {', '.join(TARGETS)}, all"
                    raise ValueError(msg)
                names.append(name)
    out: list[Target] = []
    for name in dict.fromkeys(names):
        if name in avail:
            out.append(TARGETS[name])
        else:
            notes.append(f"backend {name} is not available on this machine; skipped")
    return out, notes


def _resolve_workloads(spec: Sequence[str] | None) -> list[Workload]:
    if not spec:
        return list(WORKLOADS.values())
    out = []
    for item in spec:
        for name in item.split(","):
            name = name.strip().upper()
            if not name:
                continue
            if name not in WORKLOADS:
                msg = f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}"
                raise ValueError(msg)
            out.append(WORKLOADS[name])
    return list(dict.fromkeys(out))


def run(workloads: Sequence[Workload], targets: Sequence[Target], *, repeat: int, quick: bool,
        min_time: float, peers: bool = True, memory: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run workloads on targets and collect a JSON-able result.

    Returns
    -------
    dict
        ``environment``, ``settings``, ``cases`` (see :func:`run_case`), ``crossover``,
        ``memory`` (or None) and ``notes`` (skips and errors).
    """
    from ..kernels import _jit

    _jit.kernels()  # steady-state timings: the compiled kernels load now, not partway through a case
    notes: list[str] = []
    cases = []
    groups = _gpu_device_group(targets)
    for wl in workloads:
        for gpu in (False, True):
            tgts = groups.get(gpu)
            if not tgts:
                continue
            if wl.gpu_only and not gpu:
                continue
            for dtype in wl.dtypes:
                if dtype in ("float16", "tf32") and not gpu:
                    continue
                for batch in wl.batch_sizes(quick):
                    log(f"{wl.name} batch {batch} {dtype} [{'gpu' if gpu else 'cpu'}] ...")
                    cases.append(run_case(wl, batch, dtype, tgts, gpu=gpu, repeat=repeat, min_time=min_time,
                                          peers=peers, errors=notes))
        if wl.gpu_only and True not in groups:
            notes.append(f"{wl.name} runs on a GPU only; skipped (no CUDA device)")
    mem = None
    if memory:
        log("memory: one W1 epoch over 60000 rows ...")
        mem = measure_memory(60_000)
    return {
        "environment": environment(),
        "settings": {"repeat": repeat, "quick": quick, "min_time": min_time,
                     "targets": [t.name for t in targets], "workloads": [w.name for w in workloads]},
        "cases": cases,
        "crossover": _crossovers(cases),
        "memory": mem,
        "notes": notes,
    }


def _parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m arraymlp bench``."""
    ap = argparse.ArgumentParser(
        prog="python -m arraymlp bench",
        description="Time arraymlp's hot path against its GEMM floor, PyTorch eager and scikit-learn, "
                    "side by side in one process.")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="numpy, torch (CPU), cupy, torch-cuda or all; repeat or comma-separate "
                         "(default: numpy and every GPU backend present)")
    ap.add_argument("--workload", action="append", metavar="NAME",
                    help=f"one of {', '.join(WORKLOADS)}; repeat or comma-separate (default: all)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds per case (default 15, quick 5)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds a sample lasts at least (calls are looped; default 0.05, quick 0.01)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and batch sizes: under a minute on 2 cores")
    ap.add_argument("--no-peers", action="store_true", help="time arraymlp and its GEMM floor only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="at most N threads in BLAS, OpenMP and PyTorch pools (default: each library's own)")
    ap.add_argument("--json", metavar="PATH", help="write results and environment as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of throughput against batch size")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return ap


def _check_settings(args: argparse.Namespace, repeat: int, min_time: float, targets: list) -> str | None:
    """The first problem with the resolved settings, as an error message, or ``None``."""
    if repeat < 1:
        return "--repeat must be >= 1"
    if not targets:
        return "none of the requested backends is available"
    if args.threads is not None and args.threads < 1:
        return "--threads must be >= 1"
    if not (math.isfinite(min_time) and min_time >= 0):
        return f"--min-time must be a finite number of seconds >= 0, got {args.min_time}"
    for opt, path in (("--json", args.json), ("--plot", args.plot)):  # before minutes of timing, not after
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            return f"{opt} {path}: the folder {folder} does not exist"
    return None


def _print_report(result: dict, threads_arg: int | None, repeat: int) -> None:
    """Print the header, the table, the crossovers, the memory line and the notes."""
    env = result["environment"]
    threads = "default threads" if threads_arg is None else f"{threads_arg} thread(s) per pool"
    kernels = "compiled NumPy kernels" if env["jit_kernels"] else "NumPy ufuncs only"
    print(f"arraymlp {env['versions']['arraymlp']} bench on {env['device_name']}; "
          f"repeat {repeat}, medians of interleaved rounds, {threads}, {kernels}")
    print()
    print(format_table(result["cases"]))
    for wl, by_dtype in result["crossover"].items():
        for dt, c in by_dtype.items():
            where = f"batch {c['batch']}" if c["batch"] is not None else "never (in the batches run)"
            print(f"{wl} {dt}: {c['gpu']} overtakes {c['cpu']} from {where}")
    mem = result["memory"]
    if mem:
        print(f"memory: one {mem['arch']} epoch over {mem['rows']} rows (batch {mem['batch']}, {mem['dtype']}): "
              f"peak {mem['peak_bytes'] / 2**20:.1f} MiB vs data + parameters + optimiser state + one "
              f"batch's activations {mem['budget_bytes'] / 2**20:.1f} MiB: ratio {mem['ratio']:.3f}")
    for note in result["notes"]:
        print(f"note: {note}")


def _write_outputs(result: dict, json_path: str | None, plot_path: str | None, log) -> None:
    """Write the ``--json`` file and the ``--plot`` PNG where asked for."""
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=_json_default)
            fh.write("\n")
        log(f"wrote {json_path}")
    if plot_path:
        if result["cases"]:
            plot_throughput(result["cases"], plot_path)
            log(f"wrote {plot_path}")
        else:
            log("no cases: no plot written")


def main(argv: list[str] | None = None) -> int:
    """``python -m arraymlp bench``: time the workloads and print the table.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after ``bench`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0 on success, 2 on bad arguments).
    """
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        targets, tnotes = _resolve_targets(args.backend)
        workloads = _resolve_workloads(args.workload)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repeat = args.repeat if args.repeat is not None else (5 if args.quick else 15)
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.05)
    problem = _check_settings(args, repeat, min_time, targets)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with limit_threads(args.threads, tnotes):
        result = run(workloads, targets, repeat=repeat, quick=args.quick, min_time=min_time,
                     peers=not args.no_peers, memory=not args.no_memory, log=log)
    result["notes"] = tnotes + result["notes"]
    result["settings"]["wall_seconds"] = time.perf_counter() - t0
    result["settings"]["threads"] = args.threads
    _print_report(result, args.threads, repeat)
    _write_outputs(result, args.json, args.plot, log)
    log(f"total {time.perf_counter() - t0:.1f} s")
    return 0
