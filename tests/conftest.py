"""The backend fixture: every kernel, layer, model, optimiser and training test runs
on each row (numpy, read-only numpy inputs, array_api_strict on two devices, torch on
the CPU, JAX on the CPU in its default 32-bit mode, and CuPy / torch-CUDA rows that
skip without a GPU).

A module that sets ``JAX_X64 = True`` also gets a ``jax-x64`` row: JAX with its 64-bit
mode switched on for that one test only (``jax.enable_x64``, a thread-local setting
that is restored when the test ends, so no other row sees it). It runs what the 32-bit
``jax`` row could not, at the tests' float64 tolerances: its float32 and float16 cases
are left out (deselected), and a test that ran on the ``jax`` row earlier in the session
is skipped here (where the ``jax`` row did not run, as under ``-k jax-x64``, it runs).
That needs the two rows in one process, the jax row first: under pytest-xdist, use
``--dist loadfile`` (the README's command), which runs each module in one worker in
collection order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import numpy as np
import pytest

from arraymlp._backend import canonical_device, device_of, resolve_backend, to_numpy


@dataclasses.dataclass
class Backend:
    """One row of the backend matrix.

    ``asarray`` builds a test input from a NumPy array on this row's namespace and
    device (read-only on the ``numpy-readonly`` row, so that any mutation of a user's
    input fails loudly); ``to_numpy`` brings a result back for comparison.
    """

    id: str
    name: str  # backend name as passed to backend=
    device: Any = None
    readonly: bool = False
    # on a row without float64 (JAX in 32-bit mode), float64 test data: "skip" the test,
    # or "float32" (a module with FLOAT64_DATA = "float32" has tests that hold in float32)
    float64_data: str = "skip"
    # JAX with its 64-bit mode on for the test's duration (the jax-x64 row)
    x64: bool = False

    @property
    def xp(self):
        return resolve_backend(self.name)

    @property
    def has_float64(self) -> bool:
        """Whether this row makes float64 arrays (not JAX in its default 32-bit mode)."""
        from arraymlp._backend import has_float64

        return has_float64(self.xp, self.device)

    def float_dtype(self, want: str = "float64") -> str:
        """``want``, or ``"float32"`` where the row has no float64."""
        return want if want != "float64" or self.has_float64 else "float32"

    def tol(self, tol64: float, dtype: str = "float64") -> float:
        """A tolerance for results computed from float64 test data: ``tol64`` where the
        row computes in float64, else the same number of units of roundoff (eps) of the
        dtype it computes in (float32 on JAX's 32-bit mode: ``tol64 * 2**29``). Only for
        tolerances that are a count of roundoffs, not for truncation errors."""
        got = self.float_dtype(dtype)
        return tol64 if got == dtype else tol64 * float(np.finfo(got).eps / np.finfo(dtype).eps)

    def skip_without_float64(self) -> None:
        """Skip the calling test on a row without float64 (JAX in 32-bit mode)."""
        if not self.has_float64:
            pytest.skip(f"the {self.id} row has no float64 (JAX's default 32-bit mode)")

    def asarray(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if a.dtype == np.float64 and self.name == "jax" and not self.has_float64:
            if self.float64_data != "float32":
                pytest.skip(f"float64 test data: the {self.id} row has no float64 (JAX's default 32-bit mode)")
            a = a.astype(np.float32)
        if self.name == "numpy":
            a = np.array(a, copy=True)
            if self.readonly:
                a.flags.writeable = False
            return a
        xp = self.xp
        if self.name == "torch":
            import torch

            return torch.asarray(np.array(a, order="C", copy=True), device=self.device or "cpu")
        return xp.asarray(a, device=self.device) if self.device is not None else xp.asarray(a)

    def to_numpy(self, x):
        return np.asarray(to_numpy(x))

    def model_kwargs(self):
        return {"backend": self.name, "device": self.device}

    def same_place(self, x) -> bool:
        from array_api_compat import array_namespace

        return array_namespace(x) is self.xp and device_of(x) == canonical_device(self.xp, self.device)


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _gpu() -> bool:
    if not _has("cupy"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _rows():
    import array_api_strict

    rows = [
        pytest.param(Backend("numpy", "numpy"), id="numpy"),
        pytest.param(Backend("numpy-readonly", "numpy", readonly=True), id="numpy-readonly"),
        pytest.param(Backend("strict", "array_api_strict"), id="strict"),
        pytest.param(
            Backend("strict-device1", "array_api_strict", device=array_api_strict.Device("device1")),
            id="strict-device1",
        ),
        pytest.param(
            Backend("torch", "torch", device="cpu"),
            id="torch",
            marks=pytest.mark.skipif(not _has("torch"), reason="torch is not installed"),
        ),
        pytest.param(
            Backend("jax", "jax"),
            id="jax",
            marks=pytest.mark.skipif(not _has("jax"), reason="jax is not installed"),
        ),
        pytest.param(
            Backend("jax-x64", "jax", x64=True),
            id="jax-x64",
            marks=pytest.mark.skipif(not _has("jax"), reason="jax is not installed"),
        ),
        pytest.param(
            Backend("cupy", "cupy"),
            id="cupy",
            marks=pytest.mark.skipif(not _gpu(), reason="no CUDA GPU with CuPy"),
        ),
        pytest.param(
            Backend("torch-cuda", "torch", device="cuda"),
            id="torch-cuda",
            marks=pytest.mark.skipif(not _torch_cuda(), reason="no CUDA GPU with torch"),
        ),
    ]
    return rows


BACKEND_ROWS = _rows()


_NO_FLOAT64 = "runs in its default 32-bit mode, where float64 arrays are float32"


#: nodeid of a test on the 32-bit jax row -> whether it ran there (was not skipped)
_RAN_ON_JAX32: dict[str, bool] = {}


def _row_of(item) -> Backend | None:
    row = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
    return row if isinstance(row, Backend) else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember, for the jax-x64 row, which tests the 32-bit jax row ran."""
    report = yield
    row = _row_of(item)
    if row is not None and row.name == "jax" and not row.x64:
        if report.skipped:
            _RAN_ON_JAX32[item.nodeid] = False
        elif report.when == "call":
            _RAN_ON_JAX32[item.nodeid] = True
    return report


def _jax32_twin(nodeid: str) -> str:
    """The nodeid of the same test on the 32-bit jax row."""
    return re.sub(r"(?<=[\[-])jax-x64(?=[\]-])", "jax", nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that asks a row without float64 (JAX in 32-bit mode) for a float64 model
    gets the library's ValueError saying so; that test is skipped with that reason,
    any other error stays an error."""
    try:
        return (yield)
    except ValueError as exc:
        row = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if isinstance(row, Backend) and _NO_FLOAT64 in str(exc) and not row.has_float64:
            pytest.skip(f"float64 model: the {row.id} row has no float64 (JAX's default 32-bit mode)")
        raise


_NARROW_DTYPES = ("float32", "float16", "bfloat16")


def _dtype_param(v) -> str | None:
    """The dtype a test parameter names (``"float32"``, ``np.float64``, ...), or None."""
    if isinstance(v, str):
        return v if v in (*_NARROW_DTYPES, "float64") else None
    if isinstance(v, (type, np.dtype)):
        try:
            return np.dtype(v).name
        except TypeError:
            return None
    return None


def _x64_row_runs(item) -> bool:
    """Whether ``item`` on the jax-x64 row is kept: its module opted in
    (``JAX_X64 = True``) and no parameter asks for a dtype narrower than float64
    (the 32-bit ``jax`` row runs those)."""
    if not getattr(item.module, "JAX_X64", False):
        return False
    params = getattr(getattr(item, "callspec", None), "params", {})
    return not any(_dtype_param(v) in _NARROW_DTYPES for v in params.values())


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8, and at most one per 5 GiB of memory
    (a worker holding torch, JAX and the suite's data reached about 4.7 GB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    by_memory = max(1, memory // (5 * 2**30)) if memory else cores
    return max(1, min(cores, 8, by_memory))


# The modules that take longest, longest first. Under pytest-xdist (``--dist loadfile``)
# modules go to the workers in collection order; starting the long ones first keeps one
# worker from running test_training.py (a third of the suite) alone at the end.
_LONGEST_FIRST = ("test_training.py", "test_sklearn_members.py", "test_fast_paths.py", "test_sklearn.py",
                  "test_losses.py", "test_ensemble.py", "test_precision.py", "test_functional.py",
                  "test_onnx.py", "test_distributed.py")


def _module_rank(item) -> int:
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    """Leave the jax-x64 row out where it would only repeat the jax row (see the module
    docstring), and start the longest modules first (the order within a module is kept)."""
    keep, drop = [], []
    for item in items:
        row = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        (drop if isinstance(row, Backend) and row.x64 and not _x64_row_runs(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=_module_rank)


@pytest.fixture
def one_blas_thread():
    """One BLAS / OpenMP thread while a test runs (modules of small problems use it with
    ``pytestmark = pytest.mark.usefixtures("one_blas_thread")``): threads gain nothing
    there, and on a busy machine spinning worker threads slow them down by orders of
    magnitude. Restored afterwards."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(params=BACKEND_ROWS)
def backend(request) -> Backend:
    """A backend row; see :class:`Backend`. A test module that sets
    ``FLOAT64_DATA = "float32"`` gets its float64 test data as float32 on a row
    without float64 (its tolerances fit float32); elsewhere such a test skips there.
    On the jax-x64 row, JAX's 64-bit mode is on from here to the test's end."""
    row = request.param
    mode = getattr(request.module, "FLOAT64_DATA", None)
    row = dataclasses.replace(row, float64_data=mode) if mode else row
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if any(_dtype_param(v) == "float64" for v in params.values()) and not row.x64 and not row.has_float64:
        pytest.skip(f"the float64 case: the {row.id} row runs the float32 one"
                    + (", the jax-x64 row this one" if getattr(request.module, "JAX_X64", False) else ""))
    if not row.x64:
        yield row
        return
    if _RAN_ON_JAX32.get(_jax32_twin(request.node.nodeid)):
        pytest.skip("ran on the jax row (32-bit mode); this row runs what needs float64")
    with _jax_x64_mode():
        yield row


def _jax_x64_mode():
    """JAX's 64-bit mode for a block: ``jax.enable_x64(True)`` where JAX has it (0.6 on),
    ``jax.experimental.enable_x64()`` before."""
    import jax

    state = getattr(jax, "enable_x64", None)
    if state is not None:
        return state(True)
    from jax.experimental import enable_x64

    return enable_x64(True)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def torch_or_skip():
    return pytest.importorskip("torch")
