"""Time per training epoch on digits: arraymlp beside scikit-learn's MLPClassifier.

Both train the same network (64 -> hidden -> 10, ReLU, softmax output, cross-entropy)
with Adam at learning rate 1e-3, mini-batches of 32 rows shuffled every epoch, no L2
penalty and no early stopping, on the same standardised 1,347 training images (a
stratified 75% of scikit-learn's bundled digits) in the same dtype, in one process.
Rounds alternate between the two (and which goes first), so that load on the machine
falls on both alike. Each sample is one ``fit`` of ``--epochs`` epochs on a fresh
model, divided by the epochs it ran; the figure is the ratio of the medians.

    python benchmarks/epoch_vs_sklearn.py [--hidden 256] [--epochs 5] [--repeat 9]
                                          [--dtype float32] [--threads N] [--backend numpy]

A ratio below 1 means arraymlp's epoch is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
import warnings


def _data(dtype: str):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, _, y_tr, _ = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    x_tr = StandardScaler().fit_transform(x_tr).astype(np.dtype(dtype))
    return x_tr, y_tr.astype(np.int64)


def _ours(x, y, *, hidden: int, epochs: int, dtype: str, backend: str, seed: int) -> float:
    """Seconds per epoch of one arraymlp fit."""
    import arraymlp as am

    model = am.MLP([x.shape[1], hidden, 10], output_activation="softmax", dtype=dtype, backend=backend, seed=seed)
    xb, yb = am.to_backend(x, backend, device=model.device), am.to_backend(y, backend, device=model.device)
    t0 = time.perf_counter()
    history = model.fit(xb, yb, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=epochs, batch_size=32,
                        seed=seed, progress=False)
    return (time.perf_counter() - t0) / history.epochs


def _sklearn(x, y, *, hidden: int, epochs: int, seed: int) -> float:
    """Seconds per epoch of one scikit-learn fit (all ``epochs`` run: no tolerance stop)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", solver="adam", learning_rate_init=1e-3,
                        batch_size=32, max_iter=epochs, alpha=0.0, shuffle=True, tol=0.0,
                        n_iter_no_change=epochs + 1, early_stopping=False, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        clf.fit(x, y)
        seconds = time.perf_counter() - t0
    return seconds / clf.n_iter_


def measure(*, hidden: int = 256, epochs: int = 5, repeat: int = 9, dtype: str = "float32", backend: str = "numpy",
            warmup: int = 1) -> dict:
    """Interleaved timings; returns the per-epoch samples, their medians and the ratio.

    Returns
    -------
    dict
        ``arraymlp`` and ``sklearn`` (lists of seconds per epoch), ``median_arraymlp``,
        ``median_sklearn`` and ``ratio`` (arraymlp / scikit-learn).
    """
    x, y = _data(dtype)
    ours, theirs = [], []
    for r in range(warmup + repeat):
        pair = [
            ("ours", lambda r=r: _ours(x, y, hidden=hidden, epochs=epochs, dtype=dtype, backend=backend, seed=r)),
            ("sklearn", lambda r=r: _sklearn(x, y, hidden=hidden, epochs=epochs, seed=r)),
        ]
        if r % 2:
            pair.reverse()
        for name, fn in pair:
            t = fn()
            if r >= warmup:
                (ours if name == "ours" else theirs).append(t)
    m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
    return {"arraymlp": ours, "sklearn": theirs, "median_arraymlp": m_ours, "median_sklearn": m_theirs,
            "ratio": m_ours / m_theirs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256, help="hidden width (default 256, the demo's)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per timed fit (default 5)")
    ap.add_argument("--repeat", type=int, default=9, help="timed rounds (default 9)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--backend", default="numpy", help="arraymlp backend (default numpy; scikit-learn is NumPy)")
    ap.add_argument("--threads", type=int, default=None,
                    help="cap BLAS/OpenMP threads for both (threadpoolctl); default: the libraries' own")
    args = ap.parse_args(argv)

    import numpy as np
    import sklearn

    import arraymlp as am

    limit = contextlib.nullcontext()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=args.threads)
    with limit:
        res = measure(hidden=args.hidden, epochs=args.epochs, repeat=args.repeat, dtype=args.dtype,
                      backend=args.backend)
    print(f"digits, 1347 training rows, MLP 64-{args.hidden}-10, Adam lr 1e-3, batch 32, {args.dtype}, "
          f"{args.epochs} epochs per fit, {args.repeat} interleaved rounds")
    print(f"arraymlp {am.__version__} ({args.backend}), scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, threads: {args.threads or 'library default'}")
    for name in ("arraymlp", "sklearn"):
        samples = " ".join(f"{1e3 * t:.1f}" for t in sorted(res[name]))
        print(f"  {name:<9} median {1e3 * res[f'median_{name}']:7.2f} ms/epoch   samples (ms): {samples}")
    print(f"ratio of medians, arraymlp / scikit-learn: {res['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
