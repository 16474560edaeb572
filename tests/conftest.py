"""The backend fixture: every kernel, layer, model, optimiser and training test runs
on each row (numpy, read-only numpy inputs, array_api_strict on two devices, torch on
the CPU, and CuPy / torch-CUDA rows that skip without a GPU)."""

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

    @property
    def xp(self):
        return resolve_backend(self.name)

    def asarray(self, a, dtype=None):
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
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


@pytest.fixture(params=BACKEND_ROWS)
def backend(request) -> Backend:
    """A backend row; see :class:`Backend`."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def torch_or_skip():
    return pytest.importorskip("torch")
