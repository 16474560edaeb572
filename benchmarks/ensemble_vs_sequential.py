"""One ensemble fit of K members beside K sequential fits of plain models.

K members of 64-32-10 (ReLU, softmax output, cross-entropy) on digits-sized data
(1,797 x 64, standard normal features, 10 random classes), Adam at learning rate 1e-3,
mini-batches of 64 rows shuffled every epoch, in one process: ``MLP(..., ensemble=K)``
trained by one ``fit``, against K plain models ``MLP(..., seed=member_seeds[i])`` each
trained by its own ``fit``. Both sides warm up first (the compiled NumPy kernels loaded,
one short fit each), then rounds alternate between them, and which goes first, so that
load on the machine falls on both alike. A sample of the sequential side times
``--sample`` of the K fits and scales to K (the fits are alike); the figure is the ratio
of the minima.

    python benchmarks/ensemble_vs_sequential.py [--members 64] [--epochs 2] [--repeat 5]
                                                [--backend numpy] [--dtype float32]

A ratio above 1 means the ensemble is that many times faster than the sequential fits.
"""

from __future__ import annotations

import argparse
import platform
import time


def _data(dtype: str, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((1797, 64)).astype(dtype), rng.integers(0, 10, size=1797)


def _fit_kwargs(epochs: int) -> dict:
    return {"loss": "cross_entropy", "optimizer": "adam", "lr": 1e-3, "epochs": epochs, "batch_size": 64,
            "seed": 1, "progress": False}


def ensemble_seconds(x, y, *, k: int, epochs: int, backend: str, dtype: str) -> float:
    """Seconds of one ensemble fit of ``k`` members."""
    import arraymlp as am

    model = am.MLP([64, 32, 10], output_activation="softmax", ensemble=k, seed=0, backend=backend, dtype=dtype)
    xb, yb = am.to_backend(x, backend), am.to_backend(y, backend)
    t0 = time.perf_counter()
    model.fit(xb, yb, **_fit_kwargs(epochs))
    return time.perf_counter() - t0


def sequential_seconds(x, y, *, k: int, sample: int, epochs: int, backend: str, dtype: str) -> float:
    """Seconds of ``k`` plain fits, from ``sample`` of them timed (``k / sample`` times)."""
    import arraymlp as am
    from arraymlp.ensemble import member_seeds

    seeds = member_seeds(0, k)[:sample]
    xb, yb = am.to_backend(x, backend), am.to_backend(y, backend)
    t0 = time.perf_counter()
    for s in seeds:
        model = am.MLP([64, 32, 10], output_activation="softmax", seed=s, backend=backend, dtype=dtype)
        model.fit(xb, yb, **_fit_kwargs(epochs))
    return (time.perf_counter() - t0) * k / len(seeds)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sample", type=int, default=16, help="sequential fits timed per round (scaled to K)")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    x, y = _data(args.dtype)
    from arraymlp.kernels import _jit

    _jit.kernels()  # the compiled NumPy kernels loaded before any round (not in the first timed one)
    common = {"epochs": args.epochs, "backend": args.backend, "dtype": args.dtype}
    ensemble_seconds(x, y, k=args.members, **{**common, "epochs": 1})  # warm-up: imports, compiled kernels
    sequential_seconds(x, y, k=1, sample=1, **{**common, "epochs": 1})
    ens, seq = [], []
    for r in range(args.repeat):
        sides = [lambda: ens.append(ensemble_seconds(x, y, k=args.members, **common)),
                 lambda: seq.append(sequential_seconds(x, y, k=args.members, sample=min(args.sample, args.members),
                                                       **common))]
        for side in sides if r % 2 == 0 else sides[::-1]:
            side()
    ratio = min(seq) / min(ens)
    print(f"{platform.processor() or platform.machine()}  backend={args.backend} dtype={args.dtype} "
          f"K={args.members} epochs={args.epochs} batch=64 Adam, {args.repeat} interleaved rounds")
    print(f"  one ensemble fit      min {min(ens):8.3f} s   (all: {', '.join(f'{t:.3f}' for t in ens)})")
    print(f"  {args.members} sequential fits  min {min(seq):8.3f} s   (all: {', '.join(f'{t:.3f}' for t in seq)})")
    print(f"  ensemble speed-up: {ratio:.1f}x")
    return ratio


if __name__ == "__main__":
    main()
