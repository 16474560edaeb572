"""Data-parallel training equals single-process training on the same global batches.

Run as ``mpiexec -n N python tests/mpi_scripts/equivalence.py [backend ...]``. Each
rank trains a copy of the model data-parallel; the root also trains one alone on the
same data with the same seed, and compares the parameters and the histories (loss and
training metrics). The ``partial-fit`` cases make three ``partial_fit`` calls on chunks
of the data instead of one ``fit`` and also compare the optimiser's step count and the
generator's state. Prints one JSON line per case on the root, and one for the check
that ranks passing different arguments all raise; exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mpi4py import MPI

import arraymlp as am
from arraymlp._backend import to_backend, to_numpy
from arraymlp.distributed import DataParallel

comm = MPI.COMM_WORLD
dp = DataParallel(comm)

CASES = [
    # name, dtype, optimizer, batch_size, options; tolerances follow the dtype
    ("sgd-momentum-odd-batch", "float64", am.SGD(lr=0.1, momentum=0.9), 63, {}),
    ("adam-weights-l2", "float64", am.Adam(lr=1e-2), 50, {"sample_weight": True, "l2": 1e-3}),
    ("sgd-empty-shards", "float64", am.SGD(lr=0.05), 1, {"n": 9}),
    ("adam-float32-shuffle-off", "float32", am.Adam(lr=1e-3), 64, {"shuffle": False}),
    # rank 0's shard of the first batch has only zero weights (no gradient, but rows the metrics count)
    ("sgd-regression-zero-weight-shard", "float64", am.SGD(lr=0.02, momentum=0.5), 50,
     {"regression": True, "sample_weight": "block", "shuffle": False}),
    ("partial-fit-adam-weights", "float64", am.Adam(lr=1e-2), 32, {"partial_fit": True, "sample_weight": True}),
    ("partial-fit-regression-float32", "float32", am.Adam(lr=1e-3), 16,
     {"partial_fit": True, "regression": True}),
]
METRICS = {False: ["accuracy", am.metrics.top_k_accuracy(2)], True: ["mae", "r2"]}
CHUNKS = [(0, 230), (230, 231), (231, 500)]  # partial_fit's calls: uneven, one row fewer than the ranks


def data(n: int, dtype: str):
    rng = np.random.default_rng(123)
    x = rng.normal(size=(n, 12)).astype(dtype)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    w = rng.uniform(0.0, 2.0, size=n).astype(dtype)
    w[::7] = 0.0
    # regression targets away from 0 (R^2's sums are taken about a shift every rank must share)
    yr = (x[:, :2] @ np.array([[1.0, 0.5], [-0.5, 1.0]]) + np.array([4.0, -3.0])).astype(dtype)
    return x, y, yr, w


def train(backend: str, dtype: str, optimizer, batch_size: int, opts: dict, comm_arg):
    import copy

    n = opts.get("n", 500)
    x, y, yr, w = data(n, dtype)
    regression = opts.get("regression", False)
    if opts.get("sample_weight") == "block":
        w[:20] = 0.0
    # Other ranks start from other weights: the broadcast from the root must fix that.
    seed = 7 if comm_arg is None or comm.rank == 0 else 1000 + comm.rank
    sizes = [12, 16, 16, 2 if regression else 3]
    model = am.MLP(sizes, output_activation="identity" if regression else "softmax", dtype=dtype, backend=backend,
                   seed=seed)
    xs, ys = to_backend(x, backend), to_backend(yr if regression else y, backend)
    ws = to_backend(w, backend) if opts.get("sample_weight") else None
    loss = "mse" if regression else "cross_entropy"
    if not opts.get("partial_fit"):
        history = model.fit(
            xs, ys, loss=loss, optimizer=copy.deepcopy(optimizer), epochs=3, batch_size=batch_size,
            shuffle=opts.get("shuffle", True), seed=11, l2=opts.get("l2", 0.0), progress=False, comm=comm_arg,
            sample_weight=ws, metrics=METRICS[regression],
        )
        return model, [history]
    histories = []
    model.rng = am.Generator(11, model.xp, model.device) if comm_arg is None or comm.rank == 0 else model.rng
    for i, (a, b) in enumerate(CHUNKS):
        histories.append(model.partial_fit(
            xs[a:b, ...], ys[a:b, ...], loss=loss, optimizer=copy.deepcopy(optimizer) if i == 0 else None,
            batch_size=batch_size, sample_weight=None if ws is None else ws[a:b], metrics=METRICS[regression],
            comm=comm_arg))
    return model, histories


def history_diff(hpar, href) -> tuple[bool, float, float]:
    """Whether two runs' histories have the same keys and lengths; the largest
    differences of their losses and of their training metrics, relative to the
    single-process values (absolute below 1)."""

    def diff(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))

    same = all(len(a.loss) == len(b.loss) and sorted(a.metrics) == sorted(b.metrics) for a, b in zip(hpar, href))
    same = same and len(hpar) == len(href) and all(sorted(b.metrics) != [] for b in href)
    loss = max(diff(a.loss, b.loss) for a, b in zip(hpar, href))
    metric = max(diff(a.metrics[k], b.metrics[k]) for a, b in zip(hpar, href) for k in b.metrics)
    return same, loss, metric


def disagreement() -> dict:
    """Ranks that pass different batch sizes all raise, naming the argument."""
    model = am.MLP([12, 4, 3], output_activation="softmax", dtype="float64", backend="numpy", seed=0)
    x, y, _, _ = data(40, "float64")
    try:
        model.partial_fit(x, y, loss="cross_entropy", batch_size=8 + comm.rank, comm=dp)
    except ValueError as exc:
        return {"raised": True, "message": str(exc)}
    return {"raised": False, "message": ""}


def main(backends) -> int:
    failures = 0
    for backend in backends:
        for name, dtype, optimizer, batch_size, opts in CASES:
            par, hpar = train(backend, dtype, optimizer, batch_size, opts, dp)
            agree = dp.parameters_agree(par)
            states = comm.allgather((par.optimizer_.step_count, par.rng.get_state()["host"]["state"]["state"],
                                     par.rng.counter))
            if comm.rank != 0:
                continue
            ref, href = train(backend, dtype, optimizer, batch_size, opts, None)
            rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-6)
            worst = 0.0
            ok = agree and all(s == states[0] for s in states)
            ok = ok and states[0] == (ref.optimizer_.step_count, ref.rng.get_state()["host"]["state"]["state"],
                                      ref.rng.counter)
            for p_par, p_ref in zip(par.params, ref.params):
                for k in p_ref:
                    a, b = to_numpy(p_par[k]).astype(np.float64), to_numpy(p_ref[k]).astype(np.float64)
                    worst = max(worst, float(np.max(np.abs(a - b))))
                    ok = ok and np.allclose(a, b, rtol=rtol, atol=atol)
            same_keys, loss_diff, metric_diff = history_diff(hpar, href)
            ok = ok and same_keys and loss_diff <= atol * 10 and metric_diff <= (1e-12 if dtype == "float64" else 1e-6)
            failures += not ok
            print(json.dumps({
                "case": name, "backend": backend, "ranks": comm.size, "ok": bool(ok),
                "ranks_agree": bool(agree), "max_abs_diff": worst, "loss": [h.loss for h in hpar],
                "loss_single": [h.loss for h in href], "same_keys": same_keys, "loss_diff": loss_diff,
                "metric_diff": metric_diff, "metrics": sorted(hpar[0].metrics), "steps": ref.steps_,
            }), flush=True)
    if comm.size > 1:
        result = disagreement()
        results = comm.gather(result, root=0)
        if comm.rank == 0:
            ok = all(r["raised"] and "batch_size differs: 8 on rank 0, 9 on rank 1" in r["message"] for r in results)
            failures += not ok
            print(json.dumps({"case": "disagreement", "ranks": comm.size, "ok": ok, "results": results}), flush=True)
    failures = comm.bcast(failures, root=0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["numpy"]))
