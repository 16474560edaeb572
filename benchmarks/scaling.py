"""Scaling of data-parallel training over MPI, and Dask inference throughput.

Workload W1: ``MLP([784, 512, 512, 10])``, ReLU, softmax cross-entropy, SGD, global
batch 512, float32, one BLAS thread per process.

Measured:

- time per training step with 1 process (plain ``fit``, and ``fit(comm=...)`` on one
  rank) and with 2 ranks (each computing 256 rows of every 512-row batch); scaling
  efficiency ``t1 / (2 * t2)``;
- as a control, two independent processes training on 256-row batches at the same time,
  without communication: the speedup the machine itself allows at that moment;
- the share of a 2-rank step spent in the gradient ``Allreduce`` (staging included,
  waiting for the slower rank included), and the bare cost of an ``Allreduce`` of that
  size after a barrier;
- Dask inference throughput (rows/s) of ``model.predict(dask_array)`` on a
  ``LocalCluster`` of 2 single-threaded worker processes and on Dask's threaded
  scheduler, against in-memory ``model.predict`` on the same rows (in one call with 1
  and 2 BLAS threads, and block by block with 1).

The runs alternate between configurations and repeat, and medians are reported, because
the machine may be shared. Usage::

    python benchmarks/scaling.py [--repeats 5] [--steps 40] [--rows 131072] [--out FILE]

Needs ``arraymlp[mpi,dask]`` and threadpoolctl. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [784, 512, 512, 10]
GLOBAL_BATCH = 512
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        sys.exit("mpiexec not found: pip install 'arraymlp[mpi]'")
    return found


# ----------------------------------------------------------------------------- MPI worker
def worker(steps: int, mode: str, batch: int = GLOBAL_BATCH) -> None:
    """Train W1 for ``steps`` measured steps (after warm-up); the root prints JSON."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    import arraymlp as am
    from arraymlp.training import Callback

    threadpool_limits(1)
    comm = dp = None
    rank = 0
    if mode != "plain":
        from mpi4py import MPI

        from arraymlp.distributed import DataParallel

        comm = MPI.COMM_WORLD
        dp = DataParallel(comm)
        rank = comm.rank

    rng = np.random.default_rng(0)
    warmup = 5
    n = batch * (steps + warmup)
    x = rng.normal(size=(n, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=n)
    model = am.MLP(SIZES, output_activation="softmax", backend="numpy", seed=0)

    class Stamps(Callback):
        def __init__(self):
            self.t, self.ar = [], []

        def on_batch_end(self, model, logs):
            self.t.append(time.perf_counter())
            self.ar.append(dp.stats["allreduce_s"] if dp is not None else 0.0)

    stamps = Stamps()
    if comm is not None:
        comm.Barrier()
    t0 = time.perf_counter()
    model.fit(x, y, loss="cross_entropy", optimizer=am.SGD(lr=0.01), epochs=1, batch_size=batch,
              shuffle=False, progress=False, callbacks=[stamps], comm=dp)
    t = np.diff(np.array([t0, *stamps.t]))[warmup:]
    ar = np.diff(np.array([0.0, *stamps.ar]))[warmup:]
    result = {"mode": mode, "ranks": 1 if comm is None else comm.size,
              "step_s": float(np.median(t)), "allreduce_s": float(np.median(ar)),
              "allreduce_share": float(np.median(ar / t)), "compute_s": float(np.median(t - ar))}
    if comm is not None:
        # bare Allreduce of the gradient buffer, both ranks released together
        from mpi4py import MPI

        buf = np.zeros(model.n_params + 3, dtype=np.float32)
        bare = []
        for _ in range(50):
            comm.Barrier()
            s = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            bare.append(time.perf_counter() - s)
        result["bare_allreduce_s"] = float(np.median(bare))
        result["buffer_bytes"] = int(buf.nbytes)
        result["step_s"] = float(comm.allreduce(result["step_s"], op=MPI.MAX))
        # the faster rank waits in the Allreduce for the slower: its compute is the shorter
        result["compute_s"] = float(comm.allreduce(result["compute_s"], op=MPI.MAX))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _result(out: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_training(ranks: int, mode: str, steps: int) -> dict:
    env = dict(os.environ, **ONE_THREAD)
    cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(steps)]
    if mode == "independent":
        # the machine's own parallelism: two processes, half a batch each, no communication
        cmd[3], procs = "plain", []
        for _ in range(ranks):
            procs.append(subprocess.Popen([*cmd, "--batch", str(GLOBAL_BATCH // ranks)], stdout=subprocess.PIPE,
                                          text=True, env=env))
        results = [_result(p.communicate(timeout=600)[0]) for p in procs]
        return max(results, key=lambda r: r["step_s"]) | {"mode": mode, "ranks": ranks}
    if mode != "plain":
        cmd = [_mpiexec(), "-n", str(ranks), *cmd]
    return _result(subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout)


# ----------------------------------------------------------------------------- Dask
def dask_throughput(rows: int, chunk: int, repeats: int) -> dict:
    import dask
    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster, wait
    from threadpoolctl import threadpool_limits

    import arraymlp as am

    model = am.MLP(SIZES, output_activation="softmax", backend="numpy", seed=0)
    out: dict = {"rows": rows, "chunk_rows": chunk, "features": SIZES[0]}
    os.environ.update(ONE_THREAD)  # inherited by the worker processes
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        x = da.random.default_rng(0).standard_normal((rows, SIZES[0]), chunks=(chunk, SIZES[0]),
                                                      dtype=np.float32)
        x = client.persist(x)
        wait(x)
        xs = x.compute()
        dask_t, mem1_t, mem2_t, blocks_t = [], [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            counts = da.bincount(model.predict(x), minlength=SIZES[-1]).compute()
            dask_t.append(time.perf_counter() - t)
            assert int(counts.sum()) == rows
            for threads, times in ((1, mem1_t), (2, mem2_t)):
                with threadpool_limits(threads):
                    t = time.perf_counter()
                    np.bincount(model.predict(xs), minlength=SIZES[-1])
                    times.append(time.perf_counter() - t)
            with threadpool_limits(1):  # the same blocks as Dask's, one after the other
                t = time.perf_counter()
                for i in range(0, rows, chunk):
                    np.bincount(model.predict(xs[i:i + chunk]), minlength=SIZES[-1])
                blocks_t.append(time.perf_counter() - t)
        with dask.config.set(scheduler="threads", num_workers=2), threadpool_limits(1):
            local = da.from_array(xs, chunks=(chunk, SIZES[0]))
            threads_t = []
            for _ in range(repeats):
                t = time.perf_counter()
                da.bincount(model.predict(local), minlength=SIZES[-1]).compute()
                threads_t.append(time.perf_counter() - t)
    for name, times in (("dask_local_cluster_2x1", dask_t), ("dask_threads_2", threads_t),
                        ("in_memory_1_thread", mem1_t), ("in_memory_2_threads", mem2_t),
                        ("in_memory_blocks_1_thread", blocks_t)):
        med = statistics.median(times)
        out[name] = {"median_s": med, "rows_per_s": rows / med, "times_s": times}
    return out


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["plain", "comm"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=GLOBAL_BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=40, help="measured steps per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per configuration")
    ap.add_argument("--rows", type=int, default=131_072, help="rows for the Dask inference comparison")
    ap.add_argument("--chunk", type=int, default=8_192, help="rows per Dask block")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    ap.add_argument("--skip-dask", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.worker, args.batch)
        return

    configs = [("1 process, plain fit", 1, "plain"), ("1 rank, fit(comm=)", 1, "comm"),
               ("2 independent processes, 256 rows each", 2, "independent"), ("2 ranks", 2, "comm")]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    for r in range(args.repeats):
        for name, ranks, mode in configs:
            runs[name].append(run_training(ranks, mode, args.steps))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{name} {runs[name][-1]['step_s'] * 1e3:.1f} ms" for name, _, _ in configs), flush=True)

    def med(name, key):
        return statistics.median(run[key] for run in runs[name])

    t1, t1c, t2 = med("1 process, plain fit", "step_s"), med("1 rank, fit(comm=)", "step_s"), med("2 ranks", "step_s")
    t2i = med("2 independent processes, 256 rows each", "step_s")
    report = {
        "workload": "W1: MLP 784-512-512-10, ReLU, softmax cross-entropy, SGD, global batch 512, float32",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "blas_threads_per_process": 1,
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "step_ms": {"1_plain": t1 * 1e3, "1_rank_comm": t1c * 1e3, "2_ranks": t2 * 1e3,
                    "2_independent_half_batches": t2i * 1e3},
        "machine_parallel_speedup": t1 / t2i,
        # per round, 2 ranks against 2 independent half-batch processes run just before:
        # how much of the parallelism the machine offered at that moment training kept
        "two_ranks_vs_independent": statistics.median(
            ind["step_s"] / mpi["step_s"]
            for ind, mpi in zip(runs["2 independent processes, 256 rows each"], runs["2 ranks"])),
        "speedup_2_vs_1": t1 / t2,
        "scaling_efficiency_2_vs_1": t1 / (2 * t2),
        "compute_ms": {"1_plain": med("1 process, plain fit", "compute_s") * 1e3,
                       "1_rank_comm": med("1 rank, fit(comm=)", "compute_s") * 1e3,
                       "2_ranks_slowest": med("2 ranks", "compute_s") * 1e3},
        "best_run_step_ms": {name: min(run["step_s"] for run in runs[name]) * 1e3 for name, _, _ in configs},
        "allreduce_ms_in_step_2_ranks": med("2 ranks", "allreduce_s") * 1e3,
        "allreduce_share_of_step_2_ranks": med("2 ranks", "allreduce_share"),
        "bare_allreduce_ms_2_ranks": med("2 ranks", "bare_allreduce_s") * 1e3,
        "gradient_buffer_bytes": runs["2 ranks"][0]["buffer_bytes"],
        "runs": runs,
    }
    print(f"\nstep time (median of {args.repeats} runs x {args.steps} steps):")
    for k, v in report["step_ms"].items():
        print(f"  {k:<14} {v:8.2f} ms")
    print("compute part of a step (step minus allreduce, slowest rank): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in report["compute_ms"].items()))
    print("best run: " + ", ".join(f"{k} {v:.2f} ms" for k, v in report["best_run_step_ms"].items()))
    print(f"speedup 2 vs 1: {report['speedup_2_vs_1']:.2f}  efficiency: {report['scaling_efficiency_2_vs_1']:.0%}"
          f"  (two independent half-batch processes, no communication: {report['machine_parallel_speedup']:.2f}x;"
          f" 2 ranks reach {report['two_ranks_vs_independent']:.0%} of their speed)")
    print(f"allreduce in a 2-rank step: {report['allreduce_ms_in_step_2_ranks']:.2f} ms "
          f"({report['allreduce_share_of_step_2_ranks']:.1%} of the step); bare allreduce of "
          f"{report['gradient_buffer_bytes'] / 2**20:.2f} MiB: {report['bare_allreduce_ms_2_ranks']:.2f} ms")
    if not args.skip_dask:
        report["dask_inference"] = d = dask_throughput(args.rows, args.chunk, args.repeats)
        print(f"\ninference on {args.rows} rows (median of {args.repeats}):")
        for k in ("in_memory_1_thread", "in_memory_2_threads", "in_memory_blocks_1_thread", "dask_threads_2",
                  "dask_local_cluster_2x1"):
            print(f"  {k:<24} {d[k]['rows_per_s']:12,.0f} rows/s  ({d[k]['median_s']:.3f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
