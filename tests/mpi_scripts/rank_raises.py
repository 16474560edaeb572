"""Rank 1 raises while rank 0 waits in a collective: the job must end, non-zero.

``DataParallel`` installs an excepthook that calls ``comm.Abort()``, so the uncaught
exception on rank 1 brings down rank 0 too instead of leaving it blocked.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

import arraymlp as am
from arraymlp.distributed import DataParallel

comm = MPI.COMM_WORLD
dp = DataParallel(comm)
print(f"rank {comm.rank} ready", flush=True)
if comm.rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
# Rank 0 trains, blocking in the first Allreduce that rank 1 never joins.
x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
model = am.MLP([4, 8, 1], backend="numpy", seed=0)
model.fit(x, x[:, :1], epochs=1000, batch_size=32, progress=False, comm=dp)
print("rank 0 finished training: the abort did not happen", flush=True)
