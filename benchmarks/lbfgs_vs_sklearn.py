"""solver="lbfgs" beside scikit-learn's: held-out score and time per iteration.

On digits, iris (MLPClassifier, accuracy) and diabetes (MLPRegressor, R^2), for each seed:
a held-out quarter (stratified for the classifiers) split off with that seed, the inputs
(and diabetes' target) standardised on the training part (StandardScaler), then arraymlp's and scikit-learn's
estimators trained with ``solver="lbfgs"`` and the same hidden sizes, ``alpha``,
``max_iter``, ``max_fun``, ``tol`` and ``random_state`` (with ``solver="lbfgs"`` arraymlp
draws the initial weights scikit-learn draws for that ``random_state``, and its L-BFGS
takes scipy's L-BFGS-B iterates, so the two fits differ only by rounding). The two fits
of a seed run back to back, the order alternating from seed to seed, so that load on
the machine falls on both alike; time per iteration is a fit's wall time over its
``n_iter_`` (the fastest of ``--repeat`` identical fits), and the figure is the ratio
of ours to scikit-learn's, per seed and the median over seeds.

    python benchmarks/lbfgs_vs_sklearn.py [--seeds 5] [--hidden 100] [--dtype float64]
                                          [--backend numpy] [--threads 1] [--repeat 3]

A ratio below 1 means arraymlp's iteration is faster. The iterations and the training
loss each reached (``loss_``, the same objective in both) are printed beside the held-out
score, and per data set the means, the seeds on which the scores are equal, and the
median ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
import warnings

DATASETS = ("digits", "iris", "diabetes")


def _split(name: str, seed: int):
    import numpy as np
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    stratify = None if name == "diabetes" else y
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=stratify)
    sc = StandardScaler().fit(x_tr)
    if stratify is None:  # the regression target too (R^2 is the same on either scale)
        mean, std = y_tr.mean(), y_tr.std()
        y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
    return sc.transform(x_tr), sc.transform(x_te), np.asarray(y_tr), np.asarray(y_te)


def _fit(est, x_tr, y_tr, x_te, y_te) -> tuple[float, int, float, float]:
    """(held-out score, iterations, seconds per iteration, final training loss) of one fit."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=200 is often reached, by both
        t0 = time.perf_counter()
        est.fit(x_tr, y_tr)
        seconds = time.perf_counter() - t0
    return float(est.score(x_te, y_te)), int(est.n_iter_), seconds / max(int(est.n_iter_), 1), float(est.loss_)


def _pair(name: str, seed: int, args):
    from sklearn import neural_network
    from sklearn.base import clone

    import arraymlp.sklearn as ours

    kind = "MLPRegressor" if name == "diabetes" else "MLPClassifier"
    common = dict(hidden_layer_sizes=(args.hidden,), solver="lbfgs", max_iter=args.max_iter, random_state=seed)
    x_tr, x_te, y_tr, y_te = _split(name, seed)
    mine = getattr(ours, kind)(dtype=args.dtype, backend=args.backend, **common)
    theirs = getattr(neural_network, kind)(**common)
    runs_a, runs_b = [], []
    for r in range(args.repeat):  # the same fit again (same seed, same result), the order alternating
        if (seed + r) % 2:
            runs_b.append(_fit(clone(theirs), x_tr, y_tr, x_te, y_te))
            runs_a.append(_fit(clone(mine), x_tr, y_tr, x_te, y_te))
        else:
            runs_a.append(_fit(clone(mine), x_tr, y_tr, x_te, y_te))
            runs_b.append(_fit(clone(theirs), x_tr, y_tr, x_te, y_te))
    # the fastest of the repeats (the least disturbed by the machine's other load)
    return min(runs_a, key=lambda run: run[2]), min(runs_b, key=lambda run: run[2])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for both (0: the library default)")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--repeat", type=int, default=3, help="fits per seed and library; the fastest is kept")
    args = parser.parse_args(argv)

    limit = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=args.threads)
        if args.backend == "torch":  # torch's own pool, which threadpoolctl does not reach
            import torch

            torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"backend={args.backend}, dtype={args.dtype}, hidden=({args.hidden},), max_iter={args.max_iter}, "
          f"threads={args.threads or 'default'}")
    print(f"{'data':<9} {'seed':>4} {'ours':>8} {'sklearn':>8} {'it ours':>8} {'it skl':>7} {'loss ours':>10} "
          f"{'loss skl':>10} {'s/it ours':>10} {'s/it skl':>10} {'ratio':>6}")
    with limit:
        for name in args.datasets:
            rows = []
            for seed in range(args.seeds):
                (sa, ia, ta, la), (sb, ib, tb, lb) = _pair(name, seed, args)
                rows.append((sa, sb, ta / tb, ia == ib and sa == sb))
                print(f"{name:<9} {seed:>4} {sa:>8.4f} {sb:>8.4f} {ia:>8} {ib:>7} {la:>10.3e} {lb:>10.3e} "
                      f"{ta:>10.2e} {tb:>10.2e} {ta / tb:>6.2f}", flush=True)
            metric = "R^2" if name == "diabetes" else "accuracy"
            mean_a = statistics.fmean(r[0] for r in rows)
            mean_b = statistics.fmean(r[1] for r in rows)
            ratio = statistics.median(r[2] for r in rows)
            same = sum(r[3] for r in rows)
            print(f"{name:<9} mean {metric}: ours {mean_a:.4f}, scikit-learn {mean_b:.4f} (equal iterations and "
                  f"score on {same} of {len(rows)} seeds); time per iteration, median ratio ours/scikit-learn: "
                  f"{ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
