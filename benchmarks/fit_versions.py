"""A small plain fit, and its optimiser step alone, timed in two or more versions of
the library: separate processes, alternating, so that load on the machine falls on
every version alike.

The fit is the plain model of the ensemble benchmark: 64-32-10 (ReLU, softmax output,
cross-entropy), digits-sized data (1,797 x 64), Adam at 1e-3 (``--optimizer``),
batches of 64, 2 epochs, NumPy float32 by default. Each process imports the version
named by its source folder, loads the compiled kernels, warms up with one fit, then
takes ``--fits`` fits and ``--steps`` optimiser steps over the model's parameters
(``opt.step`` alone, the gradients made once), each timed by the CPU time of the
calling thread, and reports the minimum and median. The driver prints, per version,
the minimum and median over its processes of those per-process minima (and medians),
and each version's ratio to the first, with the load average.

    python benchmarks/fit_versions.py --src before=/path/to/old/src --src after=src --rounds 6

One BLAS thread (``OPENBLAS_NUM_THREADS=1`` and torch's one thread) unless
``--threads`` says otherwise. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> dict:
    import numpy as np

    import arraymlp as am
    from arraymlp.kernels import _jit

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
    _jit.kernels()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1797, 64)).astype(args.dtype)
    y = rng.integers(0, 10, size=1797)
    xb, yb = am.to_backend(x, args.backend), am.to_backend(y, args.backend)
    kw = {"loss": "cross_entropy", "optimizer": args.optimizer, "lr": 1e-3, "epochs": args.epochs,
          "batch_size": 64, "seed": 1, "progress": False}
    clock = time.thread_time

    def fit():
        model = am.MLP([64, 32, 10], output_activation="softmax", seed=0, backend=args.backend, dtype=args.dtype)
        t0 = clock()
        model.fit(xb, yb, **kw)
        return clock() - t0

    fit()
    fits = [fit() for _ in range(args.fits)]
    model = am.MLP([64, 32, 10], output_activation="softmax", seed=0, backend=args.backend, dtype=args.dtype)
    opt = am.get_optimizer(args.optimizer, lr=1e-3)
    grads = [{k: v * 1e-3 for k, v in layer.items()} for layer in model.params]
    for _ in range(20):
        model.params = opt.step(model.params, grads)
    steps = []
    for _ in range(args.steps):
        t0 = clock()
        for _ in range(50):
            model.params = opt.step(model.params, grads)
        steps.append((clock() - t0) / 50)
    return {"fit": fits, "step": steps, "file": am.__file__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", default=[], help="LABEL=FOLDER holding the arraymlp package")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--fits", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    versions = [s.split("=", 1) for s in args.src]
    if len(versions) < 2:
        ap.error("give at least two --src LABEL=FOLDER")
    opts = [f"--{k}={getattr(args, k)}" for k in ("fits", "steps", "epochs", "optimizer", "backend", "dtype",
                                                   "threads")]
    results: dict[str, list[dict]] = {label: [] for label, _ in versions}
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    for r in range(args.rounds):
        order = versions if r % 2 == 0 else versions[::-1]
        for label, folder in order:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(folder), "OPENBLAS_NUM_THREADS": str(args.threads),
                   "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run([sys.executable, __file__, "--child", *opts], env=env, capture_output=True,
                                 text=True, check=True)
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    first = None
    for label, runs in results.items():
        line = [f"{label:10s} ({os.path.dirname(runs[0]['file'])})"]
        summary = {}
        for key, unit, scale in (("fit", "ms", 1e3), ("step", "us", 1e6)):
            mins = [min(run[key]) for run in runs]
            meds = [statistics.median(run[key]) for run in runs]
            summary[key] = (min(mins), statistics.median(meds))
            line.append(f"{key}: min {min(mins) * scale:.2f} {unit}, median {statistics.median(meds) * scale:.2f} "
                        f"{unit}")
        if first is None:
            first = summary
        else:
            line.append("ratios to the first: " + ", ".join(
                f"{k} {summary[k][0] / first[k][0]:.3f} (min) {summary[k][1] / first[k][1]:.3f} (median)"
                for k in summary))
        print("\n    ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
