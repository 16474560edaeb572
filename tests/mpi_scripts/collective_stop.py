"""Stops are decided collectively: every rank stops at the same point.

Run as ``mpiexec -n 2 python collective_stop.py OUTDIR``; each rank writes one JSON
line per scenario to ``OUTDIR/rank<r>.jsonl``:

- ``divergence``: only rank 1's shards hold rows that overflow the forward pass, yet
  every rank raises ``DivergenceError`` at the same step;
- ``callback``: a callback asks to stop on rank 1 only (epoch end), yet both stop after
  the same epoch;
- ``batch_callback``: the same after a batch;
- ``rank_error``: computing the gradients fails on rank 1 only; rank 1 gets its own
  error, the others a ``RuntimeError``, all at the same step, none left waiting;
- ``early_stopping``: validation computed on the root and broadcast, the same epochs
  and restored weights everywhere;
- ``checkpoint``: an ``arraymlp.Checkpoint`` writes on the root only, and every rank
  resumes from it;
- finally one ``verbose`` fit, whose per-epoch lines only the root prints (the caller
  counts them in the merged stdout).
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


def report(scenario, **values):
    with open(OUT, "a") as f:
        f.write(json.dumps({"scenario": scenario, "rank": comm.rank, **values}) + "\n")


def data(n=256, f=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, f)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def model():
    return am.MLP([4, 8, 2], output_activation="softmax", backend="numpy", seed=0)


# -- divergence on one rank's shard only ------------------------------------------
x, y = data()
# batch_size 64 without shuffling: rows 32..63 of the third batch are rank 1's.
x[128 + 32:128 + 64] = 3e38
m = model()
np.seterr(over="ignore", invalid="ignore")
try:
    m.fit(x, y, loss="cross_entropy", optimizer="sgd", epochs=2, batch_size=64, shuffle=False,
          progress=False, comm=dp)
    report("divergence", raised=False)
except DivergenceError as exc:
    report("divergence", raised=True, epoch=exc.epoch, step=exc.step, steps_=m.steps_,
           agree=dp.parameters_agree(m))
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

# -- early stopping on a validation set (computed on the root, broadcast) ----------------
m = model()
h = m.fit(x, y, loss="cross_entropy", epochs=50, batch_size=64, progress=False, comm=dp,
          validation_split=0.25, early_stopping=am.training.EarlyStopping("val_loss", patience=0),
          optimizer=am.SGD(lr=2.0))
report("early_stopping", epochs=h.epochs, best_epoch=h.best_epoch, val_loss=h.val_loss,
       agree=dp.parameters_agree(m))

# -- an error while one rank computes its gradients ------------------------------------
m = model()
if comm.rank == 1:
    original = m._loss_and_grads
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("rank 1 cannot compute this batch")
        return original(*args, **kwargs)

    m._loss_and_grads = failing
try:
    m.fit(x, y, loss="cross_entropy", epochs=2, batch_size=64, progress=False, comm=dp)
    report("rank_error", raised=None)
except Exception as exc:  # noqa: BLE001 - the type is what is reported
    report("rank_error", raised=type(exc).__name__, message=str(exc), steps_=m.steps_)

# -- checkpoints written by the root only, resumed by every rank -------------------------
ckdir = os.path.join(os.path.dirname(OUT), "checkpoints")
ckpt = am.Checkpoint(ckdir, every=1)
m = model()
m.fit(x, y, loss="cross_entropy", epochs=2, batch_size=64, progress=False, comm=dp, callbacks=[ckpt])
comm.Barrier()
resumed = model()
h = resumed.fit(x, y, loss="cross_entropy", epochs=3, batch_size=64, progress=False, comm=dp,
                resume_from=ckdir)
report("checkpoint", saved=[os.path.basename(p) for p in ckpt.saved], epochs=h.epochs,
       steps=resumed.steps_, agree=dp.parameters_agree(resumed))

# -- progress lines from the root only -------------------------------------------------------
m = model()
m.fit(x, y, loss="cross_entropy", epochs=2, batch_size=64, progress=True, verbose=True, comm=dp)
comm.Barrier()
report("done")
