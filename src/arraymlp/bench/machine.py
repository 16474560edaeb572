"""The machine behind a run's figures: CPU, devices, threads, BLAS and versions.

:func:`environment` records where the numbers come from, for the JSON file and the
heading of the table.
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from typing import Any

import numpy

from .workloads import _cupy_gpu, _has, _torch_cuda

__all__ = ["environment"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    if not _has(module):
        return None
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as exc:  # an installed but broken package
        return f"unavailable ({type(exc).__name__})"


def _blas_info() -> list[dict[str, Any]] | dict[str, Any]:
    try:
        import threadpoolctl

        return [
            {k: v for k, v in lib.items() if k in ("user_api", "internal_api", "prefix", "version",
                                                    "num_threads", "architecture", "threading_layer")}
            for lib in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        try:
            cfg = numpy.show_config(mode="dicts")
            return dict(cfg.get("Build Dependencies", {}))
        except Exception:
            return {}


def _gpus() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if _cupy_gpu():
        import cupy

        for i in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"]
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_bytes": int(props.get("totalGlobalMem", 0)), "via": "cupy"})
    elif _torch_cuda():
        import torch

        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory), "via": "torch"})
    return out


def environment() -> dict[str, Any]:
    """Where the numbers come from: machine, devices, threads, BLAS and versions.

    Returns
    -------
    dict
        Keys ``device_name``, ``cpu_model``, ``cpu_count``, ``threads``, ``blas``,
        ``gpus``, ``versions``, ``jit_kernels`` (whether NumPy's hot path runs the
        compiled kernels of :mod:`arraymlp.kernels._jit`), ``kernels``
        (``"reference"`` when the reference set is forced, ``"backend"``
        otherwise), ``python``, ``platform``, ``timestamp``.
    """
    gpus = _gpus()
    threads: dict[str, Any] = {"os_cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        threads["affinity"] = len(os.sched_getaffinity(0))
    if _has("torch"):
        import torch

        threads["torch"] = torch.get_num_threads()
    blas = _blas_info()
    if isinstance(blas, list):
        threads["blas"] = [lib.get("num_threads") for lib in blas if lib.get("user_api") == "blas"]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            threads[var] = os.environ[var]
    cpu = _cpu_model()
    name = f"{cpu} ({os.cpu_count()} cores)"
    if gpus:
        name += " + " + ", ".join(g["name"] for g in gpus)
    versions = {m: _version(m) for m in ("numpy", "cupy", "torch", "sklearn", "array_api_compat",
                                        "array_api_strict", "matplotlib", "numba")}
    from .._version import __version__
    from ..kernels import _jit, reference_forced

    versions["arraymlp"] = __version__
    return {
        "device_name": name,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "blas": blas,
        "gpus": gpus,
        "versions": versions,
        "jit_kernels": _jit.kernels() is not None and not reference_forced(),
        "kernels": "reference" if reference_forced() else "backend",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
