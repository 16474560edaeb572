"""An ensemble's data-parallel stops are collective, and its checkpoints resume on every rank.

Run as ``mpiexec -n 2 python ensemble_stops.py OUTDIR``; each rank writes one JSON line
per scenario to ``OUTDIR/rank<r>.jsonl``:

- ``divergence``: only rank 1's shard of the third batch overflows, yet every rank
  raises ``DivergenceError`` at the same step, with the parameters of the last finite step;
- ``callback`` / ``batch_callback``: a callback asks to stop on rank 1 only, after an
  epoch or a batch, yet every rank stops at the same point;
- ``rank_error``: the gradients fail on rank 1 only; rank 1 raises its own error, the
  others a ``RuntimeError``, at the same step;
- ``checkpoint``: a ``Checkpoint(monitor="val_loss")`` (each member's best) writes on
  the root only; every rank resumes from it, with per-member early stopping, and the
  resumed run ends as the uninterrupted one, with the same members' bests and stops.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from mpi4py import MPI

import arraymlp as am
from arraymlp.distributed import DataParallel
from arraymlp.training import Callback, DivergenceError

comm = MPI.COMM_WORLD
dp = DataParallel(comm)
OUT = os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", f"rank{comm.rank}.jsonl")
open(OUT, "w").close()
K = 3


def report(scenario, **values):
    with open(OUT, "a") as f:
        f.write(json.dumps({"scenario": scenario, "rank": comm.rank, **values}) + "\n")


def data(n=256, f=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, f))
    return x, (x[:, 0] > 0).astype(np.int64)


def model(dtype="float64"):
    return am.MLP([4, 8, 2], ensemble=K, dtype=dtype, backend="numpy", seed=0)


def params(m):
    return [np.array(a, copy=True) for p in m.params for a in p.values()]


# -- divergence on one rank's shard only ------------------------------------------
x, y = data()
x = x.astype(np.float32)
x[128 + 32:128 + 64] = 3e38  # batch_size 64, no shuffling: rank 1's half of the third batch overflows
np.seterr(over="ignore", invalid="ignore")
m = model("float32")
try:
    m.fit(x, y, loss="cross_entropy", optimizer="sgd", lr=[0.1, 0.05, 0.01], epochs=2, batch_size=64,
          shuffle=False, progress=False, comm=dp)
    report("divergence", raised=False)
except DivergenceError as exc:
    # the last finite step's parameters: a fit of the first two batches
    ref = model("float32")
    ref.fit(x[:128], y[:128], loss="cross_entropy", optimizer="sgd", lr=[0.1, 0.05, 0.01], epochs=1, batch_size=64,
            shuffle=False, progress=False)
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(params(m), params(ref)))
    report("divergence", raised=True, epoch=exc.epoch, step=exc.step, steps_=m.steps_,
           agree=dp.parameters_agree(m), last_finite=bool(same), message=str(exc))
np.seterr(over="warn", invalid="warn")


# -- a callback that stops on rank 1 only -------------------------------------------
class StopOnRank1(Callback):
    def __init__(self, at_epoch=None, at_step=None):
        self.at_epoch, self.at_step = at_epoch, at_step

    def on_epoch_end(self, model, logs):
        return comm.rank == 1 and self.at_epoch is not None and logs["epoch"] >= self.at_epoch

    def on_batch_end(self, model, logs):
        return comm.rank == 1 and self.at_step is not None and logs["step"] >= self.at_step


x, y = data()
m = model()
h = m.fit(x, y, loss="cross_entropy", epochs=10, batch_size=64, progress=False, comm=dp,
          callbacks=[StopOnRank1(at_epoch=2)])
report("callback", epochs=h.epochs, stopped_early=h.stopped_early, agree=dp.parameters_agree(m))

m = model()
h = m.fit(x, y, loss="cross_entropy", epochs=10, batch_size=64, progress=False, comm=dp,
          callbacks=[StopOnRank1(at_step=6)])
report("batch_callback", epochs=h.epochs, steps=m.steps_, agree=dp.parameters_agree(m))

# -- an error while one rank computes its gradients ------------------------------------
m = model()
if comm.rank == 1:
    original = m._backprop
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("rank 1 cannot compute this batch")
        return original(*args, **kwargs)

    m._backprop = failing
try:
    m.fit(x, y, loss="cross_entropy", epochs=2, batch_size=64, progress=False, comm=dp)
    report("rank_error", raised=None)
except Exception as exc:  # noqa: BLE001 - the type is what is reported
    report("rank_error", raised=type(exc).__name__, message=str(exc), steps_=m.steps_)

# -- checkpoints (each member's best) written by the root only, resumed by every rank ----
xv, yv = data(64)
xv = xv[::-1].copy()
settings = dict(loss="cross_entropy", optimizer="sgd", lr=[0.5, 0.05, 1.0], momentum=0.9, batch_size=32,
                validation_data=(xv, yv[::-1].copy()), seed=3, progress=False, comm=dp,
                early_stopping=am.EarlyStopping("val_loss", patience=1, restore_best_weights=False))
base = os.path.dirname(OUT)
whole_ck = am.Checkpoint(os.path.join(base, "whole"), monitor="val_loss")
whole = model()
whole.fit(x, y, epochs=6, callbacks=[whole_ck], **settings)
part_ck = am.Checkpoint(os.path.join(base, "part"), monitor="val_loss", keep=None)
model().fit(x, y, epochs=3, callbacks=[part_ck], **settings)
comm.Barrier()
again_ck = am.Checkpoint(os.path.join(base, "part"), monitor="val_loss", keep=None)
again = model()
h = again.fit(x, y, epochs=6, callbacks=[again_ck], resume_from=os.path.join(base, "part", "epoch-00003.safetensors"),
              **settings)
comm.Barrier()
same = all(np.array_equal(a, b) for a, b in zip(params(again), params(whole)))
row = {"saved": [os.path.basename(p) for p in part_ck.saved] + [os.path.basename(p) for p in again_ck.saved],
       "epochs": h.epochs, "same_as_whole": bool(same), "agree": dp.parameters_agree(again),
       "stopped_epoch": h.stopped_epoch.tolist()}
if comm.rank == 0:
    best_whole = params(am.load(whole_ck.best_path))
    best_again = params(am.load(again_ck.best_path))
    row["same_best"] = all(np.array_equal(a, b) for a, b in zip(best_again, best_whole))
    row["best_epoch"] = again_ck.best_epoch.tolist()
    row["best_epoch_whole"] = whole_ck.best_epoch.tolist()
report("checkpoint", **row)
comm.Barrier()
report("done")
