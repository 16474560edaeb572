"""Data-parallel training over MPI.

The multi-rank tests launch the scripts in ``tests/mpi_scripts`` under ``mpiexec`` (the
one next to this interpreter, as ``pip install mpich`` puts it, else the one on PATH)
with a timeout, and skip with a reason when mpi4py or mpiexec is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from arraymlp.distributed import RootOnly, has_batch_hook, shard_bounds
from arraymlp.training import Callback, EarlyStopping
from conftest import _gpu, _has

SCRIPTS = Path(__file__).parent / "mpi_scripts"
TIMEOUT = 240


def _mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(
    not _has("mpi4py") or _mpiexec() is None,
    reason="needs mpi4py and an mpiexec (pip install 'arraymlp[mpi]')",
)


def mpirun(n: int, script: str, *args: str, timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``script`` on ``n`` ranks; returns the finished process and its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    return proc, time.perf_counter() - t0


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(("start", "stop", "size"), [(0, 512, 2), (0, 63, 2), (100, 101, 2), (0, 1, 3),
                                                     (7, 17, 4), (0, 0, 2)])
def test_shards_partition_the_batch(start, stop, size):
    bounds = [shard_bounds(start, stop, r, size) for r in range(size)]
    assert bounds[0][0] == start and bounds[-1][1] == stop
    for (_lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2
    lengths = [hi - lo for lo, hi in bounds]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)


def test_shard_values():
    assert [shard_bounds(0, 63, r, 2) for r in range(2)] == [(0, 32), (32, 63)]
    assert [shard_bounds(512, 1024, r, 2) for r in range(2)] == [(512, 768), (768, 1024)]
    assert [shard_bounds(5, 6, r, 3) for r in range(3)] == [(5, 6), (6, 6), (6, 6)]


# ----------------------------------------------------------------------------- callbacks
class _Comm:
    def __init__(self, rank):
        self.rank = rank

    def Get_rank(self):
        return self.rank


class _Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_epoch_end(self, model, logs):
        self.calls.append(logs["epoch"])
        return logs["epoch"] >= 1


class _BatchRecorder(_Recorder):
    def on_batch_end(self, model, logs):
        self.calls.append(("batch", logs["step"]))


def test_root_only_runs_on_the_root():
    on_root, elsewhere = _Recorder(), _Recorder()
    root, other = RootOnly(on_root, _Comm(0)), RootOnly(elsewhere, _Comm(1))
    assert [root.on_epoch_end(None, {"epoch": e}) for e in range(2)] == [False, True]
    assert [other.on_epoch_end(None, {"epoch": e}) for e in range(2)] == [None, None]
    assert on_root.calls == [0, 1] and elsewhere.calls == []


def test_batch_hooks_are_detected():
    assert not has_batch_hook(_Recorder())
    assert not has_batch_hook(EarlyStopping("loss"))
    assert has_batch_hook(_BatchRecorder())
    assert has_batch_hook(RootOnly(_BatchRecorder(), _Comm(0)))
    assert not has_batch_hook(RootOnly(_Recorder(), _Comm(1)))


def test_checkpoints_are_the_callbacks_wrapped_for_the_root(tmp_path):
    """DataParallel.begin wraps the callbacks that save the run (saves_callbacks, as a
    Checkpoint has) in RootOnly, once: not the others, not one already wrapped."""
    import arraymlp as am
    from arraymlp.distributed import _saves_run

    class _Saver(Callback):
        saves_callbacks = True

    ck = am.Checkpoint(tmp_path / "ck")
    assert [_saves_run(cb) for cb in (ck, _Saver(), EarlyStopping("loss"), _Recorder())] == [True, True, False, False]
    assert [_saves_run(RootOnly(cb, _Comm(0))) for cb in (ck, _Saver(), _Recorder())] == [False, False, False]


def test_root_only_checkpoint_saves_the_other_callbacks_state(tmp_path):
    """A Checkpoint wrapped by hand in RootOnly still runs after the other callbacks and
    saves their state (an EarlyStopping's), like a bare one."""
    import numpy as np

    import arraymlp as am
    from arraymlp import io as amio

    x = np.random.default_rng(0).normal(size=(16, 3))
    ck = am.Checkpoint(tmp_path / "ck")
    es = EarlyStopping("loss", patience=5)
    am.MLP([3, 4, 1], seed=0, backend="numpy").fit(x, x[:, :1], loss="mse", epochs=2, progress=False,
                                                   callbacks=[RootOnly(ck, _Comm(0))], early_stopping=es)
    f = amio._read(tmp_path / "ck" / "epoch-00002.safetensors")
    assert [e["class"] for e in f.checkpoint["callbacks"]] == ["EarlyStopping"]
    assert f.checkpoint["callbacks"][0]["state"]["best_epoch"] == es.best_epoch


# ----------------------------------------------------------------------------- under mpiexec
def _backends() -> list[str]:
    names = ["numpy", "array_api_strict"]
    if _has("torch"):
        names.append("torch")
    if _gpu():
        names.append("cupy")
    return names


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_data_parallel_equals_single_process(ranks):
    """A plain model trained data-parallel (fit, or partial_fit calls in sequence) ends
    with the parameters and the history (loss and training metrics, same keys) of its
    single-process training: uneven shards, empty shards, sample weights, a shard whose
    weights are all zero, R^2 about targets away from 0; partial_fit also keeps the
    optimiser's step count and the generator's state equal to the single process's on
    every rank; ranks passing different arguments all raise, naming the argument."""
    backends = _backends()
    proc, _ = mpirun(ranks, "equivalence.py", *backends)
    assert proc.returncode == 0, _explain(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    (disagreement,) = [row for row in rows if row["case"] == "disagreement"]
    assert disagreement["ok"] and len(disagreement["results"]) == ranks, disagreement
    rows = [row for row in rows if row is not disagreement]
    assert len(rows) == 7 * len(backends), _explain(proc)
    for row in rows:
        assert row["ranks"] == ranks, "mpiexec and mpi4py use different MPI libraries"
        assert row["ok"] and row["ranks_agree"] and row["same_keys"], row
        float64 = "float32" not in row["case"]
        assert row["max_abs_diff"] <= (1e-12 if float64 else 1e-5), row
        assert row["loss_diff"] <= (1e-12 if float64 else 1e-6), row
        assert row["metric_diff"] <= (1e-12 if float64 else 1e-6), row
        assert row["metrics"] == (["mae", "r2"] if "regression" in row["case"] else ["accuracy", "top_2_accuracy"])
        if row["case"].startswith("partial-fit"):
            assert [len(h) for h in row["loss"]] == [1, 1, 1], row  # one epoch a call
            assert row["steps"] == sum(-(-(b - a) // (32 if "adam" in row["case"] else 16))
                                       for a, b in ((0, 230), (230, 231), (231, 500))), row
        else:
            assert [len(h) for h in row["loss"]] == [3], row


@needs_mpi
def test_a_failing_rank_aborts_the_job():
    proc, elapsed = mpirun(2, "rank_raises.py", timeout=120)
    assert proc.returncode != 0, _explain(proc)
    assert "rank 1 fails on purpose" in proc.stderr, _explain(proc)
    assert "rank 0 finished training" not in proc.stdout
    # rank 0 sat in an Allreduce that would never complete: only the abort ends it.
    assert elapsed < 30.0, f"the job took {elapsed:.1f}s to end"


def _scenario_rows(folder, ranks: int) -> dict:
    """The rows each rank's script wrote to ``rank<i>.jsonl``, keyed by (scenario, rank)."""
    rows = {}
    for rank in range(ranks):
        for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows[row.pop("scenario"), row.pop("rank")] = row
    return rows


@needs_mpi
def test_stops_are_collective(tmp_path):
    proc, _ = mpirun(2, "collective_stop.py", str(tmp_path))
    assert proc.returncode == 0, _explain(proc)
    results = _scenario_rows(tmp_path, ranks=2)

    div = [results["divergence", r] for r in (0, 1)]
    # the overflowing rows sit in rank 1's shard of the third batch only
    assert all(d["raised"] and d["epoch"] == 0 and d["step"] == 2 and d["steps_"] == 2 for d in div), div
    assert all(d["agree"] for d in div)

    cb = [results["callback", r] for r in (0, 1)]
    assert cb[0] == cb[1] == {"epochs": 3, "stopped_early": True, "agree": True}

    bcb = [results["batch_callback", r] for r in (0, 1)]
    # 4 batches per epoch: step 6 is the second batch of the second epoch
    assert bcb[0] == bcb[1] == {"epochs": 2, "steps": 6, "agree": True}

    es = [results["early_stopping", r] for r in (0, 1)]
    assert es[0] == es[1]
    assert es[0]["agree"] and es[0]["epochs"] == len(es[0]["val_loss"]) < 50
    assert es[0]["best_epoch"] == es[0]["val_loss"].index(min(es[0]["val_loss"]))

    err0, err1 = results["rank_error", 0], results["rank_error", 1]
    assert err1["raised"] == "ValueError" and "rank 1 cannot compute" in err1["message"]
    assert err0["raised"] == "RuntimeError" and "1 other rank(s) failed" in err0["message"]
    assert err0["steps_"] == err1["steps_"] == 2

    ck0, ck1 = results["checkpoint", 0], results["checkpoint", 1]
    assert ck0["saved"] == ["epoch-00001.safetensors", "epoch-00002.safetensors"] and ck1["saved"] == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ck0["saved"]
    assert ck0["epochs"] == ck1["epochs"] == 3 and ck0["steps"] == ck1["steps"] == 12
    assert ck0["agree"] and ck1["agree"]

    assert ("done", 0) in results and ("done", 1) in results
    # verbose progress from the root only: one line per epoch, not one per rank
    assert len(re.findall(r"^epoch +1 ", proc.stdout, flags=re.M)) == 1, proc.stdout
    assert len(re.findall(r"^epoch +2 ", proc.stdout, flags=re.M)) == 1, proc.stdout


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ensemble_data_parallel_equals_single_process(ranks, tmp_path):
    """An ensemble (K=3) trained data-parallel equals its single-process fit on the full
    data: per-member rates and momenta, per-member (K, n) and shared (n,) sample weights,
    per-member L2, empty shards, per-member early stopping (the same members stop at the
    same epochs on every rank) and a checkpoint written by the root only; its history
    holds the same training metrics, each member's value that of the single-process fit
    (regression's R^2 and MAE too); partial_fit calls in sequence equal the same calls in
    one process (parameters, history, optimiser step count, generator state)."""
    backends = [b for b in _backends() if b != "cupy"] + (["cupy"] if "cupy" in _backends() else [])
    proc, _ = mpirun(ranks, "ensemble_equivalence.py", str(tmp_path), *backends)
    assert proc.returncode == 0, _explain(proc)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 9 * len(backends), _explain(proc)
    for row in rows:
        assert row["ranks"] == ranks, "mpiexec and mpi4py use different MPI libraries"
        assert row["ok"] and row["ranks_agree"] and row["same_keys"], row
        tol = 1e-10 if "float32" not in row["case"] else 1e-5
        assert row["max_abs_diff"] <= tol, row
        assert row["metric_diff"] <= (1e-12 if "float32" not in row["case"] else 1e-6), row
        assert "accuracy" in row["metrics"] or row["metrics"] == ["mae", "r2"], row
        assert all(s == row["stopped_single"] for s in row["stopped_epoch"]), row
        if row["case"] == "adam-early-stopping":
            # members stop at different epochs: one stops early, the others train on
            stops = row["stopped_single"]
            assert len(row["loss"]) == 12 and min(stops) == -1 and max(stops) >= 0, row
            losses = np.array(row["val_loss"])
            best = [int(np.argmin(losses[:, k])) for k in range(3)]
            assert row["best_epochs"] == best, row
        else:
            assert len(row["loss"]) == 3 and len(row["loss"][0]) == 3
    for backend in backends:
        saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f"{backend}-"))
        # the root (rank 0) writes the data-parallel run's checkpoints; no other rank does
        assert saved == [f"{backend}-dp-0", f"{backend}-single-0"]
        assert sorted(p.name for p in (tmp_path / f"{backend}-dp-0").iterdir()) == [
            f"epoch-0000{e}.safetensors" for e in (1, 2, 3)]


def test_a_wrapped_checkpoints_state_resumes_into_the_bare_one(tmp_path):
    """Data-parallel fit wraps checkpoints in RootOnly, but resume_from restores the
    callbacks before wrapping them: the state is saved under the wrapped callback's own
    name, so a monitored checkpoint's best survives the resume (it was silently lost)."""
    import numpy as np

    import arraymlp as am
    from arraymlp import io as amio

    x = np.random.default_rng(0).normal(size=(16, 3))
    ck = am.Checkpoint(tmp_path / "ck", monitor="loss")
    am.MLP([3, 4, 1], seed=0, backend="numpy").fit(x, x[:, :1], loss="mse", epochs=3, progress=False,
                                                   callbacks=[RootOnly(ck, _Comm(0))])
    f = amio._read(tmp_path / "ck" / "epoch-00003.safetensors")
    assert [e["class"] for e in f.checkpoint["callbacks"]] == ["Checkpoint"]
    bare = am.Checkpoint(tmp_path / "ck", monitor="loss")
    amio.restore_checkpoint(tmp_path / "ck", am.MLP([3, 4, 1], seed=0, backend="numpy"), callbacks=[bare])
    assert (bare.best, bare.best_epoch) == (ck.best, ck.best_epoch) and bare.best_epoch is not None


@needs_mpi
def test_an_ensembles_stops_are_collective(tmp_path):
    """Data-parallel ensembles: a divergence on one rank's shard, a stop asked by a
    callback on one rank (after an epoch, after a batch) and an error on one rank stop
    every rank at the same point; a Checkpoint keeping each member's best, written by
    the root, resumes on every rank into the uninterrupted run's parameters and bests."""
    proc, _ = mpirun(2, "ensemble_stops.py", str(tmp_path))
    assert proc.returncode == 0, _explain(proc)
    results = _scenario_rows(tmp_path, ranks=2)
    div = [results["divergence", r] for r in (0, 1)]
    # rank 1's half of the third batch overflows: two finite steps, their parameters kept
    assert all(d["raised"] and d["epoch"] == 0 and d["step"] == 2 and d["steps_"] == 2 for d in div), div
    assert all(d["agree"] and d["last_finite"] and "members [0, 1, 2]" in d["message"] for d in div), div
    cb = [results["callback", r] for r in (0, 1)]
    assert cb[0] == cb[1] == {"epochs": 3, "stopped_early": True, "agree": True}
    bcb = [results["batch_callback", r] for r in (0, 1)]
    assert bcb[0] == bcb[1] == {"epochs": 2, "steps": 6, "agree": True}  # 4 batches an epoch
    err0, err1 = results["rank_error", 0], results["rank_error", 1]
    assert err1["raised"] == "ValueError" and "rank 1 cannot compute" in err1["message"]
    assert err0["raised"] == "RuntimeError" and "1 other rank(s) failed" in err0["message"]
    assert err0["steps_"] == err1["steps_"] == 2
    ck0, ck1 = results["checkpoint", 0], results["checkpoint", 1]
    assert ck0["saved"] == [f"epoch-0000{e}.safetensors" for e in range(1, 7)] and ck1["saved"] == []
    assert ck0["same_as_whole"] and ck1["same_as_whole"] and ck0["agree"] and ck1["agree"]
    assert ck0["same_best"] and ck0["best_epoch"] == ck0["best_epoch_whole"]
    assert len(set(ck0["best_epoch"])) > 1  # the members are best at different epochs
    # per-member early stopping resumed too: members stop after the resume, alike on every rank
    assert ck0["stopped_epoch"] == ck1["stopped_epoch"] and max(ck0["stopped_epoch"]) >= 3
    assert ("done", 0) in results and ("done", 1) in results


@needs_mpi
def test_an_ensemble_reads_no_more_per_step_than_a_plain_model():
    """Host reads per data-parallel step, counted on array_api_strict (with sample
    weights, per-member for the ensemble, and the default training accuracy, whose sums
    are added over the ranks once per epoch): the ensemble's are the staging of the
    reduced buffer and its error flag, no more than the plain model's step reads (the
    shard's weight sum and whether it has any, the staging and the loss); the members'
    losses and the metrics' sums stay on the device."""
    proc, _ = mpirun(2, "host_reads.py")
    assert proc.returncode == 0, _explain(proc)
    (row,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert row["ranks"] == 2
    assert row["ensemble"] <= row["plain"], row
    assert row["ensemble"] <= 2 and row["plain"] <= 4, row


# ----------------------------------------------------------------------------- metrics over ranks
class _Gathered(Exception):
    pass


def _sums_over_ranks(make_accs, shards, update, anchor):
    """Each simulated rank's accumulators over its shards (anchored on the first row of
    the data, as fit anchors them), and the values ``read_results`` gives every rank
    once the ranks' sums are gathered."""
    from arraymlp.metrics import read_results

    ranks, payloads = [], []
    for shard in shards:
        accs = make_accs()
        for acc in accs:
            acc.metric._anchor(acc, anchor)
        for part in shard:
            update(accs, part)
        ranks.append(accs)

    def capture(payload):
        payloads.append(payload)
        raise _Gathered

    for accs in ranks:
        with pytest.raises(_Gathered):
            read_results(accs, accs[0].xp, gather=capture)
    return [read_results(accs, accs[0].xp, gather=lambda _: payloads) for accs in ranks]


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("members", [None, 3])
def test_metric_sums_added_over_ranks_are_the_whole_datas(backend, task, members):
    """The training metrics' sums of three ranks (one of which saw no rows at all),
    added as a data-parallel epoch adds them, give each rank the values of one
    accumulator over all the rows: accuracy, top-2 accuracy, MAE, R^2 of targets far
    from 0 (its sums about the data's first row on every rank) and a callable metric
    (run member by member for an ensemble)."""
    import arraymlp as am
    from arraymlp.metrics import _MembersPair, _Pair, get_metrics, read_results

    backend.skip_without_float64()
    xp, device = backend.xp, backend.device
    rng = np.random.default_rng(5)
    n, k = 23, members or 1
    if task == "classification":
        y_np = rng.integers(0, 4, size=n)
        names, kind = ["accuracy", am.metrics.top_k_accuracy(2)], "multiclass"
        out_np = rng.normal(size=(k, n, 4))
    else:
        y_np = rng.normal(size=(n, 2)) * 0.1 + np.array([1e3, -50.0])
        names, kind = ["mae", "r2"], "regression"
        out_np = y_np + rng.normal(size=(k, n, 2))

    def own(y_true, y_pred, *, xp):  # a metric of one's own: a mean over the samples
        if task == "classification":
            return xp.mean(xp.astype(y_true != y_pred, xp.float64))
        return xp.mean(xp.abs(xp.astype(y_true, xp.float64) - xp.astype(y_pred, xp.float64)))

    metrics = get_metrics([*names, own], kind, int(out_np.shape[-1]))
    y = backend.asarray(y_np)
    out = backend.asarray(out_np if members else out_np[0])

    def make_accs():
        if members:
            return [m.start_members(xp, xp.float64, device, members) for m in metrics]
        return [m.start(xp, xp.float64, device) for m in metrics]

    def update(accs, rows):
        lo, hi = rows
        if lo == hi:  # an empty shard computes nothing
            return
        pair = (_MembersPair(y[lo:hi, ...], out[:, lo:hi, ...], kind, xp) if members
                else _Pair(y[lo:hi, ...], out[lo:hi, ...], kind, xp))
        for acc in accs:
            acc.update(pair)

    # batches of 2 rows over 3 ranks (a short last batch): rank 2's shards are all empty
    shards = [[shard_bounds(start, min(start + 2, n), r, 3) for start in range(0, n, 2)] for r in range(3)]
    assert all(lo == hi for lo, hi in shards[2])
    got = _sums_over_ranks(make_accs, shards, update, y[0:1, ...])
    whole = make_accs()
    update(whole, (0, n))
    want = read_results(whole, xp)
    for values in got:  # every rank: the same values, the whole data's
        for m, a, b in zip(metrics, values, want):
            np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-12,
                                       atol=1e-12, err_msg=m.name)


# ----------------------------------------------------------------------------- the ranks' arguments
class _TwoRanks:
    """A communicator of two ranks seen from rank 0, in one process: ``allgather``
    answers with this rank's payload and rank 1's, which ``other`` makes from it."""

    def __init__(self, other):
        self.other = other

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def allgather(self, payload):
        return [payload, self.other(payload)]


def _rank1(**changes):
    """Rank 1's payload of DataParallel.begin: this rank's arguments with ``changes``."""
    return lambda payload: ({**payload[0], **changes}, None)


@pytest.mark.parametrize("members", [None, 3])
def test_ranks_passing_different_arguments_are_named(backend, members):
    """Before any step, fit and partial_fit compare what the ranks pass (one allgather)
    and raise on every rank naming what differs and its value on each rank: the batch
    size, the sample weights' shape, the optimiser's step count of a rank that made one
    partial_fit call fewer, the data's dtype."""
    pytest.importorskip("mpi4py")
    import arraymlp as am
    from arraymlp.distributed import DataParallel

    rng = np.random.default_rng(0)
    x, y = backend.asarray(rng.normal(size=(20, 3))), backend.asarray(rng.integers(0, 2, size=20))
    model = am.MLP([3, 4, 2], output_activation="softmax", dtype="float64", seed=0, ensemble=members,
                   **backend.model_kwargs())
    fit = {"loss": "cross_entropy", "progress": False, "epochs": 1, "batch_size": 8}

    def dp(**changes):
        return DataParallel(_TwoRanks(_rank1(**changes)), abort_on_error=False)

    with pytest.raises(ValueError, match=r"call fit with the same data and arguments; batch_size differs: "
                                         r"8 on rank 0, 16 on rank 1"):
        model.fit(x, y, comm=dp(batch_size=16), **fit)
    w = backend.asarray(np.ones((members, 20) if members else 20))
    shape = (members, 20) if members else (20,)
    with pytest.raises(ValueError, match=re.escape(f"sample_weight differs: ({shape}, 'float64') on rank 0, "
                                                   "None on rank 1")):
        model.fit(x, y, sample_weight=w, comm=dp(sample_weight=None), **fit)
    with pytest.raises(ValueError, match="x dtype differs"):
        model.fit(x, y, comm=dp(**{"x dtype": "float32"}), **fit)
    model.partial_fit(x, y, loss="cross_entropy", batch_size=8)  # on this rank only: 3 steps
    with pytest.raises(ValueError, match=r"call partial_fit with the same data and arguments; optimizer steps "
                                         r"differs: 3 on rank 0, 0 on rank 1"):
        model.partial_fit(x, y, batch_size=8, comm=dp(**{"optimizer steps": 0}))


def test_synchronize_waits_on_the_arrays_own_device(monkeypatch):
    """Before MPI touches a CuPy array's memory, the stream waited on is the current one of
    the array's device (CuPy keeps a current stream per device), not of whichever device
    is current. A stand-in ``cupy`` records the device current at the wait."""
    import types

    from arraymlp import distributed

    current = [0]
    waited = []

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            self.before, current[0] = current[0], self.id

        def __exit__(self, *exc):
            current[0] = self.before

    class Stream:
        def __init__(self, device):
            self.device = device

        def synchronize(self):
            waited.append(self.device)

    class ndarray:  # CuPy's class name, which array-api-compat checks
        device = Device(1)

    fake = types.SimpleNamespace(ndarray=ndarray,
                                 cuda=types.SimpleNamespace(get_current_stream=lambda: Stream(current[0])))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    distributed._synchronize(ndarray())
    assert waited == [1] and current == [0]
