"""The GPU check of arraymlp: one run, under one time budget, on a CUDA machine.

    python benchmarks/gpu/check.py [--out benchmarks/results] [--budget 450] [--skip SECTION ...]

Each section runs under its own share of the budget; one that fails or runs out of
time is recorded with its error and the next one runs. Everything is written to
``--out`` with the device in the name (``<device>-gpu-check.json`` with every section,
``<device>-bench.json``, ``<device>-W5.png``, ``<device>-junit.xml``), and a summary is
printed last. Sections, in the order they run:

``env``
    Versions, the device, the TF32 switches as found.
``pytest``
    ``pytest -k "cupy or cuda"`` over tests/ with TF32 off, as JUnit XML (first, so that
    the test rows' results come whatever happens later).
``host_syncs``
    Host synchronisations per training step of ``fit`` on W1 data (SGD, Adam), from the
    slope between two data lengths: CuPy's own synchronisation points counted, torch's
    synchronising calls counted by its sync debug mode. The target is 0 per step.
``launches``
    Kernel launches (CUPTI, through ``torch.profiler``) per W1 step with SGD and with
    Adam, for arraymlp[cupy], arraymlp[torch-cuda] and PyTorch eager.
``tf32_error``
    The relative error against float64 of float32 and of TF32 products (2048^3), on
    CuPy and torch.
``gemm_floor_device``
    The device time of the same GEMMs, by CUDA events around a stream that was kept
    busy while they were queued (so that no host dispatch time is counted).
``bench``
    ``arraymlp.bench`` over W1, W2 and W4 (1024-4096-4096-1024, batch 8192) in float32,
    TF32 and float16, and W5 across batch sizes on NumPy and the GPU (the CPU/GPU
    crossover and its plot); candidates arraymlp[cupy], arraymlp[torch-cuda], PyTorch
    eager on CUDA, and each target's GEMM floor (wall time).
``amp``
    Mixed precision: digits accuracy of float16 and bfloat16 training against float32,
    and the W1/W4 step time of each precision.

``--cpu-standin`` runs the same code with torch on the CPU standing in for the GPU, at
reduced sizes (for the project's tests of this script); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
# in this order: the test rows first (their JUnit file is the check's first product), the
# quick probes, then the benchmarks
SECTIONS = ("env", "pytest", "host_syncs", "launches", "tf32_error", "gemm_floor_device", "bench", "amp")
# the most each section may use of the budget (less when less is left)
CAPS = {"env": 20, "pytest": 170, "host_syncs": 30, "launches": 30, "tf32_error": 15, "gemm_floor_device": 30,
        "bench": 140, "amp": 45}


class SectionTimeout(Exception):
    """A section ran past its share of the budget."""


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
    standin: bool
    start: float = dataclasses.field(default_factory=time.perf_counter)
    device: str = "unknown-device"
    targets: list = dataclasses.field(default_factory=list)  # arraymlp.bench target names of the "GPU"
    peer_device: str = "cuda"  # torch eager's device
    partial: dict = dataclasses.field(default_factory=dict)  # what the running section has measured so far

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.device}-{suffix}"


def device_slug(name: str) -> str:
    """A file-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-device"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu/check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS, metavar="SECTION",
                    help=f"skip a section (repeatable): {', '.join(SECTIONS)}")
    ap.add_argument("--only", action="append", default=[], choices=SECTIONS, metavar="SECTION",
                    help="run only these sections (repeatable)")
    ap.add_argument("--cpu-standin", action="store_true",
                    help="torch on the CPU stands in for the GPU, at reduced sizes (tests of this script)")
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
    """W1, W2, W4, W5: full size on a GPU; reduced (W4 to 64-256-256-64, batch 256) for
    the stand-in."""
    from arraymlp import bench

    W = dict(bench.WORKLOADS)
    if ctx.standin:
        W["W1"] = dataclasses.replace(W["W1"], batches=(64,))
        W["W2"] = dataclasses.replace(W["W2"], batches=(32,))
        W["W4"] = dataclasses.replace(W["W4"], sizes=(64, 256, 256, 64), batches=(256,), gpu_only=False,
                                      dtypes=("float32",))
        W["W5"] = dataclasses.replace(W["W5"], quick_batches=(16, 256))
    return W


def _dtypes(ctx: Context) -> tuple:
    return ("float32",) if ctx.standin else ("float32", "tf32", "float16")


# ---------------------------------------------------------------------------- sections
def section_env(ctx: Context) -> dict:
    import numpy

    import arraymlp

    out = {"python": sys.version.split()[0], "arraymlp": arraymlp.__version__, "numpy": numpy.__version__,
           "standin": ctx.standin, "targets": ctx.targets,
           "env": {k: os.environ.get(k) for k in ("CUPY_TF32", "NVIDIA_TF32_OVERRIDE", "CUDA_VISIBLE_DEVICES")}}
    for mod in ("cupy", "torch", "array_api_compat", "array_api_strict"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:
            out[mod] = f"unavailable: {type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        import torch

        out["torch_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    out["device"] = ctx.device
    return out


def _count_syncs(target: str):
    """A context counting the host synchronisations of ``target`` into a list's length."""
    seen: list = []
    if target == "cupy":
        import cupy._core.syncdetect as sd

        orig = sd._declare_synchronize

        def counting():
            seen.append(1)
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


def section_host_syncs(ctx: Context) -> dict:
    """Host reads per step of ``fit``: the count at 8 and at 16 steps, and the slope."""
    if ctx.standin:
        return {"skipped": "counted through CuPy's and torch's CUDA sync hooks only"}
    import numpy

    import arraymlp as am
    from arraymlp import bench

    rng = numpy.random.default_rng(0)
    out = ctx.partial
    for target in ctx.targets:
        tgt = bench.TARGETS[target]
        for optname in ("sgd", "adam"):
            counts = {}
            for n in (2048, 4096):
                m = am.MLP([784, 512, 512, 10], output_activation="softmax", backend=tgt.backend, device=tgt.device,
                           seed=0)
                x = am.to_backend(rng.standard_normal((n, 784)).astype("float32"), tgt.backend, device=m.device)
                y = am.to_backend(rng.integers(0, 10, n), tgt.backend, device=m.device)
                with _count_syncs(target) as seen:
                    m.fit(x, y, loss="cross_entropy", optimizer=optname, epochs=1, batch_size=256, progress=False)
                counts[n // 256] = len(seen)
            out[f"W1 {optname} arraymlp[{target}]"] = {"syncs": counts, "per_step": (counts[16] - counts[8]) / 8}
    out["target"] = "0 per step"
    return out


def section_bench(ctx: Context) -> dict:
    """W1, W2, W4 in every dtype on the GPU targets; W5 on NumPy and the GPU."""
    from arraymlp import bench

    W = _workloads(ctx)
    dt = _dtypes(ctx)
    gpu_wl = [dataclasses.replace(W[k], dtypes=dt) for k in ("W1", "W2", "W4")]
    targets = [bench.TARGETS[t] for t in ctx.targets]
    if ctx.standin:  # the stand-in "GPU" is a CPU target: run it as the GPU group would
        targets = [dataclasses.replace(t, gpu=False) for t in targets]
    res = bench.run(gpu_wl, targets, repeat=3 if ctx.standin else 5, quick=True, min_time=0.0 if ctx.standin else 0.01,
                    peers=True, memory=False)
    res5 = bench.run([W["W5"]], [bench.TARGETS["numpy"], *targets], repeat=3, quick=ctx.standin,
                     min_time=0.0 if ctx.standin else 0.01, peers=False, memory=False)
    res["cases"] += res5["cases"]
    res["crossover"] = res5["crossover"]
    res["notes"] += res5["notes"]
    with open(ctx.path("bench.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1, default=str)
    png = None
    w5 = [c for c in res5["cases"] if c["workload"] == "W5"]
    if w5:
        png = str(ctx.path("W5.png"))
        bench.plot_throughput(w5, png)
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
                n = 3 if name == "W4" or ctx.standin else 50
                dev = _device_time_s(fn, target, n)
                wall = _median_s(fn, reps=3, n=n, sync=_sync(target))
                out[f"{name} {dtype} floor[{target}]"] = {
                    "device_s": dev, "wall_s": wall, "wall_over_device": wall / dev if dev else None,
                    "tflops_device": flops / dev / 1e12 if dev else None}
    return out


def _profiled_kernels(fn: Callable[[], Any], steps: int) -> dict:
    """Kernel launches and memory copies per call of ``fn`` (CUPTI via torch.profiler:
    it sees every CUDA kernel of the process, CuPy's included)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = copies = 0
    for e in prof.events():
        dev_type = str(getattr(e, "device_type", ""))
        if "CUDA" not in dev_type:
            continue
        nm = e.name.lower()
        if "memcpy" in nm or "memset" in nm:
            copies += 1
        else:
            kernels += 1
    return {"kernels_per_step": kernels / steps, "memcpy_memset_per_step": copies / steps}


def section_launches(ctx: Context) -> dict:
    if ctx.standin:
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
    out["targets_from_the_issue"] = {"sgd": "<= 22", "adam": "<= 30"}
    return out


def section_tf32_error(ctx: Context) -> dict:
    """Relative Frobenius error against float64 of float32 and TF32 products."""
    if ctx.standin:
        return {"skipped": "TF32 exists on NVIDIA GPUs (Ampere and later) only"}
    import numpy

    from arraymlp import bench

    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((2048, 2048)), rng.standard_normal((2048, 2048))
    ref = a @ b
    nrm = numpy.linalg.norm(ref)
    out = {}
    for target in ctx.targets:
        tgt = bench.TARGETS[target]
        from arraymlp._backend import canonical_device, resolve_backend, to_numpy

        xp = resolve_backend(tgt.backend)
        dev = canonical_device(xp, tgt.device)
        A, B = (xp.asarray(m.astype("float32"), device=dev) for m in (a, b))
        e32 = numpy.linalg.norm(to_numpy(A @ B).astype(numpy.float64) - ref) / nrm
        with bench.tf32(tgt, True):
            etf = numpy.linalg.norm(to_numpy(A @ B).astype(numpy.float64) - ref) / nrm
        out[target] = {"rel_err_float32": float(e32), "rel_err_tf32": float(etf), "ratio": float(etf / e32)}
    return out


def _digits():
    import numpy
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(numpy.float32)
    return X[:1400], y[:1400], X[1400:], y[1400:]


def section_amp(ctx: Context) -> dict:
    """Digits accuracy per precision on every target, and W1/W4 step times per precision."""
    import numpy

    import arraymlp as am
    from arraymlp import bench
    from arraymlp._backend import resolve_backend
    from arraymlp.losses import get_loss

    Xtr, ytr, Xte, yte = _digits()
    out = ctx.partial  # kept by the run if the section runs out of time
    out.update(digits={}, step_s={})
    reps, calls = (1, 1) if ctx.standin else (3, 10)
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
            m.fit(x, y, loss="cross_entropy", epochs=2 if ctx.standin else 20, batch_size=64, progress=False, seed=0,
                  precision=prec)
            pred = am.to_numpy(m.predict(am.to_backend(Xte, tgt.backend, device=m.device)))
            acc[prec or "float32"] = float(numpy.mean(pred == yte))
        base = acc["float32"]
        acc["within_0.5%"] = {k: abs(v - base) <= 0.005 for k, v in acc.items() if isinstance(v, float)}
        out["digits"][target] = acc
        for name in ("W1",) if ctx.standin else ("W1", "W4"):
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
    for name in ("W1",) if ctx.standin else ("W1", "W4"):
        for prec in (None, "float16", "bfloat16"):
            step, sync = _torch_autocast_step(W[name], ctx.peer_device, prec)
            out["step_s"][f"{name} {prec or 'float32'} torch eager autocast[{ctx.peer_device}]"] = _median_s(
                step, reps=reps, n=2 if name == "W4" else calls, sync=sync)
    return out


def _torch_autocast_step(wl, device: str, prec: str | None):
    """PyTorch eager's mixed-precision step of a workload: ``torch.autocast`` in ``prec``
    (float32 weights), ``GradScaler`` for float16, SGD; a host read of the loss per step,
    as arraymlp's benchmark step makes."""
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
        return loss.item()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync


def section_pytest(ctx: Context) -> dict:
    if ctx.standin:
        return {"skipped": "the GPU rows of the test suite need a GPU"}
    junit = ctx.path("junit.xml")
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0"}
    env.pop("CUPY_TF32", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cupy or cuda", "-rfE",
           f"--junitxml={junit}", "tests"]
    cap = max(10.0, min(CAPS["pytest"] - 10, ctx.left() - 15))  # ends before the section's alarm
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cap)
        tail, rc = done.stdout, done.returncode
    except subprocess.TimeoutExpired as exc:
        tail, rc = exc.stdout or "", 124
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    return {"rc": rc, "junit": str(junit), "tail": tail[-6000:]}


FUNCTIONS = {name: globals()[f"section_{name}"] for name in SECTIONS}


# ---------------------------------------------------------------------------- the run
def _gpu_targets(standin: bool) -> tuple[str, list]:
    """(device slug, arraymlp.bench target names) of this machine."""
    if standin:
        return "cpu-standin", ["torch"]
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


def run(args: argparse.Namespace, functions: dict | None = None) -> dict:
    """Run the sections and write ``<device>-gpu-check.json``; returns the report."""
    functions = FUNCTIONS if functions is None else functions
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, budget=args.budget, standin=args.cpu_standin)
    ctx.device, ctx.targets = _gpu_targets(args.cpu_standin)
    ctx.peer_device = "cpu" if args.cpu_standin else "cuda"
    report: dict = {"device": ctx.device, "targets": ctx.targets, "budget_s": args.budget, "sections": {},
                    "errors": {}, "skipped": {}, "seconds": {}}
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
        ctx.partial = {}
        try:
            with _time_limit(cap):
                report["sections"][name] = functions[name](ctx)
        except Exception as exc:  # one failing section must not stop the others
            report["errors"][name] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-3000:]
            if ctx.partial:  # what it measured before it failed
                report["sections"][name] = {**ctx.partial, "incomplete": True}
        report["seconds"][name] = round(time.perf_counter() - t0, 2)
        with open(path, "w", encoding="utf-8") as fh:  # after every section: a killed run keeps what it had
            json.dump(report, fh, indent=1, default=str)
    report["total_s"] = round(time.perf_counter() - ctx.start, 2)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, default=str)
    report["report"] = str(path)
    return report


def summary(report: dict) -> str:
    """The last lines of a run: what ran, what failed or was skipped, and where the files are."""
    lines = [f"GPU check on {report['device']} (targets {', '.join(report['targets']) or 'none'}), "
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
