"""Host reads per data-parallel step, plain model against ensemble, on array_api_strict.

Run as ``mpiexec -n N python tests/mpi_scripts/host_reads.py``. Each rank counts the
host reads of array_api_strict arrays (as ``tests/test_host_sync.py`` counts them)
during fits of 4 and of 8 steps an epoch; the root prints one JSON line with the
extra reads per step (the slope) of a plain model's data-parallel fit and of an
ensemble's, both recording the default training accuracy (its sums added over the
ranks once per epoch, not per step). The ensemble must not read more per step than the
plain model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import array_api_strict as xp
import numpy as np
import pytest
from mpi4py import MPI

import arraymlp as am
from arraymlp.distributed import DataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_host_sync import HostReads  # noqa: E402

comm = MPI.COMM_WORLD
dp = DataParallel(comm)
BATCH = 16


def reads(ensemble, steps):
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.normal(size=(steps * BATCH, 5)))
    y = xp.asarray(rng.integers(0, 3, size=steps * BATCH))
    w = xp.asarray(rng.uniform(0.5, 1.5, size=(3, steps * BATCH)) if ensemble else rng.uniform(0.5, 1.5,
                                                                                               size=steps * BATCH))
    model = am.MLP([5, 8, 3], dtype="float64", backend="array_api_strict", seed=0, ensemble=ensemble)
    mp = pytest.MonkeyPatch()
    counter = HostReads(mp)
    try:
        model.fit(x, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=BATCH, progress=False,
                  comm=dp, sample_weight=w, seed=1)
    finally:
        mp.undo()
    return counter.total


slopes = {}
for name, k in (("plain", None), ("ensemble", 3)):
    slopes[name] = (reads(k, 8) - reads(k, 4)) / (2 * 4)  # 2 epochs of 4 more steps
if comm.rank == 0:
    print(json.dumps({"ranks": comm.size, **slopes}), flush=True)
