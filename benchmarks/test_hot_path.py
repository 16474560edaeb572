"""The hot path on every backend present: dense forward, dense backward, a training
step and inference, over batch size x width x dtype (see ``conftest.py`` for the grid).

Run ``pytest benchmarks --benchmark-only`` to time; ``--benchmark-disable`` to run each
once. Timings are never asserted.
"""

from __future__ import annotations

import pytest

from arraymlp import bench


@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_hot_path(benchmark, run_benchmark, case, kernel):
    target, batch, width, dtype = case
    benchmark.group = f"{kernel} batch={batch} width={width} {dtype}"
    benchmark.extra_info.update(backend=target.name, kernel=kernel, batch=batch, width=width, dtype=dtype)
    fn = bench.make_kernel(kernel, target, batch, width, dtype)
    run_benchmark(fn)
