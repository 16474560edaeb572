"""Data-parallel training of an ensemble equals its single-process training.

Run as ``mpiexec -n N python tests/mpi_scripts/ensemble_equivalence.py DIR [backend ...]``.
Each rank trains a copy of an ensemble (``ensemble=3``) data-parallel; the root also
trains one alone on the same data with the same seed and compares the members'
parameters, per-member losses, training metrics (the same keys, each member's values)
and early-stopping epochs. The ``partial-fit`` case makes three ``partial_fit`` calls on
chunks of the data instead of one ``fit``. Prints one JSON line per case on the root;
exits non-zero on a mismatch. ``DIR`` receives the checkpoints of the
checkpoint case (written by the root only).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

import arraymlp as am
from arraymlp._backend import to_backend, to_numpy
from arraymlp.distributed import DataParallel

comm = MPI.COMM_WORLD
dp = DataParallel(comm)
K = 3

CASES = [
    # name, dtype, optimizer, batch_size, options
    ("sgd-momentum-member-lr-odd-batch", "float64", am.SGD(lr=0.1, momentum=0.9), 63,
     {"lr": [0.05, 0.1, 0.02], "momentum": [0.9, 0.5, 0.0]}),
    ("adam-member-weights-l2", "float64", am.Adam(lr=1e-2), 50,
     {"sample_weight": "members", "l2": [1e-3, 0.0, 1e-2]}),
    # no shuffling: the first global batches hold no weight of member 2 (its L2 term only)
    ("sgd-member-folds-no-shuffle", "float64", am.SGD(lr=0.05, momentum=0.5), 50,
     {"sample_weight": "members", "shuffle": False, "l2": [0.0, 1e-3, 1e-2]}),
    ("sgd-empty-shards-shared-weights", "float64", am.SGD(lr=0.05), 1, {"n": 9, "sample_weight": "shared"}),
    ("adam-early-stopping", "float64", am.Adam(lr=1e-2), 40,
     {"lr": [0.2, 0.01, 0.05], "early_stopping": True, "epochs": 12}),
    ("checkpoint", "float64", am.Adam(lr=1e-2), 64, {"checkpoint": True}),
    ("adam-float32-shuffle-off", "float32", am.Adam(lr=1e-3), 64, {"shuffle": False}),
    # per-member folds, no shuffling: rank 0's shard of the first batch has no weight of member 2
    ("sgd-regression-member-folds", "float64", am.SGD(lr=0.02, momentum=0.5), 50,
     {"regression": True, "sample_weight": "members", "shuffle": False}),
    ("partial-fit-adam-member-weights", "float64", am.Adam(lr=1e-2), 32,
     {"partial_fit": True, "sample_weight": "members", "lr": [0.01, 0.02, 0.005]}),
]
METRICS = {False: ["accuracy", am.metrics.top_k_accuracy(2)], True: ["mae", "r2"]}
CHUNKS = [(0, 230), (230, 231), (231, 500)]  # partial_fit's calls: uneven, one row fewer than the ranks


def data(n: int, dtype: str):
    rng = np.random.default_rng(123)
    x = rng.normal(size=(n, 12)).astype(dtype)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    w = rng.uniform(0.0, 2.0, size=(K, n)).astype(dtype)
    w[0, ::7] = 0.0  # member 0 leaves some rows out, member 2 a block (a fold)
    w[2, : n // 3] = 0.0
    # regression targets away from 0 (R^2's sums are taken about a shift every rank must share)
    yr = (x[:, :2] @ np.array([[1.0, 0.5], [-0.5, 1.0]]) + np.array([4.0, -3.0])).astype(dtype)
    return x, y, yr, w


def train(backend: str, dtype: str, optimizer, batch_size: int, opts: dict, comm_arg, out: Path):
    n = opts.get("n", 500)
    x, y, yr, w = data(n, dtype)
    regression = opts.get("regression", False)
    # other ranks start from other weights: the broadcast from the root must fix that
    seed = 7 if comm_arg is None or comm.rank == 0 else 1000 + comm.rank
    model = am.MLP([12, 16, 2 if regression else 3], output_activation="identity" if regression else "softmax",
                   dtype=dtype, backend=backend, seed=seed, ensemble=K)
    xs, ys = to_backend(x, backend), to_backend(yr if regression else y, backend)
    kwargs = {"metrics": METRICS[regression]} if regression or batch_size % 2 else {}
    if opts.get("sample_weight") == "members":
        kwargs["sample_weight"] = to_backend(w, backend)
    elif opts.get("sample_weight") == "shared":
        kwargs["sample_weight"] = to_backend(w[1], backend)
    for key in ("lr", "momentum", "l2"):
        if key in opts:
            kwargs[key] = opts[key]
    if opts.get("early_stopping"):
        xv, yv, _, _ = data(120, dtype)
        kwargs["validation_data"] = (to_backend(xv[::-1].copy(), backend), to_backend(yv[::-1].copy(), backend))
        kwargs["early_stopping"] = am.EarlyStopping("val_loss", patience=1)
    if opts.get("checkpoint"):
        where = out / f"{backend}-{'dp' if comm_arg is not None else 'single'}-{comm.rank}"
        kwargs["callbacks"] = [am.Checkpoint(where)]
    loss = "mse" if regression else "cross_entropy"
    if not opts.get("partial_fit"):
        history = model.fit(
            xs, ys, loss=loss, optimizer=copy.deepcopy(optimizer), epochs=opts.get("epochs", 3),
            batch_size=batch_size, shuffle=opts.get("shuffle", True), seed=11, progress=False, comm=comm_arg,
            **kwargs,
        )
        return model, history
    # one EnsembleHistory gathering the calls' epochs
    history = None
    weights = kwargs.pop("sample_weight", None)
    model.rng = am.Generator(11, model.xp, model.device) if comm_arg is None or comm.rank == 0 else model.rng
    for i, (a, b) in enumerate(CHUNKS):
        h = model.partial_fit(xs[a:b, ...], ys[a:b, ...], loss=loss, batch_size=batch_size,
                              optimizer=copy.deepcopy(optimizer) if i == 0 else None,
                              sample_weight=None if weights is None else weights[:, a:b], comm=comm_arg,
                              metrics=kwargs.get("metrics"),
                              **({} if i else {"lr": kwargs.get("lr")}))
        if history is None:
            history = h
        else:
            history.loss += h.loss
            for key, series in h.metrics.items():
                history.metrics[key] += series
    return model, history


def main(out: Path, backends) -> int:
    failures = 0
    for backend in backends:
        for name, dtype, optimizer, batch_size, opts in CASES:
            par, hpar = train(backend, dtype, optimizer, batch_size, opts, dp, out)
            agree = dp.parameters_agree(par)
            stopped = comm.allgather(hpar.stopped_epoch.tolist())
            # the members' optimiser step count and the generator's state, on every rank
            states = comm.allgather((np.asarray(par.ensemble_optimizer_.t).tolist(),  # (one count per member)
                                     par.rng.get_state()["host"]["state"]["state"],
                                     par.rng.counter))
            if comm.rank != 0:
                continue
            ref, href = train(backend, dtype, optimizer, batch_size, opts, None, out)
            rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-6)
            worst = 0.0
            ok = agree and all(s == stopped[0] for s in stopped) and all(s == states[0] for s in states)
            ok = ok and states[0] == (np.asarray(ref.ensemble_optimizer_.t).tolist(),
                                      ref.rng.get_state()["host"]["state"]["state"],
                                      ref.rng.counter)
            for p_par, p_ref in zip(par.params, ref.params):
                for k in p_ref:
                    a, b = to_numpy(p_par[k]).astype(np.float64), to_numpy(p_ref[k]).astype(np.float64)
                    worst = max(worst, float(np.max(np.abs(a - b))))
                    ok = ok and np.allclose(a, b, rtol=rtol, atol=atol)
            loss_ok = np.allclose(np.array(hpar.loss), np.array(href.loss), rtol=rtol * 10, atol=atol * 10)
            same_keys = sorted(hpar.metrics) == sorted(href.metrics) and bool(href.metrics)
            metric_diff = max(float(np.max(np.abs(np.subtract(hpar.metrics[key], href.metrics[key]))
                                        / np.maximum(np.abs(href.metrics[key]), 1.0))) for key in href.metrics)
            ok = ok and same_keys and metric_diff <= (1e-12 if dtype == "float64" else 1e-6)
            ok = ok and all(len(hpar.metrics[key]) == len(hpar.loss) for key in href.metrics)
            same_stops = hpar.stopped_epoch.tolist() == href.stopped_epoch.tolist()
            ok = ok and loss_ok and same_stops and len(hpar.loss) == len(href.loss)
            failures += not ok
            row = {"case": name, "backend": backend, "ranks": comm.size, "ok": bool(ok), "ranks_agree": bool(agree),
                   "max_abs_diff": worst, "loss": np.array(hpar.loss).tolist(),
                   "loss_single": np.array(href.loss).tolist(), "stopped_epoch": stopped,
                   "stopped_single": href.stopped_epoch.tolist(), "steps": dp.stats["steps"],
                   "same_keys": same_keys, "metric_diff": metric_diff, "metrics": sorted(hpar.metrics)}
            if opts.get("early_stopping"):
                row["val_loss"] = np.array(hpar.val_loss).tolist()
                row["best_epochs"] = hpar.best_epochs.tolist()
            print(json.dumps(row), flush=True)
    failures = comm.bcast(failures, root=0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:] or ["numpy"]))
