"""What each member's own randomness costs an ensemble fit.

K members of 64-32-10 (ReLU, dropout, softmax output, cross-entropy) on digits-sized
data (1,797 x 64, standard normal features, 10 random classes), Adam, batches of 64, one
process. Two comparisons, each a ratio of one fit's seconds (minimum, and median, over
rounds that alternate the two sides and which goes first):

* **dropout**: each member drawing its own masks (one pass over K streams,
  :func:`arraymlp._backend.member_counter_bits`) against the earlier single draw of one
  stream for all members (``MemberGenerators.bits`` replaced by the shared generator's
  ``Generator.bits``), with dropout on the hidden layer only, and on the input too (there
  each member's masks make the first layer's input (K, batch, 64) instead of one
  (batch, 64) every member shares);
* **shuffle**: ``shuffle="members"`` (each member its own order: (K, batch, 64) rows
  gathered per step, the first layer's product batched over the members) against the
  shared order (``shuffle=True``), without dropout.

    python benchmarks/ensemble_members.py [--members 64] [--epochs 2] [--repeat 7]
                                          [--backend numpy] [--dtype float32]

A ratio above 1 means the per-member variant is that many times slower.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _data(dtype: str, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((1797, 64)).astype(dtype), rng.integers(0, 10, size=1797)


def _model(k: int, backend: str, dtype: str, input_dropout: bool, dropout: float):
    import arraymlp as am

    layers = ([am.Dropout(0.2)] if input_dropout else []) + [am.Dense(64, 32), am.ReLU()]
    layers += ([am.Dropout(dropout)] if dropout else []) + [am.Dense(32, 10), am.Softmax()]
    return am.Sequential(layers, ensemble=k, seed=0, backend=backend, dtype=dtype)


def fit_seconds(x, y, *, k, epochs, backend, dtype, input_dropout=False, dropout=0.0, shuffle=True,
                shared_masks=False) -> float:
    """Seconds of one ensemble fit; ``shared_masks``: the earlier single-stream draw."""
    import arraymlp as am
    from arraymlp._backend import Generator, MemberGenerators

    model = _model(k, backend, dtype, input_dropout, dropout)
    xb, yb = am.to_backend(x, backend), am.to_backend(y, backend)
    saved = MemberGenerators.bits
    if shared_masks:
        MemberGenerators.bits = Generator.bits
    try:
        t0 = time.perf_counter()
        model.fit(xb, yb, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=epochs, batch_size=64,
                  shuffle=shuffle, seed=1, progress=False)
        return time.perf_counter() - t0
    finally:
        MemberGenerators.bits = saved


def compare(x, y, a: dict, b: dict, *, repeat: int, **common) -> tuple[float, float]:
    """(min ratio, median ratio) of ``b``'s seconds over ``a``'s, rounds interleaved."""
    fit_seconds(x, y, **common, **a)  # warm-up (compiled kernels, caches)
    fit_seconds(x, y, **common, **b)
    ta, tb = [], []
    for r in range(repeat):
        for side in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            side[1].append(fit_seconds(x, y, **common, **side[0]))
    return min(tb) / min(ta), statistics.median(tb) / statistics.median(ta)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    x, y = _data(args.dtype)
    common = dict(k=args.members, epochs=args.epochs, backend=args.backend, dtype=args.dtype)
    rows = [
        ("dropout 0.2 on the hidden layer: own masks / one shared draw",
         dict(dropout=0.2, shared_masks=True), dict(dropout=0.2)),
        ("dropout 0.2 on input and hidden layer: own masks / one shared draw",
         dict(dropout=0.2, input_dropout=True, shared_masks=True), dict(dropout=0.2, input_dropout=True)),
        ('shuffle="members" / shuffle=True (no dropout)', dict(shuffle=True), dict(shuffle="members")),
    ]
    print(f"K={args.members}, 64-32-10 on 1797 x 64, Adam, batch 64, {args.epochs} epochs, {args.backend} "
          f"{args.dtype}, {args.repeat} interleaved rounds")
    for label, a, b in rows:
        lo, med = compare(x, y, a, b, repeat=args.repeat, **common)
        print(f"  {label}: {lo:.2f} (min)  {med:.2f} (median)", flush=True)


if __name__ == "__main__":
    main()
