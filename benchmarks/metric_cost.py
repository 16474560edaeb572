"""What the default training accuracy costs a training step.

Two models of the same seed take plain-SGD steps (float32, cross-entropy against
labels) on the same batches, one step each in turn: one without metrics, one adding
each batch to the training accuracy exactly as ``fit`` does (the hook of
``arraymlp.training._metrics_hook`` over an epoch's accumulator). Each step is timed
on its own, so that load on the machine falls on both alike; the figures are the
minimum and the median time per step of each, and their ratios.

    python benchmarks/metric_cost.py [--steps 3000] [--backend numpy] [--cases W1,W2,20-16-2]

Workloads: W1 and W2 of :data:`arraymlp.bench.workloads.WORKLOADS`, and the small
``[20, 16, 2]`` network at batch 32. Run with one thread (``OMP_NUM_THREADS=1``); the
compiled kernels are loaded up front.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import numpy as np

import arraymlp as am
from arraymlp import training as T
from arraymlp._backend import get_namespace
from arraymlp.bench.workloads import WORKLOADS
from arraymlp.kernels import _jit
from arraymlp.losses import LOSSES
from arraymlp.metrics import accuracy

CASES = {
    "W1": (WORKLOADS["W1"].sizes, WORKLOADS["W1"].batches[0]),
    "W2": (WORKLOADS["W2"].sizes, WORKLOADS["W2"].batches[0]),
    "20-16-2": ((20, 16, 2), 32),
}


def _stepper(sizes, backend, metrics: bool):
    """``(step(xb, yb), model)``: one training step as ``fit``'s, with or without the
    accuracy of the batch added to an epoch's accumulator."""
    model = am.MLP(list(sizes), backend=backend, dtype="float32", seed=0)
    lossfn, opt = LOSSES["cross_entropy"], am.SGD(lr=1e-3)
    xp = get_namespace(model.params[0]["W"])
    accs = [accuracy.start(xp, model.dtype, model.device)] if metrics else []
    run = types.SimpleNamespace(accs=accs, pair=T._pair_maker(model, lossfn, model._fused(lossfn)), xp=xp)

    def step(xb, yb):
        hook = T._metrics_hook(run, yb) if metrics else None
        _, update = T._loss_then_update(model, opt, lossfn, xb, yb, None, xp=xp, on_outputs=hook)
        update(1e-3)

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    _jit.kernels()
    for name in args.cases.split(","):
        sizes, batch = CASES[name]
        steps = args.steps if sizes[0] < 200 else max(args.steps // 10, 20)
        (plain, model), (with_acc, _) = _stepper(sizes, args.backend, False), _stepper(sizes, args.backend, True)
        xp = get_namespace(model.params[0]["W"])
        rng = np.random.default_rng(0)
        n_batches = 16
        xs = [xp.asarray(rng.standard_normal((batch, sizes[0])).astype(np.float32), device=model.device)
              for _ in range(n_batches)]
        ys = [xp.asarray(rng.integers(0, sizes[-1], size=batch), device=model.device) for _ in range(n_batches)]
        times: dict[str, list[float]] = {"none": [], "accuracy": []}
        for k in range(steps + 20):
            xb, yb = xs[k % n_batches], ys[k % n_batches]
            pair = (("none", plain), ("accuracy", with_acc))
            for key, step in (pair if k % 2 else pair[::-1]):
                t0 = time.perf_counter()
                step(xb, yb)
                t = time.perf_counter() - t0
                if k >= 20:  # warm-up
                    times[key].append(t)
        lo = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:8s} batch {batch:4d}: min {lo['none'] * 1e6:8.1f} / {lo['accuracy'] * 1e6:8.1f} us "
              f"(ratio {lo['accuracy'] / lo['none']:.3f}), median {med['none'] * 1e6:8.1f} / "
              f"{med['accuracy'] * 1e6:8.1f} us (ratio {med['accuracy'] / med['none']:.3f})")


if __name__ == "__main__":
    main()
