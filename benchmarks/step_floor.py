"""A training step against its GEMM floor, per workload, backend, optimiser and dtype.

Each case times, interleaved in rounds (:func:`arraymlp.bench.interleaved`), one
training step as ``fit`` takes it (forward, fused loss, backward, the optimiser's
update; plain SGD folded into backpropagation) and the same step's matrix products
alone (:func:`arraymlp.bench.make_gemm_floor`), and prints the minimum and median of
each and their ratios, with the load average before and after.

    python benchmarks/step_floor.py                          # W1, W2, W5 at 256, S; numpy, torch
    python benchmarks/step_floor.py --workload W1 --backend numpy --optimizer adam --dtype float32
    python benchmarks/step_floor.py --json out.json          # every sample, to compare two versions
    python benchmarks/step_floor.py --compare a1.json,a2.json b1.json,b2.json   # B against A

``--compare`` reads the JSON files of two versions (several runs each, alternated in
time), and prints for every case B's time over A's (the minimum over all runs of each,
and the median of the runs' medians) and each version's step over its floor (the
same). Nothing is timed then.

``S`` is the small plain network of the ensemble workload (64-32-10, batch 64). The
work runs with one thread per pool (``--threads``) unless told otherwise: steadier on
a shared machine. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy

CASES = {  # name: (sizes, batch)
    "W1": ((784, 512, 512, 10), 256),
    "W2": ((64, 128, 10), 32),
    "W5": ((64, 64, 64, 64, 64, 10), 256),
    "S": ((64, 32, 10), 64),
}


def make_step(backend: str, sizes, batch: int, optimizer: str, dtype: str):
    """One training step of ``sizes`` on a batch, as ``fit`` takes it."""
    import arraymlp as am
    from arraymlp._backend import resolve_backend
    from arraymlp.bench import train_step
    from arraymlp.bench.workloads import TARGETS, _host_data
    from arraymlp.losses import get_loss

    target = TARGETS[backend]
    model = am.MLP(list(sizes), activation="relu", output_activation="softmax", dtype=dtype,
                   backend=target.backend, device=target.device, seed=0)
    xp = resolve_backend(target.backend)
    xh, yh = _host_data(sizes, batch, "cross_entropy", 0)
    x = xp.asarray(xh.astype(dtype), device=model.device)
    y = xp.asarray(yh, device=model.device)
    opt = am.SGD(lr=0.01) if optimizer == "sgd" else am.Adam(lr=1e-3)
    lossfn = get_loss("cross_entropy")

    def step():
        return train_step(model, opt, lossfn, x, y, xp=xp)

    return step


def run(workloads, backends, optimizers, dtypes, *, repeat: int, min_time: float, log=print) -> list[dict]:
    from arraymlp.bench import interleaved, make_gemm_floor

    rows = []
    for wl in workloads:
        sizes, batch = CASES[wl]
        for dtype in dtypes:
            fns, groups = {}, {}
            for be in backends:
                fns[f"floor[{be}]"] = make_gemm_floor(be, sizes, batch, "train", dtype)
                groups[f"floor[{be}]"] = be
                for opt in optimizers:
                    name = f"{opt}[{be}]"
                    fns[name] = make_step(be, sizes, batch, opt, dtype)
                    groups[name] = be
            times = interleaved(fns, repeat=repeat, min_time=min_time, groups=groups, switch_time=0.15)
            for name, ts in times.items():
                be = name[name.index("[") + 1:-1]
                floor = times[f"floor[{be}]"]
                row = {"workload": wl, "dtype": dtype, "name": name, "times": ts,
                       "min": min(ts), "median": float(numpy.median(ts)),
                       "min_ratio": min(ts) / min(floor), "median_ratio": float(numpy.median(ts) / numpy.median(floor))}
                rows.append(row)
                log(f"{wl:3s} {dtype:8s} {name:15s} min {row['min'] * 1e3:8.3f} ms  median "
                    f"{row['median'] * 1e3:8.3f} ms   x floor: {row['min_ratio']:.3f} (min) "
                    f"{row['median_ratio']:.3f} (median)")
    return rows


def compare(a_files: list[str], b_files: list[str]) -> None:
    """Print B against A, case by case, from the JSON files of their runs."""
    def load(files):
        out: dict = {}
        for path in files:
            with open(path) as f:
                for row in json.load(f)["rows"]:
                    out.setdefault((row["workload"], row["dtype"], row["name"]), []).append(row)
        return out

    a, b = load(a_files), load(b_files)
    print(f"{'case':32s} {'B/A min':>8s} {'B/A med':>8s}   {'A x floor (min, med)':>20s}   "
          f"{'B x floor (min, med)':>20s}")
    for key, rows_a in a.items():
        rows_b = b.get(key)
        if not rows_b or key[2].startswith("floor"):
            continue
        def stats(rows):
            return (min(r["min"] for r in rows), float(numpy.median([r["median"] for r in rows])),
                    min(r["min_ratio"] for r in rows), float(numpy.median([r["median_ratio"] for r in rows])))
        amin, amed, afl, afm = stats(rows_a)
        bmin, bmed, bfl, bfm = stats(rows_b)
        print(f"{' '.join(key):32s} {bmin / amin:8.3f} {bmed / amed:8.3f}   {afl:9.3f} {afm:9.3f}   "
              f"{bfl:9.3f} {bfm:9.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W1,W2,W5,S")
    ap.add_argument("--backend", default="numpy,torch")
    ap.add_argument("--optimizer", default="sgd,adam")
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1, help="threads per pool (0: each library's default)")
    ap.add_argument("--json", help="write every sample as JSON")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="comma-separated JSON files of version A's runs and of version B's")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare[0].split(","), args.compare[1].split(","))
        return 0
    from arraymlp.bench import limit_threads
    from arraymlp.kernels import _jit

    _jit.kernels()  # the compiled kernels loaded up front, as a long fit has them

    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with limit_threads(args.threads or None):
        rows = run(args.workload.split(","), args.backend.split(","), args.optimizer.split(","),
                   args.dtype.split(","), repeat=args.repeat, min_time=args.min_time,
                   log=lambda s: print(s, flush=True))
    load = os.getloadavg()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in load)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_after": load, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
