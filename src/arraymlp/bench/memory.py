"""Memory: the peak of one training epoch against what the epoch must hold.

:func:`measure_memory` runs one epoch of :func:`arraymlp.training.fit` on NumPy under
:mod:`tracemalloc` and compares the peak with the data, the parameters, the optimiser
state and one batch's activations.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy

from .workloads import WORKLOADS, Workload

__all__ = ["measure_memory"]


def measure_memory(rows: int = 60_000, *, workload: Workload | None = None, batch: int = 256,
                   dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Peak traced memory of one training epoch, against what it must hold.

    Runs :func:`arraymlp.training.fit` for one epoch of ``rows`` samples on NumPy
    (whose allocations :mod:`tracemalloc` sees) and compares the peak with the sum of
    the data (``x`` and labels), the parameters, the optimiser state (none for plain
    SGD) and one batch's activations (the batch and every layer's output).

    Parameters
    ----------
    rows : int
    workload : Workload, optional
        Architecture; default W1.
    batch : int
    dtype : str
    seed : int

    Returns
    -------
    dict
        ``peak_bytes``, ``budget_bytes``, ``ratio`` and the budget's parts.
    """
    import tracemalloc

    from .. import MLP
    from ..optim import SGD

    wl = workload or WORKLOADS["W1"]
    was_tracing = tracemalloc.is_tracing()
    if was_tracing:
        tracemalloc.stop()
    gc.collect()
    tracemalloc.start()
    try:
        rng = numpy.random.default_rng(seed)
        x = rng.standard_normal((rows, wl.sizes[0]), dtype=numpy.float32).astype(dtype, copy=False)
        y = rng.integers(0, wl.sizes[-1], size=rows).astype(numpy.int64)
        model = MLP(list(wl.sizes), activation=wl.activation, output_activation="softmax",
                    dtype=dtype, backend="numpy", seed=seed)
        opt = SGD(lr=wl.lr)
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        model.fit(x, y, loss=wl.loss, optimizer=opt, epochs=1, batch_size=batch, progress=False)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        item = numpy.dtype(dtype).itemsize
        data = x.nbytes + y.nbytes
        params = sum(int(a.nbytes) for p in model.params for a in p.values())
        state = sum(int(a.nbytes) for layer in (opt.state or []) for st in layer.values() for a in st.values())
        widths = [layer.n_out for layer in model.layers if layer.n_out is not None]
        # every layer's output: dense outputs and the activations that follow them
        n_act = sum(w * (2 if i < len(widths) - 1 else 1) for i, w in enumerate(widths))
        activations = batch * (wl.sizes[0] + n_act) * item + batch * y.itemsize
        budget = data + params + state + activations
        return {"rows": rows, "batch": batch, "dtype": dtype, "arch": wl.arch, "peak_bytes": int(peak),
                "data_bytes": int(data), "param_bytes": int(params), "optimizer_state_bytes": int(state),
                "activation_bytes": int(activations), "budget_bytes": int(budget),
                "ratio": peak / budget, "epoch_seconds": elapsed}
    finally:
        tracemalloc.stop()
        if was_tracing:
            tracemalloc.start()
