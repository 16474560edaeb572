"""The backend fixture: every kernel, layer, model, optimiser and training test runs
on each row (numpy, read-only numpy inputs, array_api_strict on two devices, torch on
the CPU, JAX on the CPU in its default 32-bit mode, and CuPy / torch-CUDA rows that
skip without a GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
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


@pytest.fixture(params=BACKEND_ROWS)
def backend(request) -> Backend:
    """A backend row; see :class:`Backend`. A test module that sets
    ``FLOAT64_DATA = "float32"`` gets its float64 test data as float32 on a row
    without float64 (its tolerances fit float32); elsewhere such a test skips there."""
    row = request.param
    mode = getattr(request.module, "FLOAT64_DATA", None)
    return dataclasses.replace(row, float64_data=mode) if mode else row


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def torch_or_skip():
    return pytest.importorskip("torch")
