"""Data-parallel training equals single-process training on the same global batches.

Run as ``mpiexec -n N python tests/mpi_scripts/equivalence.py [backend ...]``. Each
rank trains a copy of the model data-parallel; the root also trains one alone on the
same data with the same seed, and compares the parameters. Prints one JSON line per
case on the root; exits non-zero on a mismatch.
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
]


def data(n: int, dtype: str):
    rng = np.random.default_rng(123)
    x = rng.normal(size=(n, 12)).astype(dtype)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    w = rng.uniform(0.0, 2.0, size=n).astype(dtype)
    w[::7] = 0.0
    return x, y, w


def train(backend: str, dtype: str, optimizer, batch_size: int, opts: dict, comm_arg):
    import copy

    n = opts.get("n", 500)
    x, y, w = data(n, dtype)
    # Other ranks start from other weights: the broadcast from the root must fix that.
    seed = 7 if comm_arg is None or comm.rank == 0 else 1000 + comm.rank
    model = am.MLP([12, 16, 16, 3], output_activation="softmax", dtype=dtype, backend=backend, seed=seed)
    xs, ys = to_backend(x, backend), to_backend(y, backend)
    kwargs = {"sample_weight": to_backend(w, backend)} if opts.get("sample_weight") else {}
    history = model.fit(
        xs, ys, loss="cross_entropy", optimizer=copy.deepcopy(optimizer), epochs=3, batch_size=batch_size,
        shuffle=opts.get("shuffle", True), seed=11, l2=opts.get("l2", 0.0), progress=False, comm=comm_arg,
        **kwargs,
    )
    return model, history


def main(backends) -> int:
    failures = 0
    for backend in backends:
        for name, dtype, optimizer, batch_size, opts in CASES:
            par, hpar = train(backend, dtype, optimizer, batch_size, opts, dp)
            agree = dp.parameters_agree(par)
            if comm.rank != 0:
                continue
            ref, href = train(backend, dtype, optimizer, batch_size, opts, None)
            rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-6)
            worst = 0.0
            ok = agree
            for p_par, p_ref in zip(par.params, ref.params):
                for k in p_ref:
                    a, b = to_numpy(p_par[k]).astype(np.float64), to_numpy(p_ref[k]).astype(np.float64)
                    worst = max(worst, float(np.max(np.abs(a - b))))
                    ok = ok and np.allclose(a, b, rtol=rtol, atol=atol)
            loss_ok = np.allclose(hpar.loss, href.loss, rtol=rtol * 10, atol=atol * 10)
            ok = ok and loss_ok
            failures += not ok
            print(json.dumps({
                "case": name, "backend": backend, "ranks": comm.size, "ok": bool(ok),
                "ranks_agree": bool(agree), "max_abs_diff": worst, "loss": hpar.loss, "loss_single": href.loss,
            }), flush=True)
    failures = comm.bcast(failures, root=0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["numpy"]))
