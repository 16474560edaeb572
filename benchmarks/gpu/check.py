"""The GPU check of arraymlp: one run, under one time budget, on a CUDA machine.

    python benchmarks/gpu/check.py [--out benchmarks/results] [--budget 345] [--skip SECTION ...] [--dry]

Each section runs under its own cap (``CAPS``, seconds; less when less of the budget is
left); one that fails or runs out of time is recorded with its error and whatever it had
measured (``"incomplete": true``), and the next one runs. Everything goes into ``--out``
with the device in the name: ``<device>-gpu-check.json`` (every section, rewritten after
each), ``<device>-bench.json``, ``<device>-W5.png``, ``<device>-ensemble.png``,
``<device>-junit.xml``. The last lines printed are the figures the open issues ask for
(:func:`figures`), then one status line per section. Sections, in the order they run:

``env`` (5 s)
    Versions (Python, NumPy, CuPy, torch and its CUDA, array-api-compat/strict), the
    device, the TF32 switches as found.
``pytest`` (150 s)
    ``pytest -k "cupy or cuda" tests`` with TF32 off, JUnit XML; on running out of time
    pytest is interrupted (SIGINT) so that the JUnit file still holds what ran. The
    counts (passed, failed, errors, skipped) and the failing test ids are in the report.
    A library that warns on import (which the suite's warnings-as-errors would turn into
    "no GPU" and skipped rows) is named, and its warnings left as warnings.
``agreement`` (15 s)
    The same training (64-128-10, Adam, dropout, 3 epochs, float32, one seed) on NumPy
    and on each GPU target: the relative difference of the epoch losses; and on each GPU
    target, NumPy data staged from the host against the same data on the device: the
    largest parameter difference (0 expected: the same kernels on the same batches), and
    the time of a W1-sized fit on staged data over the time on device data (near 1 when
    the copies overlap the computation).
``host_syncs`` (15 s)
    Host synchronisations per training step of ``fit`` (784-512-512-10, batch 256, SGD
    and Adam, data on the device; Adam with NumPy data staged from the host), as the
    slope between 8 and 16 steps per epoch: CuPy's synchronisation points counted,
    torch's synchronising calls counted by its sync debug mode. Target: 0 per step.
``launches`` (15 s)
    Kernel launches (CUPTI, through ``torch.profiler``) per W1 step with SGD and with
    Adam, for arraymlp[cupy], arraymlp[torch-cuda] and PyTorch eager, against the
    targets 22 (SGD) and 30 (Adam).
``tf32_error`` (5 s)
    The relative error against float64 of float32 and of TF32 products (2048^3) on each
    GPU target, beside TF32 emulated on the host (inputs rounded to 10 fraction bits,
    float32 products): the prediction the GPU figure is checked against.
``gemm_floor_device`` (15 s)
    The device time of W1, W2 and W4's GEMMs in float32, TF32 and float16, by CUDA
    events around a stream that was kept busy while they were queued (no host dispatch
    counted), beside their wall time.
``bench`` (70 s)
    ``arraymlp.bench`` over W1, W2, W4 (1024-4096-4096-1024, batch 8192) in float32,
    TF32 and float16 (arraymlp[cupy], arraymlp[torch-cuda], PyTorch eager CUDA, the GEMM
    floors), and W5 across batch sizes on NumPy and the GPU: the CPU/GPU crossover batch
    and its plot.
``amp`` (25 s)
    Mixed precision: digits accuracy (64-64-10, Adam, 20 epochs) of float16 and bfloat16
    training against float32, per target, and the W1/W4 step time of each precision
    beside PyTorch's autocast.
``ensemble`` (30 s)
    Ensembles (K members trained at once): one fit of K = 64 members of 64-32-10 on
    digits-sized data (1797 x 64, Adam, batch 64, 2 epochs) against 64 sequential fits
    of plain models (16 of them timed per round, times 4), on each GPU target and NumPy
    (target: 30x on the GPU), best of 3 interleaved rounds; then the
    ensemble step's throughput for K in 1, 4, 16, 64, 256 on this machine's CPU (NumPy)
    and each GPU target, timed interleaved, and the smallest K from which the GPU stays
    ahead (with a plot).

``--dry`` runs every section's code on the CPU with NumPy standing in for the GPU
(array-api-strict's second device for the host-sync count, small sizes, a few tests in
the pytest section); the report has the same structure and computed values, which mean
nothing about a GPU. It is what the project's tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
# in this order: the test rows first (their JUnit file is the check's first product, and
# they compile the CuPy kernels the later sections time), the quick probes, the benchmarks
SECTIONS = ("env", "pytest", "agreement", "host_syncs", "launches", "tf32_error", "gemm_floor_device", "bench",
            "amp", "ensemble")
# the most each section may use of the budget (less when less is left); they add up to it
CAPS = {"env": 5, "pytest": 150, "agreement": 15, "host_syncs": 15, "launches": 15, "tf32_error": 5,
        "gemm_floor_device": 15, "bench": 70, "amp": 25, "ensemble": 30}
BUDGET = float(sum(CAPS.values()))  # 345 s
LAUNCH_TARGETS = {"sgd": 22, "adam": 30}  # kernels per W1 step (issue 16)
ENSEMBLE_TARGET = 30.0  # K = 64 ensemble fit over 64 sequential fits on a GPU (issue 18)
ENSEMBLE_KS = (1, 4, 16, 64, 256)


class SectionTimeout(BaseException):
    """A section ran past its share of the budget. Not an :class:`Exception`, so that a
    section's (or arraymlp's) ``except Exception`` cannot swallow it and run on."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"ran past its {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclasses.dataclass
class Context:
    """What the sections share: the settings, where they write, the GPU targets."""

    out: Path
    budget: float
    dry: bool
    start: float = dataclasses.field(default_factory=time.perf_counter)
    device: str = "unknown-device"
    targets: list = dataclasses.field(default_factory=list)  # arraymlp.bench target names of the "GPU"
    peer_device: str = "cuda"  # torch eager's device
    partial: dict = dataclasses.field(default_factory=dict)  # what the running section has measured so far

    section_end: float = float("inf")  # when the running section's alarm fires (perf_counter)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def section_left(self) -> float:
        """Seconds until the running section's cap."""
        return self.section_end - time.perf_counter()

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.device}-{suffix}"


def device_slug(name: str) -> str:
    """A file-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-device"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu/check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help=f"seconds for the whole check (default {BUDGET:.0f}, the sections' caps added up)")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS, metavar="SECTION",
                    help=f"skip a section (repeatable): {', '.join(SECTIONS)}")
    ap.add_argument("--only", action="append", default=[], choices=SECTIONS, metavar="SECTION",
                    help="run only these sections (repeatable)")
    ap.add_argument("--dry", action="store_true",
                    help="NumPy on the CPU stands in for the GPU, at reduced sizes: every section's code runs and "
                         "the report has its structure, its figures mean nothing (the tests of this script)")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    return args


# ---------------------------------------------------------------------------- helpers
def _sync(target: str) -> Callable[[], None]:
    if target == "cupy":
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    if target == "torch-cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def _median_s(fn: Callable[[], Any], reps: int = 5, n: int = 3, sync=lambda: None) -> float:
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        ts.append((time.perf_counter() - t0) / n)
    ts.sort()
    return ts[len(ts) // 2]


def _workloads(ctx: Context) -> dict:
    """W1, W2, W4, W5, W6: full size on a GPU; reduced in a dry run (W1 to 64-128-128-10,
    batch 64; W4 to 64-256-256-64, batch 256)."""
    from arraymlp import bench

    W = dict(bench.WORKLOADS)
    if ctx.dry:
        W["W1"] = dataclasses.replace(W["W1"], sizes=(64, 128, 128, 10), batches=(64,))
        W["W2"] = dataclasses.replace(W["W2"], batches=(32,))
        W["W4"] = dataclasses.replace(W["W4"], sizes=(64, 256, 256, 64), batches=(256,), gpu_only=False,
                                      dtypes=("float32",))
        W["W5"] = dataclasses.replace(W["W5"], quick_batches=(16, 256))
    return W


def _dtypes(ctx: Context) -> tuple:
    return ("float32",) if ctx.dry else ("float32", "tf32", "float16")


# ---------------------------------------------------------------------------- sections
def section_env(ctx: Context) -> dict:
    import numpy

    import arraymlp

    out = {"python": sys.version.split()[0], "arraymlp": arraymlp.__version__, "numpy": numpy.__version__,
           "standin": ctx.dry, "targets": ctx.targets,
           "env": {k: os.environ.get(k) for k in ("CUPY_TF32", "NVIDIA_TF32_OVERRIDE", "CUDA_VISIBLE_DEVICES")}}
    for mod in ("cupy", "torch", "array_api_compat", "array_api_strict"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:
            out[mod] = f"unavailable: {type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        import torch

        out["torch_cuda"] = torch.version.cuda
        out["torch_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    out["device"] = ctx.device
    return out


def _call_site() -> str:
    """``file:line`` of the innermost frame inside the arraymlp package, for a sync's report."""
    import arraymlp

    pkg = os.path.dirname(os.path.abspath(arraymlp.__file__))
    for fr in reversed(traceback.extract_stack()[:-2]):
        if os.path.abspath(fr.filename).startswith(pkg + os.sep):
            return f"{os.path.relpath(fr.filename, pkg)}:{fr.lineno}"
    return "(outside arraymlp)"


def _count_syncs(target: str):
    """A context counting the host synchronisations of ``target`` into a list's length."""
    seen: list = []
    if target == "cupy":
        import cupy._core.syncdetect as sd

        orig = sd._declare_synchronize

        def counting():
            seen.append(_call_site())  # where in arraymlp it came from
            return orig()

        @contextlib.contextmanager
        def ctx():
            sd._declare_synchronize = counting
            try:
                yield seen
            finally:
                sd._declare_synchronize = orig

        return ctx()
    import warnings

    import torch

    @contextlib.contextmanager
    def tctx():
        old = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)  # warn at every synchronising call
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode(old)
                seen.extend(w for w in rec if "synchroniz" in str(w.message).lower())

    return tctx()


def section_agreement(ctx: Context) -> dict:
    """The GPU targets train as NumPy does (to float32 rounding), and host data staged
    to the device trains as data already there (bit for bit)."""
    import numpy

    import arraymlp as am
    from arraymlp import bench

    rng = numpy.random.default_rng(1)
    n = 1024 if ctx.dry else 4096
    xh = rng.standard_normal((n, 64)).astype(numpy.float32)
    yh = numpy.argmax(xh @ rng.standard_normal((64, 10)), axis=1)
    kwargs = dict(loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=3, batch_size=256, seed=0, progress=False)

    def train(backend, device, staged):
        m = am.MLP([64, 128, 10], output_activation="softmax", dropout=0.1, backend=backend, device=device, seed=0)
        x, y = (xh, yh) if staged else (am.to_backend(a, backend, device=m.device) for a in (xh, yh))
        h = m.fit(x, y, **kwargs)
        return h.loss, [{k: am.to_numpy(v) for k, v in p.items()} for p in m.params]

    base, _ = train("numpy", None, False)
    out = ctx.partial
    out["numpy_loss"] = base
    for target in ctx.targets:
        tgt = bench.TARGETS[target]
        loss, params = train(tgt.backend, tgt.device, False)
        out[f"loss vs numpy [{target}]"] = max(abs(a - b) / abs(b) for a, b in zip(loss, base))
        if ctx.dry:  # NumPy data for a NumPy model is not staged: array-api-strict's second device stands in
            import array_api_strict

            _, params = train("array_api_strict", array_api_strict.Device("device1"), False)
            _, params_s = train("array_api_strict", array_api_strict.Device("device1"), True)
        else:
            _, params_s = train(tgt.backend, tgt.device, True)
        out[f"staged vs on-device, max |param diff| [{target}]"] = max(
            float(numpy.max(numpy.abs(p[k] - q[k]))) for p, q in zip(params, params_s) for k in p)
    _staging_cost(ctx, out)
    return out


def _staging_cost(ctx: Context, out: dict) -> None:
    """The time of a W1-sized fit (784-512-512-10, 16 batches of 256, Adam, 2 epochs)
    on host data staged to the device over the same fit on data already there: close to
    1 when the copies overlap the computation. Interleaved, best of 3 (the first warms up)."""
    import numpy

    import arraymlp as am
    from arraymlp import bench

    sizes, n = ((64, 128, 10), 1024) if ctx.dry else ((784, 512, 512, 10), 4096)
    rng = numpy.random.default_rng(2)
    xh = rng.standard_normal((n, sizes[0])).astype(numpy.float32)
    yh = rng.integers(0, sizes[-1], n)
    for target in ctx.targets:
        if ctx.dry:
            import array_api_strict

            backend, device, sync = "array_api_strict", array_api_strict.Device("device1"), (lambda: None)
        else:
            tgt = bench.TARGETS[target]
            backend, device, sync = tgt.backend, tgt.device, _sync(target)
        xd, yd = (am.to_backend(a, backend, device=device) for a in (xh, yh))

        def fit_on(x, y, backend=backend, device=device, sync=sync):
            am.MLP(list(sizes), output_activation="softmax", backend=backend, device=device, seed=0).fit(
                x, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=256, seed=0, progress=False)
            sync()

        best = _interleaved_min({"staged": lambda f=fit_on: f(xh, yh),
                                 "on device": lambda f=fit_on, xd=xd, yd=yd: f(xd, yd)}, rounds=3)
        out[f"fit time, staged over on-device [{target}]"] = best["staged"] / best["on device"]


@contextlib.contextmanager
def _count_strict_reads():
    """A dry run's stand-in for the CUDA sync hooks: every read of an array_api_strict
    array's value on the host (``float``, ``bool``, ``__array__``, DLPack, ...) counted."""
    import array_api_strict

    seen: list = []
    cls = type(array_api_strict.asarray(0.0))
    saved = {}
    for name in ("__float__", "__int__", "__index__", "__bool__", "__complex__", "__iter__", "__array__",
                 "__buffer__", "__dlpack__"):
        original = cls.__dict__.get(name)
        if original is None:
            continue
        saved[name] = original

        def counting(*args, _original=original, **kwargs):
            seen.append(1)
            return _original(*args, **kwargs)

        setattr(cls, name, counting)
    try:
        yield seen
    finally:
        for name, original in saved.items():
            setattr(cls, name, original)


def section_host_syncs(ctx: Context) -> dict:
    """Host synchronisations per step of ``fit``: counted over one epoch of 8 and of 16
    steps (batch 256), the slope per step; for SGD and Adam with the data on the device,
    and Adam with NumPy data staged from the host. A dry run counts reads of
    array_api_strict arrays, the model on its second device."""
    import numpy

    import arraymlp as am
    from arraymlp import bench

    rng = numpy.random.default_rng(0)
    sizes = bench.WORKLOADS["W1"].sizes if not ctx.dry else (64, 32, 10)
    out = ctx.partial
    for target in ctx.targets:
        if ctx.dry:
            import array_api_strict

            backend, device, counter = "array_api_strict", array_api_strict.Device("device1"), _count_strict_reads
        else:
            tgt = bench.TARGETS[target]
            backend, device, counter = tgt.backend, tgt.device, (lambda target=target: _count_syncs(target))
        for case in ("sgd", "adam", "adam, host data staged"):
            counts = {}
            for steps in (8, 16):
                n = steps * 256
                m = am.MLP(list(sizes), output_activation="softmax", backend=backend, device=device, seed=0)
                xh = rng.standard_normal((n, sizes[0])).astype("float32")
                yh = rng.integers(0, sizes[-1], n)
                if case.endswith("staged"):
                    x, y = xh, yh
                else:
                    x, y = (am.to_backend(a, backend, device=m.device) for a in (xh, yh))
                with counter() as seen:
                    m.fit(x, y, loss="cross_entropy", optimizer=case.split(",")[0], epochs=1, batch_size=256,
                          progress=False)
                counts[steps] = len(seen)
                sites = sorted({str(s) for s in seen if isinstance(s, str)})
            out[f"W1 {case} arraymlp[{target}]"] = {"syncs": counts, "per_step": (counts[16] - counts[8]) / 8,
                                                    "sites": sites[:20]}
    out["target"] = "0 per step"
    return out


def section_bench(ctx: Context) -> dict:
    """W1, W2, W4 in every dtype on the GPU targets; W5 on NumPy and the GPU."""
    from arraymlp import bench

    W = _workloads(ctx)
    dt = _dtypes(ctx)
    gpu_wl = [dataclasses.replace(W[k], dtypes=dt) for k in ("W1", "W2", "W4")]
    targets = [bench.TARGETS[t] for t in ctx.targets]
    if ctx.dry:  # the stand-in "GPU" is a CPU target: run it as the GPU group would
        targets = [dataclasses.replace(t, gpu=False) for t in targets]
    res = bench.run(gpu_wl, targets, repeat=3 if ctx.dry else 5, quick=True, min_time=0.0 if ctx.dry else 0.01,
                    peers=True, memory=False)
    cpu_and_gpu = [bench.TARGETS["numpy"], *(t for t in targets if t.name != "numpy")]
    res5 = bench.run([W["W5"]], cpu_and_gpu, repeat=3, quick=ctx.dry,
                     min_time=0.0 if ctx.dry else 0.01, peers=False, memory=False)
    res["cases"] += res5["cases"]
    res["crossover"] = res5["crossover"]
    res["notes"] += res5["notes"]
    with open(ctx.path("bench.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1, default=str)
    png = None
    w5 = [c for c in res5["cases"] if c["workload"] == "W5"]
    if w5:
        png = str(ctx.path("W5.png"))
        try:
            bench.plot_throughput(w5, png)
        except ImportError as exc:  # no matplotlib: the figures are in the JSON all the same
            png = f"unavailable: {exc}"
    table = {f"{c['workload']} b{c['batch']} {c['dtype']} [{c['device']}]":
             {r["name"]: r["median"] for r in c["candidates"]} for c in res["cases"]}
    return {"json": str(ctx.path("bench.json")), "png": png, "medians_s": table, "crossover": res["crossover"],
            "ratios": {f"{c['workload']} b{c['batch']} {c['dtype']}": c["ratios"] for c in res["cases"]},
            "notes": res["notes"]}


def _device_time_s(fn: Callable[[], Any], target: str, n: int) -> float:
    """Device time of one call of ``fn`` (which enqueues work and synchronises at its end
    on a GPU target): CUDA events around ``n`` calls queued behind a busy stream, so that
    host dispatch is hidden. The stand-in measures wall time."""
    if target not in ("cupy", "torch-cuda"):
        return _median_s(fn, reps=3, n=n)
    import torch

    # fn synchronises at its end: time the products themselves, not fn, by events on the
    # stream around n calls of the unsynchronised body
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    with contextlib.suppress(Exception):  # keep the stream busy while the calls are queued
        torch.cuda._sleep(int(5e7))
    start.record()
    for _ in range(n):
        fn.unsynced()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def _floor_body(target: str, sizes, batch: int, dtype: str):
    """The GEMM floor's products with and without the final synchronisation."""
    from arraymlp import bench

    calls = []
    fn = bench.make_gemm_floor(target, sizes, batch, "train", dtype, matmul=lambda a, b: calls.append((a, b)))
    fn()  # records the operands once
    ops = list(calls)
    tf32 = dtype == "tf32"
    tgt = bench.TARGETS[target]
    sync = _sync(target)

    def unsynced():
        with bench.tf32(tgt, tf32):
            for a, b in ops:
                a @ b

    def synced():
        unsynced()
        sync()

    synced.unsynced = unsynced
    return synced, ops


def section_gemm_floor_device(ctx: Context) -> dict:
    W = _workloads(ctx)
    out = ctx.partial
    for name in ("W1", "W2", "W4"):
        wl = W[name]
        batch = wl.batches[0]
        for dtype in _dtypes(ctx):
            for target in ctx.targets:
                fn, ops = _floor_body(target, wl.sizes, batch, dtype)
                flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in ops)
                n = 3 if name == "W4" or ctx.dry else 50
                dev = _device_time_s(fn, target, n)
                wall = _median_s(fn, reps=3, n=n, sync=_sync(target))
                out[f"{name} {dtype} floor[{target}]"] = {
                    "device_s": dev, "wall_s": wall, "wall_over_device": wall / dev if dev else None,
                    "tflops_device": flops / dev / 1e12 if dev else None}
    return out


#: CUDA runtime and driver calls that return only once the device has caught up (an
#: explicit wait, or a synchronous copy): each one a host synchronisation, whoever made it
HOST_WAIT_CALLS = re.compile(r"^cu(da)?(Device|Ctx|Stream|Event)Synchronize$|^cudaMemcpy(2D|3D)?$"
                            r"|^cuMemcpy(DtoH|HtoD|DtoD|2D|3D)?(_v2)?$")


def profile_counts(events, steps: int, closing: int = 1) -> dict:
    """Per step, from a CUDA profile's events ``(name, device type)``: kernels and
    copies/fills on the device, copies from or to pageable host memory (the driver stages
    them synchronously), and host waits (:data:`HOST_WAIT_CALLS`: runtime and driver
    calls are events of the CPU), less the ``closing`` waits of the profile itself.
    Independent of CuPy's own synchronisation hook, which sees ``get()`` and
    ``Device.synchronize`` only (not ``Stream.synchronize``, ``Event.synchronize`` or a
    pageable copy)."""
    kernels = copies = pageable = waits = 0
    for name, device in events:
        if "CUDA" in device:
            low = name.lower()
            if "memcpy" in low or "memset" in low:
                copies += 1
                pageable += "pageable" in low
            else:
                kernels += 1
        elif HOST_WAIT_CALLS.match(name):
            waits += 1
    return {"kernels_per_step": kernels / steps, "memcpy_memset_per_step": copies / steps,
            "pageable_copies_per_step": pageable / steps, "host_waits_per_step": max(waits - closing, 0) / steps}


def _profiled_kernels(fn: Callable[[], Any], steps: int) -> dict:
    """Kernel launches, memory copies and host waits per call of ``fn`` (CUPTI via
    torch.profiler: it sees every CUDA kernel and runtime/driver call of the process,
    CuPy's included); the profile closes with one ``torch.cuda.synchronize``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return profile_counts([(e.name, str(getattr(e, "device_type", ""))) for e in prof.events()], steps)


def section_launches(ctx: Context) -> dict:
    if ctx.dry:
        return {"skipped": "kernel launches are counted on CUDA only"}
    import arraymlp as am
    from arraymlp import bench
    from arraymlp._backend import resolve_backend
    from arraymlp.losses import get_loss

    W1 = bench.WORKLOADS["W1"]
    out = ctx.partial
    for optname in ("sgd", "adam"):
        for target in ctx.targets:
            tgt = bench.TARGETS[target]
            model = am.MLP(list(W1.sizes), output_activation="softmax", backend=tgt.backend, device=tgt.device,
                           seed=0)
            xp = resolve_backend(tgt.backend)
            xh, yh = bench._host_data(W1.sizes, 256, "cross_entropy", 0)
            x = xp.asarray(xh.astype("float32"), device=model.device)
            y = xp.asarray(yh, device=model.device)
            opt = am.SGD(lr=0.01) if optname == "sgd" else am.Adam(lr=1e-3)
            lossfn = get_loss("cross_entropy")

            def step(model=model, opt=opt, lossfn=lossfn, x=x, y=y, xp=xp):
                bench.train_step(model, opt, lossfn, x, y, xp=xp)

            out[f"W1 {optname} arraymlp[{target}]"] = _profiled_kernels(step, 10)
        import torch

        net = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                  torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
        topt = torch.optim.SGD(net.parameters(), lr=0.01) if optname == "sgd" else torch.optim.Adam(net.parameters())
        xt = torch.randn(256, 784, device="cuda")
        yt = torch.randint(0, 10, (256,), device="cuda")
        lf = torch.nn.CrossEntropyLoss()

        def tstep(net=net, topt=topt, lf=lf, xt=xt, yt=yt):
            topt.zero_grad(set_to_none=True)
            lf(net(xt), yt).backward()
            topt.step()

        out[f"W1 {optname} torch eager"] = _profiled_kernels(tstep, 10)
    out["targets_from_the_issue"] = {k: f"<= {v}" for k, v in LAUNCH_TARGETS.items()}
    out["within_target"] = judge_launches(out)
    return out


def judge_launches(counts: dict) -> dict:
    """``{"W1 sgd arraymlp[cupy]": True, ...}``: each arraymlp row's kernels per step
    against :data:`LAUNCH_TARGETS`."""
    out = {}
    for key, row in counts.items():
        m = re.match(r"W1 (sgd|adam) arraymlp\[", key)
        if m and isinstance(row, dict) and "kernels_per_step" in row:
            out[key] = row["kernels_per_step"] <= LAUNCH_TARGETS[m.group(1)]
    return out


def round_to_tf32(a):
    """float32 values rounded to TF32's 10 fraction bits (to nearest, ties away from
    zero, as the tensor cores' input conversion), still stored as float32."""
    import numpy

    bits = numpy.ascontiguousarray(a, dtype=numpy.float32).view(numpy.uint32)
    rounded = (bits + numpy.uint32(0x1000)) & numpy.uint32(0xFFFFE000)
    return rounded.view(numpy.float32)


def section_tf32_error(ctx: Context) -> dict:
    """Relative Frobenius error against float64 of float32 and TF32 products (n^3, n =
    2048; 256 in a dry run), on each GPU target and emulated on the host."""
    import numpy

    from arraymlp import bench
    from arraymlp._backend import canonical_device, resolve_backend, to_numpy

    n = 256 if ctx.dry else 2048
    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    ref = a @ b
    nrm = numpy.linalg.norm(ref)

    def err(c):
        return float(numpy.linalg.norm(numpy.asarray(c, dtype=numpy.float64) - ref) / nrm)

    a32, b32 = a.astype(numpy.float32), b.astype(numpy.float32)
    out = ctx.partial
    out["n"] = n
    out["host emulation"] = {"rel_err_float32": err(a32 @ b32),
                             "rel_err_tf32": err(round_to_tf32(a32) @ round_to_tf32(b32))}
    out["host emulation"]["ratio"] = out["host emulation"]["rel_err_tf32"] / out["host emulation"]["rel_err_float32"]
    if ctx.dry:
        return out
    for target in ctx.targets:
        tgt = bench.TARGETS[target]
        xp = resolve_backend(tgt.backend)
        dev = canonical_device(xp, tgt.device)
        A, B = (xp.asarray(m, device=dev) for m in (a32, b32))
        e32 = err(to_numpy(A @ B))
        with bench.tf32(tgt, True):
            etf = err(to_numpy(A @ B))
        out[target] = {"rel_err_float32": e32, "rel_err_tf32": etf, "ratio": etf / e32}
    return out


def _digits():
    """scikit-learn's digits (1400 to train, 397 to test), scaled to [0, 1]; where
    scikit-learn is absent, a stand-in of the same shape (labels of a random teacher
    network), said so in the data's name. ``(name, Xtr, ytr, Xte, yte)``."""
    import numpy

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = numpy.random.default_rng(0)
        X = rng.uniform(0.0, 1.0, (1797, 64)).astype(numpy.float32)
        y = numpy.argmax(numpy.tanh(X @ rng.standard_normal((64, 32))) @ rng.standard_normal((32, 10)), axis=1)
        name = "digits-shaped stand-in (scikit-learn absent)"
    else:
        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).astype(numpy.float32)
        name = "digits"
    return name, X[:1400], y[:1400], X[1400:], y[1400:]


def section_amp(ctx: Context) -> dict:
    """Digits accuracy per precision on every target, and W1/W4 step times per precision."""
    import numpy

    import arraymlp as am
    from arraymlp import bench
    from arraymlp._backend import resolve_backend
    from arraymlp.losses import get_loss

    data, Xtr, ytr, Xte, yte = _digits()
    out = ctx.partial  # kept by the run if the section runs out of time
    out.update(data=data, digits={}, step_s={})
    reps, calls = (1, 1) if ctx.dry else (3, 10)
    W = _workloads(ctx)
    for target in ctx.targets:
        tgt = bench.TARGETS[target]
        xp = resolve_backend(tgt.backend)
        acc = {}
        for prec in (None, "float16", "bfloat16"):
            if prec is not None and getattr(xp, prec, None) is None:
                acc[prec] = f"skipped: the {target} namespace has no {prec}"
                continue
            m = am.MLP([64, 64, 10], backend=tgt.backend, device=tgt.device, seed=0)
            x, y = (am.to_backend(a, tgt.backend, device=m.device) for a in (Xtr, ytr))
            m.fit(x, y, loss="cross_entropy", epochs=2 if ctx.dry else 20, batch_size=64, progress=False, seed=0,
                  precision=prec)
            pred = am.to_numpy(m.predict(am.to_backend(Xte, tgt.backend, device=m.device)))
            acc[prec or "float32"] = float(numpy.mean(pred == yte))
        base = acc["float32"]
        acc["within_0.5%"] = {k: abs(v - base) <= 0.005 for k, v in acc.items() if isinstance(v, float)}
        out["digits"][target] = acc
        for name in ("W1",) if ctx.dry else ("W1", "W4"):
            wl = W[name]
            batch = wl.batches[0]
            xh, yh = bench._host_data(wl.sizes, batch, "cross_entropy", 0)
            for prec in (None, "float16", "bfloat16"):
                if prec is not None and getattr(xp, prec, None) is None:
                    continue
                m = am.MLP(list(wl.sizes), output_activation="softmax", backend=tgt.backend, device=tgt.device,
                           seed=0)
                x = am.to_backend(xh.astype("float32"), tgt.backend, device=m.device)
                y = am.to_backend(yh, tgt.backend, device=m.device)
                m(x[:1])
                amp = am.MixedPrecision(prec) if prec else None
                opt = am.SGD(lr=0.01)
                lossfn = get_loss("cross_entropy")
                m.optimizer_ = opt

                def step(m=m, amp=amp, opt=opt, lossfn=lossfn, x=x, y=y, xp=xp):
                    if amp is None:
                        bench.train_step(m, opt, lossfn, x, y, xp=xp)
                    else:
                        value, update = amp.loss_then_update(m, opt, lossfn, x, y, None, xp=xp)
                        update(opt.lr)

                out["step_s"][f"{name} {prec or 'float32'} arraymlp[{target}]"] = _median_s(
                    step, reps=reps, n=2 if name == "W4" else calls, sync=_sync(target))
    for name in ("W1",) if ctx.dry else ("W1", "W4"):
        for prec in (None, "float16", "bfloat16"):
            key = f"{name} {prec or 'float32'} torch eager autocast[{ctx.peer_device}]"
            try:
                step, sync = _torch_autocast_step(W[name], ctx.peer_device, prec)
                out["step_s"][key] = _median_s(step, reps=reps, n=2 if name == "W4" else calls, sync=sync)
            except Exception as exc:  # torch absent, or no autocast for this dtype here
                out["step_s"][key] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return out


def _torch_autocast_step(wl, device: str, prec: str | None):
    """PyTorch eager's mixed-precision step of a workload: ``torch.autocast`` in ``prec``
    (float32 weights), ``GradScaler`` for float16, SGD; the loss is not read back, as
    arraymlp's benchmark step does not read it."""
    import torch

    layers = []
    for i, (a, b) in enumerate(zip(wl.sizes[:-1], wl.sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(wl.sizes) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    batch = wl.batches[0]
    x = torch.randn(batch, wl.sizes[0], generator=gen).to(device)
    y = torch.randint(0, wl.sizes[-1], (batch,), generator=gen).to(device)
    lf = torch.nn.CrossEntropyLoss()
    dtype = getattr(torch, prec) if prec else None
    scaler = torch.amp.GradScaler(device, enabled=prec == "float16")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype, enabled=prec is not None):
            loss = lf(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync


def _digits_sized(dry: bool):
    """Digits-sized data: 1797 x 64 standard normal float32 features, 10 random classes."""
    import numpy

    rng = numpy.random.default_rng(0)
    n = 256 if dry else 1797
    return rng.standard_normal((n, 64)).astype(numpy.float32), rng.integers(0, 10, n)


def _interleaved_min(fns: dict, rounds: int) -> dict:
    """Each callable's smallest wall time over ``rounds`` rounds, the callables taking
    turns within a round (and the order reversed every other round)."""
    best = {k: float("inf") for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _plot_ensemble(lines: dict, path: Path) -> str:
    """Member-rows per second against K, one line per target (log-log), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, by_k in lines.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members K (64-32-10, Adam, batch 64)")
    ax.set_ylabel("member-rows per second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return str(path)


def section_ensemble(ctx: Context) -> dict:
    """One fit of K = 64 members against 64 sequential fits, per target; the ensemble
    step's throughput per K on the CPU (NumPy) and the GPU targets, and the crossover K."""
    import arraymlp as am
    from arraymlp import bench
    from arraymlp.ensemble import member_seeds

    x, y = _digits_sized(ctx.dry)
    k_fit, epochs = (8, 1) if ctx.dry else (64, 2)
    sample = k_fit // 4  # sequential fits timed per round, scaled to K (the fits are alike)
    kwargs = dict(loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=epochs, batch_size=64, seed=1,
                  progress=False)
    out = ctx.partial
    vs = out.setdefault("ensemble_vs_sequential", {})
    targets = [*(t for t in ctx.targets if t != "numpy"), "numpy"]  # the GPU figure first
    for target in targets:
        tgt = bench.TARGETS[target]
        sync = _sync(target)
        xb, yb = (am.to_backend(a, tgt.backend, device=tgt.device) for a in (x, y))

        def ensemble(tgt=tgt, xb=xb, yb=yb, sync=sync):
            am.MLP([64, 32, 10], output_activation="softmax", ensemble=k_fit, seed=0, backend=tgt.backend,
                   device=tgt.device).fit(xb, yb, **kwargs)
            sync()

        def sequential(tgt=tgt, xb=xb, yb=yb, sync=sync):
            for s in member_seeds(0, k_fit)[:sample]:
                am.MLP([64, 32, 10], output_activation="softmax", seed=s, backend=tgt.backend,
                       device=tgt.device).fit(xb, yb, **kwargs)
            sync()

        best = _interleaved_min({"ensemble": ensemble, "sequential": sequential}, rounds=3)  # the first warms up
        seq = best["sequential"] * k_fit / sample
        vs[target] = {"K": k_fit, "epochs": epochs, "ensemble_s": best["ensemble"], "sequential_s": seq,
                      "sequential_timed": sample, "ratio": seq / best["ensemble"],
                      "target": f">= {ENSEMBLE_TARGET:g} on a GPU"}
    # the ensemble step per K: W6 (64-32-10, Adam, one batch of 64), the CPU and the GPU
    W6 = bench.WORKLOADS["W6"]
    ks = (1, 4, 16) if ctx.dry else ENSEMBLE_KS
    reps, calls = (3, 3) if ctx.dry else (5, 20)
    step_s: dict = out.setdefault("step_s", {})
    targets = ["numpy", *(t for t in targets if t != "numpy")]
    for k in ks:
        fns = {t: bench.make_arraymlp(t, W6, k) for t in targets}
        for fn in fns.values():
            fn()  # compiles, allocates
        times = {t: [] for t in targets}
        for r in range(reps):  # interleaved: every target once per round
            for t in targets if r % 2 == 0 else targets[::-1]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[t]()
                times[t].append((time.perf_counter() - t0) / calls)
        for t in targets:
            step_s.setdefault(t, {})[k] = sorted(times[t])[len(times[t]) // 2]
        del fns
    rows = {t: {k: k * W6.ensemble_batch / sec for k, sec in by_k.items()} for t, by_k in step_s.items()}
    out["member_rows_per_s"] = rows
    cpu = "numpy"
    gpus = [t for t in targets if t != cpu] or [cpu]  # a dry run compares NumPy with itself
    out["crossover_K"] = {g: bench.crossover_batch(rows[cpu], rows[g]) for g in gpus}
    try:
        out["png"] = _plot_ensemble({f"arraymlp[{t}]": rows[t] for t in targets}, ctx.path("ensemble.png"))
    except ImportError as exc:  # no matplotlib: the figures are in the JSON all the same
        out["png"] = f"unavailable: {exc}"
    return out


def _spawn(cmd: list, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` whose child can be interrupted. A shell starts background jobs
    with SIGINT ignored; a child inherits an ignored signal through exec, and a Python
    started so never raises KeyboardInterrupt. A handled signal is reset to its default
    by exec instead, so SIGINT is handled while the child starts. (A ``preexec_fn`` would
    force a fork of this possibly multithreaded process.)"""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, **kwargs)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_interruptible(cmd: list, seconds: float, env: dict) -> tuple[int, str]:
    """Run ``cmd`` for at most ``seconds``; past that, interrupt it (SIGINT, as Ctrl-C:
    pytest then still writes its JUnit file), and kill it 20 s later. ``(rc, output)``,
    rc 124 when it was interrupted."""
    with tempfile.TemporaryFile("w+") as log:
        proc = _spawn(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
        finally:
            if proc.poll() is None:  # the section's own alarm (or Ctrl-C) came first: no orphan
                proc.kill()
                proc.wait()
        log.seek(0)
        return rc, log.read()


def junit_counts(path: Path) -> dict:
    """Tests, passed, failed, errors and skipped of a JUnit XML file, and the first 30
    failing or erroring test ids."""
    if not Path(path).exists():
        return {"missing": str(path)}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(sv.get(k, 0)) for sv in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(f"{case.get('classname')}::{case.get('name')}")
    return {"tests": c["tests"], "passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"],
            "failed": c["failures"], "errors": c["errors"], "skipped": c["skipped"], "failing": bad[:30]}


#: Host-side checks of the CuPy set (its CUDA sources compiled by g++ and by NVRTC, about
#: a minute): their names match "cupy", but on a GPU the kernels run for real in the
#: parity table, so the GPU run leaves them out.
HOST_ONLY_TESTS = ("tests/test_cupy_kernels.py", "tests/test_cupy_nvrtc.py")


def pytest_targets(dry: bool) -> list[str]:
    """The paths (and ``--ignore`` options) the pytest section hands pytest."""
    if dry:
        return ["tests/test_staging.py"]
    return [*(f"--ignore={t}" for t in HOST_ONLY_TESTS), "tests"]


def section_pytest(ctx: Context) -> dict:
    """The test suite's CuPy and torch-CUDA rows (a dry run: those of one file, which
    skip here), TF32 off, into ``<device>-junit.xml``."""
    junit = ctx.path("junit.xml")
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    env.pop("CUPY_TF32", None)
    where = pytest_targets(ctx.dry)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy or cuda", "-rfE",
           "--durations=15", "--continue-on-collection-errors", "-o", "junit_family=xunit2", f"--junitxml={junit}"]
    warned = {}
    for mod, code in (("cupy", "import cupy; cupy.cuda.runtime.getDeviceCount()"),
                      ("torch", "import torch; torch.cuda.is_available()")):
        # the suite turns warnings into errors, and conftest reads a failing GPU probe as "no
        # GPU": a library that warns on import would skip its rows and look green
        plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        strict = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, env=env)
        if plain.returncode == 0 and strict.returncode != 0:
            warned[mod] = (strict.stderr.strip().splitlines() or ["?"])[-1][:300]
            cmd += ["-W", f"default::Warning:{mod}"]
    cmd += where
    # interrupted, and its JUnit file written, before the section's alarm
    seconds = max(5.0, ctx.section_left() - 25)
    rc, output = _run_interruptible(cmd, seconds, env)
    return {"rc": rc, "interrupted": rc == 124, "junit": str(junit), "counts": junit_counts(junit),
            "warns_on_import": warned, "tail": output[-4000:]}


FUNCTIONS = {name: globals()[f"section_{name}"] for name in SECTIONS}


# ---------------------------------------------------------------------------- the run
def _gpu_targets(dry: bool) -> tuple[str, list]:
    """(device slug, arraymlp.bench target names) of this machine."""
    if dry:
        return "dry-run-cpu", ["numpy"]
    from arraymlp import bench

    avail = bench.available_targets()
    targets = [t for t in ("cupy", "torch-cuda") if t in avail]
    name = "no-gpu"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    if name == "no-gpu":
        with contextlib.suppress(Exception):
            import cupy

            p = cupy.cuda.runtime.getDeviceProperties(0)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    return device_slug(name), targets


#: Imported once before the first section, outside every section's alarm: an import that
#: an alarm interrupts halfway leaves the library half-registered (torch then fails in
#: every later section, with "partially initialized module" or "duplicate registrations",
#: and the process may crash at exit).
PRELOAD = ("cupy", "torch", "torch.profiler")


def preload(names=PRELOAD) -> dict:
    """Import ``names`` where they import (an absent one is left to the sections to
    report): ``{name: seconds}``."""
    seconds = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception:  # absent, or unusable here: the sections that need it say so
            continue
        seconds[name] = round(time.perf_counter() - t0, 2)
    return seconds


def run(args: argparse.Namespace, functions: dict | None = None) -> dict:
    """Run the sections and write ``<device>-gpu-check.json``; returns the report."""
    functions = FUNCTIONS if functions is None else functions
    preloaded = preload()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, budget=args.budget, dry=args.dry)
    ctx.device, ctx.targets = _gpu_targets(args.dry)
    ctx.peer_device = "cpu" if args.dry else "cuda"
    report: dict = {"device": ctx.device, "targets": ctx.targets, "budget_s": args.budget, "sections": {},
                    "errors": {}, "skipped": {}, "seconds": {}, "preload_s": preloaded}
    wanted = [s for s in functions if (not args.only or s in args.only) and s not in args.skip]
    path = ctx.path("gpu-check.json")
    for name in wanted:
        if not ctx.targets and name != "env":
            report["skipped"][name] = "no GPU target (CuPy or CUDA torch) on this machine"
            continue
        cap = min(CAPS.get(name, 60), ctx.left() - 5)
        if cap < 5:
            report["skipped"][name] = f"budget spent ({ctx.left():.0f} s left)"
            continue
        t0 = time.perf_counter()
        ctx.partial, ctx.section_end = {}, t0 + cap
        try:
            with _time_limit(cap):
                report["sections"][name] = functions[name](ctx)
        except (Exception, SectionTimeout) as exc:  # one failing section must not stop the others
            report["errors"][name] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-3000:]
            if ctx.partial:  # what it measured before it failed
                report["sections"][name] = {**ctx.partial, "incomplete": True}
        report["seconds"][name] = round(time.perf_counter() - t0, 2)
        with open(path, "w", encoding="utf-8") as fh:  # after every section: a killed run keeps what it had
            json.dump(report, fh, indent=1, default=str)
    report["total_s"] = round(time.perf_counter() - ctx.start, 2)
    report["figures"] = figures(report)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, default=str)
    report["report"] = str(path)
    return report


def _g(v: Any, fmt: str = ".3g") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _fig_env_and_tests(sec: dict) -> list[str]:
    lines = []
    env = sec.get("env", {})
    if env:
        lines.append("versions: " + ", ".join(f"{k} {_g(env.get(k))}" for k in
                                              ("python", "numpy", "cupy", "torch", "torch_cuda", "array_api_compat",
                                               "array_api_strict", "arraymlp")))
    c = sec.get("pytest", {}).get("counts", {})
    if "tests" in c:
        lines.append(f"tests -k 'cupy or cuda': {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped{' (interrupted)' if sec['pytest'].get('interrupted') else ''}"
                     f"{' (EVERY ROW SKIPPED: no GPU seen?)' if c['tests'] and c['skipped'] == c['tests'] else ''}")
    return lines


def _fig_probes(sec: dict) -> list[str]:
    lines = [f"agreement, {key}: {_g(v)}" for key, v in sec.get("agreement", {}).items() if isinstance(v, float)]
    for key, row in sec.get("host_syncs", {}).items():
        if isinstance(row, dict) and "per_step" in row:
            lines.append(f"host syncs per step, {key}: {_g(row['per_step'])} (target 0; per epoch of 8 and 16 "
                         f"steps: {row['syncs'].get(8)}, {row['syncs'].get(16)})")
    la = sec.get("launches", {})
    for key, row in la.items():
        if isinstance(row, dict) and "kernels_per_step" in row:
            ok = la.get("within_target", {}).get(key)
            mark = "" if ok is None else f" (target <= {LAUNCH_TARGETS[key.split()[1]]}: {'met' if ok else 'MISSED'})"
            lines.append(f"kernel launches per step, {key}: {_g(row['kernels_per_step'])}{mark}")
            if "host_waits_per_step" in row:
                lines.append(f"host waits per step (CUDA profile), {key}: {_g(row['host_waits_per_step'])} "
                             f"(target 0); pageable copies: {_g(row['pageable_copies_per_step'])}")
    tf = sec.get("tf32_error", {})
    for key, row in tf.items():
        if isinstance(row, dict) and "rel_err_tf32" in row:
            lines.append(f"TF32 relative error, {tf.get('n')}^3 product, {key}: float32 {_g(row['rel_err_float32'])}, "
                         f"TF32 {_g(row['rel_err_tf32'])} ({_g(row['ratio'])}x)")
    for key, row in sec.get("gemm_floor_device", {}).items():
        if isinstance(row, dict) and "tflops_device" in row:
            lines.append(f"GEMM floor by events, {key}: {_g(row['tflops_device'])} TFLOP/s, "
                         f"wall/device {_g(row['wall_over_device'])}")
    return lines


def _fig_bench(sec: dict) -> list[str]:
    lines = []
    bench = sec.get("bench", {})
    for case, ratios in bench.get("ratios", {}).items():
        for name, r in ratios.items():
            if not name.startswith("arraymlp"):
                continue
            parts = [f"{_g(1 / r['floor'])} of the floor's throughput"] if r.get("floor") else []
            parts += [f"{_g(v)}x the time of {peer}" for peer, v in r.items() if peer != "floor"]
            if parts:
                lines.append(f"{case} {name}: " + "; ".join(parts))
    for wl, by_dtype in bench.get("crossover", {}).items():
        for dt, cr in by_dtype.items():
            lines.append(f"{wl} {dt} crossover: {cr['gpu']} overtakes {cr['cpu']} from batch {cr['batch']}")
    return lines


def _fig_amp_and_ensembles(sec: dict) -> list[str]:
    lines = []
    for target, acc in sec.get("amp", {}).get("digits", {}).items():
        base = acc.get("float32")
        parts = [f"{k} {_g(v, '.4f')}" for k, v in acc.items() if isinstance(v, float)]
        deltas = [f"{k} {_g(v - base, '+.4f')}" for k, v in acc.items()
                  if isinstance(v, float) and k != "float32" and isinstance(base, float)]
        data = sec["amp"].get("data", "digits")
        lines.append(f"{data} accuracy [{target}]: {', '.join(parts)}; against float32: {', '.join(deltas) or '-'} "
                     "(target within 0.005)")
    ens = sec.get("ensemble", {})
    for target, row in ens.get("ensemble_vs_sequential", {}).items():
        lines.append(f"ensemble K={row['K']} vs {row['K']} sequential fits [{target}]: {_g(row['ratio'])}x "
                     f"({_g(row['ensemble_s'])} s against {_g(row['sequential_s'])} s; target >= "
                     f"{ENSEMBLE_TARGET:g}x on a GPU)")
    for gpu, k in ens.get("crossover_K", {}).items():
        lines.append(f"ensemble step, K from which {gpu} stays ahead of numpy (CPU, this machine): {k}")
    return lines


def figures(report: dict) -> list[str]:
    """One line per figure the open issues ask for, from the report's sections (absent
    sections and values are left out): what the run prints before its status lines."""
    sec = report.get("sections", {})
    return [*_fig_env_and_tests(sec), *_fig_probes(sec), *_fig_bench(sec), *_fig_amp_and_ensembles(sec)]


def summary(report: dict) -> str:
    """The last lines of a run: the figures, then what ran, what failed or was skipped,
    and where the files are."""
    lines = figures(report)
    lines += [f"GPU check on {report['device']} (targets {', '.join(report['targets']) or 'none'}), "
              f"{report.get('total_s', 0):.0f} s of {report['budget_s']:.0f} s"]
    for name, s in report["seconds"].items():
        status = "FAILED: " + report["errors"][name].splitlines()[0] if name in report["errors"] else "ok"
        lines.append(f"  {name:18s} {s:7.1f} s  {status}")
    for name, why in report["skipped"].items():
        lines.append(f"  {name:18s} skipped: {why}")
    lines.append(f"  report: {report.get('report')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(summary(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
