"""One L-BFGS ensemble fit of K members beside K sequential one-member L-BFGS fits.

scikit-learn's digits (1,797 x 64, standardised), ``MLPClassifier(hidden_layer_sizes=(100,),
solver="lbfgs", max_iter=200)`` from :mod:`arraymlp.sklearn`: one estimator with
``n_members=K`` against K one-member estimators, member ``i``'s with the
``random_state`` whose fit member ``i`` reproduces (``member_seeds(seed, K)[i]``, see
docs/sklearn.md), so both sides do the same K runs (the same iterations and evaluations).
The ensemble side is timed with the two-loop recursion over the stacked histories (the
default) and member by member, and the recursion is also timed alone (full histories).
After a warm-up the sides alternate, in a rotating order,
``--repeat`` times; the sequential side times ``--sample`` of its K fits per round and
scales to K. Printed: each side's times, and the ratios sequential / ensemble of the
minima and of the medians. BLAS runs on ``--threads`` threads (default 1: the figure is
then about the work done, not about how a shared machine's cores are scheduled).

    python benchmarks/lbfgs_members_vs_sequential.py [--members 16] [--max-iter 200]
                                                     [--repeat 3] [--sample 4] [--threads 1]

A ratio above 1 means the ensemble is that many times faster than the sequential fits.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
import warnings


def _data():
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    return StandardScaler().fit_transform(x), y


def _estimator(**kw):
    from arraymlp.sklearn import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(100,), solver="lbfgs", **kw)


def _quiet_fit(est, x, y):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(x, y)


def ensemble_seconds(x, y, *, k: int, max_iter: int, per_member: bool) -> tuple[float, int]:
    """Seconds of one ``n_members=k`` fit, and its evaluation rounds (the most any member took)."""
    from arraymlp import optim

    optim._Members.per_member_two_loop = per_member
    try:
        t0 = time.perf_counter()
        est = _quiet_fit(_estimator(n_members=k, max_iter=max_iter, random_state=0), x, y)
        return time.perf_counter() - t0, int(est._optimizer.n_fun.max())
    finally:
        optim._Members.per_member_two_loop = False


def sequential_seconds(x, y, *, k: int, sample: int, max_iter: int) -> tuple[float, int]:
    """Seconds of ``k`` one-member fits, from ``sample`` of them timed (scaled by ``k / sample``),
    and the evaluations of those timed."""
    import numpy as np

    from arraymlp.ensemble import member_seeds

    seed = int(np.random.RandomState(0).randint(np.iinfo(np.int32).max))
    evaluations = 0
    t0 = time.perf_counter()
    for s in member_seeds(seed, k)[:sample]:
        est = _quiet_fit(_estimator(max_iter=max_iter, random_state=s), x, y)
        evaluations += est._optimizer.n_fun
    return (time.perf_counter() - t0) * k / sample, evaluations


def two_loop_seconds(*, k: int, history: int = 10, repeat: int = 50, seed: int = 0) -> dict[str, float]:
    """The two-loop recursion alone, for ``k`` members of the benchmark's network (64-100-10)
    with full histories: the fastest of ``repeat`` interleaved calls of the stacked recursion
    and of the per-member one, each giving all ``k`` directions."""
    import numpy as np

    from arraymlp.optim import LBFGS, _Members

    rng = np.random.default_rng(seed)
    shapes = [(64, 100), (1, 100), (100, 10), (1, 10)]
    arrays = [rng.standard_normal((k, *s)) for s in shapes]
    st = _Members(LBFGS(history_size=history), arrays, np, k)
    st.G = [rng.standard_normal(a.shape) for a in arrays]
    st.S = [rng.standard_normal((history, *a.shape)) * 1e-2 for a in arrays]
    st.Y = [rng.standard_normal((history, *a.shape)) * 1e-2 for a in arrays]
    st.rho[:] = rng.uniform(0.5, 2.0, size=(k, history))
    st.gamma[:] = rng.uniform(0.5, 2.0, size=k)
    st.pairs[:] = history
    best = {"stacked": np.inf, "per_member": np.inf}
    for r in range(repeat):
        for name in (("stacked", "per_member") if r % 2 == 0 else ("per_member", "stacked")):
            t0 = time.perf_counter()
            st._two_loop() if name == "stacked" else st._two_loop_each(range(k))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _threads(n: int | None):
    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sample", type=int, default=4, help="sequential fits timed per round (scaled to K)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (0: leave the library's default)")
    args = ap.parse_args(argv)
    x, y = _data()
    k, sample = args.members, min(args.sample, args.members)
    with _threads(args.threads or None):
        alone = two_loop_seconds(k=k)
    print(f"  two-loop recursion alone, K={k}, full histories of 10 pairs: stacked {alone['stacked'] * 1e3:.2f} ms, "
          f"per member {alone['per_member'] * 1e3:.2f} ms (min of 50 interleaved; per member / stacked "
          f"{alone['per_member'] / alone['stacked']:.2f}x)")
    times: dict[str, list[float]] = {"stacked": [], "per_member": [], "sequential": []}
    info = {}
    with _threads(args.threads or None):
        ensemble_seconds(x, y, k=2, max_iter=2, per_member=False)  # warm-up: imports, first calls
        sequential_seconds(x, y, k=1, sample=1, max_iter=2)
        sides = {
            "stacked": lambda: ensemble_seconds(x, y, k=k, max_iter=args.max_iter, per_member=False),
            "per_member": lambda: ensemble_seconds(x, y, k=k, max_iter=args.max_iter, per_member=True),
            "sequential": lambda: sequential_seconds(x, y, k=k, sample=sample, max_iter=args.max_iter),
        }
        names = list(sides)
        for r in range(args.repeat):
            for name in names[r % 3:] + names[:r % 3]:
                seconds, count = sides[name]()
                times[name].append(seconds)
                info[name] = count
    print(f"{platform.processor() or platform.machine()}  digits 1797x64, hidden (100,), solver='lbfgs', "
          f"max_iter={args.max_iter}, K={k}, BLAS threads={args.threads or 'default'}, "
          f"{args.repeat} interleaved rounds")
    print(f"  ensemble rounds (evaluations of all K at once): {info['stacked']}; "
          f"evaluations of {sample} sequential fits: {info['sequential']}")
    for name, label in (("stacked", "ensemble, stacked two-loop"), ("per_member", "ensemble, per-member two-loop"),
                        ("sequential", f"{k} sequential fits")):
        ts = times[name]
        print(f"  {label:32s} min {min(ts):8.2f} s  median {statistics.median(ts):8.2f} s  "
              f"(all: {', '.join(f'{t:.2f}' for t in ts)})")
    ratios = {}
    for name in ("stacked", "per_member"):
        ratios[name] = (min(times["sequential"]) / min(times[name]),
                        statistics.median(times["sequential"]) / statistics.median(times[name]))
        print(f"  sequential / ensemble ({name} two-loop): min {ratios[name][0]:.2f}x, median {ratios[name][1]:.2f}x")
    return ratios


if __name__ == "__main__":
    main()
