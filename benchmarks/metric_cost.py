"""What the default training accuracy costs a training step.

Each sample is one ``fit`` epoch (no shuffle, plain SGD, float32) on a fresh model
(the same seed), once with ``metrics=[]`` and once with the default (accuracy for a
classification loss), alternating which goes first, so that load on the machine
falls on both alike. Times are CPU time of the calling thread (``time.thread_time``),
which a busy machine disturbs less than wall time; the figure is the ratio of the
minimum times per step.

    python benchmarks/metric_cost.py [--repeat 15] [--steps 200] [--backend numpy]

Workloads: W1 and W2 of :data:`arraymlp.bench.workloads.WORKLOADS`, and the small
``[20, 16, 2]`` network at batch 32. Run with one thread (``OMP_NUM_THREADS=1``); the
compiled kernels are loaded up front.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import arraymlp as am
from arraymlp.bench.workloads import WORKLOADS
from arraymlp.kernels import _jit

CASES = {
    "W1": (WORKLOADS["W1"].sizes, WORKLOADS["W1"].batches[0]),
    "W2": (WORKLOADS["W2"].sizes, WORKLOADS["W2"].batches[0]),
    "20-16-2": ((20, 16, 2), 32),
}


def _epoch(model, x, y, batch, metrics) -> float:
    t0 = time.thread_time()
    model.fit(x, y, loss="cross_entropy", optimizer="sgd", lr=1e-3, epochs=1, batch_size=batch, shuffle=False,
              metrics=metrics, progress=False)
    return time.thread_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    _jit.kernels()
    warnings.simplefilter("ignore")
    for name in args.cases.split(","):
        sizes, batch = CASES[name]
        steps = args.steps if sizes[0] < 200 else max(args.steps // 8, 10)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch * steps, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], size=batch * steps)
        times: dict[str, list[float]] = {"none": [], "accuracy": []}
        for r in range(args.repeat + 1):
            order = [("none", []), ("accuracy", None)]
            for key, metrics in (order if r % 2 else order[::-1]):
                t = _epoch(am.MLP(list(sizes), backend=args.backend, dtype="float32", seed=0), x, y, batch, metrics)
                if r:  # the first round warms up
                    times[key].append(t / steps)
        without, with_acc = min(times["none"]), min(times["accuracy"])
        print(f"{name:8s} batch {batch:4d}: {without * 1e6:8.1f} us/step without, {with_acc * 1e6:8.1f} us with "
              f"accuracy, ratio {with_acc / without:.3f}")


if __name__ == "__main__":
    main()
