"""Training on a sparse matrix against training on its densified copy: time per epoch and
peak memory.

The data: a CSR matrix of ``--rows`` x ``--cols`` float32 values at ``--density`` (by
default 100,000 x 50,000 at 0.1%: 50 stored values a row, about 5 million in all,
60 MB with its indices), and labels of 10 classes. The network: ``cols -> 64 -> 10``,
ReLU, softmax and cross-entropy, Adam, batches of 256 rows shuffled each epoch, float32,
on NumPy. The dense copy of the whole matrix would take rows * cols * 4 bytes (20 GB by
default), so the dense side runs on the first ``--dense-rows`` rows only (10,000 by
default: 2 GB), and so does a sparse run of those same rows; the dense time per epoch of
the whole matrix is extrapolated from it linearly in the rows (each row costs the same
dense product), its peak memory by swapping the subset's dense copy for the whole
matrix's (rows * cols * 4 bytes).

Measured, in one process: seconds per epoch (the median of ``--repeat`` epochs, each a
``fit`` of one epoch on a fresh model; rounds alternate between the variants), and the
peak of memory allocated (tracemalloc, which sees NumPy's and SciPy's arrays) during a
separate epoch of each, counted from before the input is made ready for the model: the
densifying copy counts for the dense variant, the sparse matrix (the caller's data)
does not for the sparse ones. BLAS threads: ``--threads`` (1 by default, so that a shared
machine's load disturbs less).

    python benchmarks/sparse_epoch.py [--rows 100000] [--cols 50000] [--density 0.001]
                                      [--dense-rows 10000] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import tracemalloc

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

import arraymlp as am

HIDDEN, CLASSES, BATCH = 64, 10, 256


def make_data(rows: int, cols: int, density: float, seed: int = 0):
    """A CSR matrix with ``round(cols * density)`` values per row (repeated columns of a row
    are summed, so a few rows hold one fewer), and random labels."""
    rng = np.random.default_rng(seed)
    per_row = max(1, round(cols * density))
    indices = rng.integers(0, cols, size=(rows, per_row), dtype=np.int32)
    indices.sort(axis=1)
    data = rng.random((rows, per_row), dtype=np.float32)
    indptr = np.arange(0, rows * per_row + 1, per_row, dtype=np.int64)
    x = sp.csr_matrix((data.ravel(), indices.ravel(), indptr), shape=(rows, cols))
    x.sum_duplicates()
    return x, rng.integers(0, CLASSES, size=rows)


def one_epoch(x, y, cols: int, seed: int = 0) -> float:
    """Seconds of one epoch of a fresh model on ``x`` (sparse or dense)."""
    model = am.MLP([cols, HIDDEN, CLASSES], output_activation="softmax", backend="numpy", seed=seed)
    t0 = time.perf_counter()
    model.fit(x, y, loss="cross_entropy", optimizer="adam", lr=1e-3, epochs=1, batch_size=BATCH, seed=seed,
              progress=False)
    return time.perf_counter() - t0


def peak_bytes(prepare, y, cols: int) -> int:
    """Peak bytes allocated while ``prepare()`` makes the input and one epoch trains on it."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    x = prepare()
    one_epoch(x, y, cols)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del x
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cols", type=int, default=50_000)
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--dense-rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows, cols, sub = args.rows, args.cols, min(args.dense_rows, args.rows)

    x, y = make_data(rows, cols, args.density)
    x_sub, y_sub = x[:sub], y[:sub]
    sparse_mb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 1e6
    dense_full_gb = rows * cols * 4 / 1e9
    print(f"{platform.processor() or platform.machine()}, {args.threads} BLAS thread(s); numpy {np.__version__}, "
          f"scipy {__import__('scipy').__version__}")
    print(f"data: CSR {rows} x {cols}, {x.nnz} stored float32 values ({x.nnz / (rows * cols):.4%}), "
          f"{sparse_mb:.1f} MB; dense copy would be {dense_full_gb:.1f} GB")
    print(f"network {cols} -> {HIDDEN} -> {CLASSES}, Adam, batch {BATCH}, float32; dense side on the first {sub} rows")

    with threadpool_limits(limits=args.threads):
        one_epoch(x_sub, y_sub, cols)  # warm-up (allocator, BLAS)
        times: dict[str, list[float]] = {"sparse, all rows": [], "sparse, subset": [], "dense, subset": []}
        for r in range(args.repeat):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                if name == "sparse, all rows":
                    times[name].append(one_epoch(x, y, cols))
                elif name == "sparse, subset":
                    times[name].append(one_epoch(x_sub, y_sub, cols))
                else:
                    dense = x_sub.toarray()
                    times[name].append(one_epoch(dense, y_sub, cols))
                    del dense
        peaks = {
            "sparse, all rows": peak_bytes(lambda: x, y, cols),
            "sparse, subset": peak_bytes(lambda: x_sub, y_sub, cols),
            "dense, subset": peak_bytes(lambda: x_sub.toarray(), y_sub, cols),
        }

    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nseconds per epoch (median of {}), peak MB allocated in the epoch (densifying included):".format(
        args.repeat))
    for k in times:
        print(f"  {k:<18} {med[k]:9.3f} s   {peaks[k] / 1e6:10.1f} MB   runs {[round(t, 3) for t in times[k]]}")
    dense_full_s = med["dense, subset"] * rows / sub
    # the training's own allocations do not grow with the rows; the dense copy does
    dense_full_mb = (peaks["dense, subset"] - sub * cols * 4 + rows * cols * 4) / 1e6
    print(f"\nsame {sub} rows: dense / sparse time per epoch = {med['dense, subset'] / med['sparse, subset']:.1f}x, "
          f"peak memory = {peaks['dense, subset'] / peaks['sparse, subset']:.1f}x")
    full = peaks["sparse, all rows"]
    print(f"all {rows} rows: sparse {med['sparse, all rows']:.2f} s/epoch, peak {full / 1e6:.0f} MB;"
          f" dense extrapolated (x{rows / sub:g}): {dense_full_s:.1f} s/epoch, peak ~{dense_full_mb:.0f} MB "
          f"=> time {dense_full_s / med['sparse, all rows']:.1f}x, peak memory "
          f"{dense_full_mb * 1e6 / full:.0f}x")


if __name__ == "__main__":
    main()
