"""What the default training accuracy costs a training step.

Three models of the same seed take plain-SGD steps (float32, cross-entropy against
labels) on the same batches, one step each in turn: one without metrics; one adding
each batch to the training accuracy exactly as ``fit`` does (``fit`` lets the
cross-entropy's own pass count the right answers: ``arraymlp.training._step_metrics``);
and one adding it through the metric's own hook (``arraymlp.training._metrics_hook``,
the way before the count moved into the loss, and still the way of the other metrics).
Each step is timed on its own, so that load on the machine falls on all alike; the
figures are the minimum and the median time per step of each, and their ratios to the
steps without metrics.

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


def _stepper(sizes, backend, metrics: str):
    """``(step(xb, yb), model)``: one training step as ``fit``'s, without the accuracy
    (``"none"``), with it as ``fit`` counts it (``"accuracy"``), or through the metric's
    hook (``"hook"``)."""
    model = am.MLP(list(sizes), backend=backend, dtype="float32", seed=0)
    lossfn, opt = LOSSES["cross_entropy"], am.SGD(lr=1e-3)
    xp = get_namespace(model.params[0]["W"])
    accs = [] if metrics == "none" else [accuracy.start(xp, model.dtype, model.device)]
    run = types.SimpleNamespace(accs=accs, pair=T._pair_maker(model, lossfn, model._fused(lossfn)), xp=xp,
                                hits_acc=None, amp=None, dp=None, sample_weight=None, lossfn=lossfn,
                                y=xp.zeros((1,), dtype=xp.int64))
    if metrics == "accuracy":
        run.hits_acc = T._loss_counts_hits(run)
        assert run.hits_acc is accs[0]

    def step(xb, yb):
        hook, hits = T._step_metrics(run, yb)
        _, update = T._loss_then_update(model, opt, lossfn, xb, yb, None, xp=xp, on_outputs=hook, hits=hits)
        update(1e-3)

    return step, model, accs


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
        kinds = ("none", "accuracy", "hook")
        steppers = {kind: _stepper(sizes, args.backend, kind) for kind in kinds}
        model = steppers["none"][1]
        xp = get_namespace(model.params[0]["W"])
        rng = np.random.default_rng(0)
        n_batches = 16
        xs = [xp.asarray(rng.standard_normal((batch, sizes[0])).astype(np.float32), device=model.device)
              for _ in range(n_batches)]
        ys = [xp.asarray(rng.integers(0, sizes[-1], size=batch), device=model.device) for _ in range(n_batches)]
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for k in range(steps + 20):
            xb, yb = xs[k % n_batches], ys[k % n_batches]
            turn = kinds[k % 3:] + kinds[:k % 3]  # each kind first, second and third in turn
            for key in turn:
                step = steppers[key][0]
                t0 = time.perf_counter()
                step(xb, yb)
                t = time.perf_counter() - t0
                if k >= 20:  # warm-up
                    times[key].append(t)
        counts = [int(np.asarray(steppers[kind][2][0].sums[0])[0]) for kind in ("accuracy", "hook")]
        assert counts[0] == counts[1], counts  # the loss's count is the metric's
        lo = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:8s} batch {batch:4d}: min none / accuracy / hook {lo['none'] * 1e6:8.1f} / "
              f"{lo['accuracy'] * 1e6:8.1f} / {lo['hook'] * 1e6:8.1f} us (ratios {lo['accuracy'] / lo['none']:.3f}, "
              f"{lo['hook'] / lo['none']:.3f}); median {med['none'] * 1e6:8.1f} / {med['accuracy'] * 1e6:8.1f} / "
              f"{med['hook'] * 1e6:8.1f} us (ratios {med['accuracy'] / med['none']:.3f}, "
              f"{med['hook'] / med['none']:.3f})")


if __name__ == "__main__":
    main()
