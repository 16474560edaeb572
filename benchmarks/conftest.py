"""Parameters of the pytest-benchmark suites of the hot path.

``pytest benchmarks --benchmark-only`` times a small default grid on every backend
present; ``ARRAYMLP_BENCH_FULL=1`` opts in to the full grid (batch sizes 1 ... 16384,
widths 64 ... 4096, float32 and float64, and float16 / TF32 on GPU rows). CPU rows of
the full grid skip the sizes whose single call is beyond ``2**33`` multiply-adds
(minutes per benchmark on a small CPU) unless ``ARRAYMLP_BENCH_HUGE=1``.

``pytest benchmarks --benchmark-disable`` runs every benchmark once, untimed, so that
CI keeps the suites working; nothing here asserts a time.
"""

from __future__ import annotations

import os

import pytest

from arraymlp import bench


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


FULL = _flag("ARRAYMLP_BENCH_FULL")
HUGE = _flag("ARRAYMLP_BENCH_HUGE")

BATCHES = (1, 16, 64, 256, 1024, 4096, 16384) if FULL else (16, 1024)
WIDTHS = (64, 256, 1024, 4096) if FULL else (64, 256)
DTYPES = ("float32", "float64", "float16", "tf32") if FULL else ("float32",)
GPU_ONLY_DTYPES = ("float16", "tf32")
CPU_MAC_LIMIT = 2**33

_AVAILABLE = set(bench.available_targets())
_REASONS = {
    "torch": "torch is not installed",
    "cupy": "no CUDA GPU with CuPy",
    "torch-cuda": "no CUDA GPU with torch",
}

#: One row per backend: numpy, torch (CPU), cupy and torch-cuda (skipped when absent).
BACKEND_PARAMS = [
    pytest.param(
        name,
        id=name,
        marks=pytest.mark.skipif(name not in _AVAILABLE, reason=_REASONS.get(name, "not available")),
    )
    for name in bench.TARGETS
]


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", BATCHES, ids=[f"n{b}" for b in BATCHES])
    if "width" in metafunc.fixturenames:
        metafunc.parametrize("width", WIDTHS, ids=[f"w{w}" for w in WIDTHS])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES)


@pytest.fixture(params=BACKEND_PARAMS)
def target(request) -> bench.Target:
    """The backend row (a :class:`arraymlp.bench.Target`)."""
    return bench.TARGETS[request.param]


@pytest.fixture
def case(target, batch, width, dtype):
    """Skip the combinations a row does not run; return ``(target, batch, width, dtype)``."""
    if dtype in GPU_ONLY_DTYPES and not target.gpu:
        pytest.skip(f"{dtype} is measured on GPU rows only")
    if not target.gpu and not HUGE and batch * width * width > CPU_MAC_LIMIT:
        pytest.skip("beyond the CPU rows' size budget; set ARRAYMLP_BENCH_HUGE=1 to run it")
    return target, batch, width, dtype


@pytest.fixture
def run_benchmark(benchmark):
    """``run_benchmark(fn)``: warm ``fn`` up (first calls, GPU kernel compilation and
    allocator growth), then time it; ``fn`` synchronises its device itself."""

    def run(fn, warmup: int = 2):
        for _ in range(warmup):
            fn()
        return benchmark(fn)

    return run
