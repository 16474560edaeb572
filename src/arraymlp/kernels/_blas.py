"""NumPy's own BLAS, for the product NumPy cannot express: ``C = beta*C + alpha*A.T @ B``.

``numpy.matmul`` always writes a fresh product (BLAS ``beta = 0``), so a weight update
``W -= lr * (x.T @ dy)`` costs the product plus two passes over a temporary the size
of ``W``. BLAS's ``gemm`` accumulates into ``W`` itself. This module finds the
OpenBLAS that NumPy's wheels bundle (``scipy-openblas``), the very library, and
thread pool, behind ``numpy.matmul``, and calls its CBLAS ``gemm`` through ctypes.

Where it is not found (NumPy built against MKL, Accelerate or a system BLAS, or
another platform), :func:`gemm_acc` returns False and callers take the
standard path, which is also the reference the tests compare this one with.
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Any

import numpy

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_UNSET = object()
_gemm: Any = _UNSET  # {dtype: (function, int type)} once looked up; None when absent


def _find() -> dict | None:
    try:
        blas = numpy.__config__.CONFIG["Build Dependencies"]["blas"]
    except (AttributeError, KeyError, TypeError):
        return None
    if blas.get("name") not in ("scipy-openblas", "scipy-openblas64", "scipy-openblas32"):
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs")
    found = sorted(os.path.realpath(f) for f in glob.glob(os.path.join(libs, "libscipy_openblas*.so*")))
    try:  # the copy NumPy has loaded, not another file beside it (a second thread pool)
        with open("/proc/self/maps") as maps:
            loaded = {line.split(None, 5)[-1].strip() for line in maps if "libscipy_openblas" in line}
        found = [f for f in found if f in loaded]
    except OSError:
        pass
    if len(found) != 1:
        return None
    try:
        lib = ctypes.CDLL(found[0])
    except OSError:
        return None
    table = {}
    for dt, letter, real in ((numpy.dtype(numpy.float32), "s", ctypes.c_float),
                             (numpy.dtype(numpy.float64), "d", ctypes.c_double)):
        for name, itype in ((f"scipy_cblas_{letter}gemm64_", ctypes.c_int64),
                            (f"scipy_cblas_{letter}gemm", ctypes.c_int32)):
            fn = getattr(lib, name, None)
            if fn is not None:
                p = ctypes.c_void_p
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, itype, itype, itype,
                               real, p, itype, p, itype, real, p, itype]
                fn.restype = None
                table[dt] = (fn, itype)
                break
    return table or None


def available() -> bool:
    """Whether NumPy's bundled BLAS was found (looked up once, on first use)."""
    global _gemm
    if _gemm is _UNSET:
        _gemm = _find()
    return _gemm is not None


def _rows(a: numpy.ndarray, it: int) -> int | None:
    """Leading dimension of a 2-d array with unit-stride rows, else None."""
    s0, s1 = a.strides
    if s1 != it and a.shape[1] > 1:
        return None
    if s0 % it or s0 < max(a.shape[1], 1) * it:
        return None
    return s0 // it


def gemm_acc(c: Any, a: Any, b: Any, alpha: float = 1.0, beta: float = 1.0) -> bool:
    """``c = beta * c + alpha * (a.T @ b)`` in place, by one BLAS call, if it can.

    With ``beta = 1`` the product adds to what ``c`` holds: the weights of an SGD step
    (``alpha = -lr``), say.

    Parameters
    ----------
    c : numpy.ndarray, shape (m, n)
        C-contiguous, writeable, float32 or float64; overwritten.
    a : numpy.ndarray, shape (k, m)
    b : numpy.ndarray, shape (k, n)
        Same dtype as ``c``, rows of unit stride (any row stride), not overlapping ``c``.
    alpha, beta : float

    Returns
    -------
    bool
        True when done; False (``c`` untouched) when the BLAS is absent or the
        arrays do not qualify, so the caller takes the standard path.
    """
    if not available():
        return False
    if type(a) is not numpy.ndarray or type(b) is not numpy.ndarray or type(c) is not numpy.ndarray:
        return False
    entry = _gemm.get(c.dtype)
    if entry is None or a.dtype != c.dtype or b.dtype != c.dtype:
        return False
    if a.ndim != 2 or b.ndim != 2 or c.ndim != 2:
        return False
    k, m = a.shape
    n = c.shape[1]
    if b.shape[0] != k or c.shape[0] != m or b.shape[1] != n or min(k, m, n) < 1:
        return False
    it = c.itemsize
    if not (c.flags.c_contiguous and c.flags.writeable and c.flags.aligned
            and a.flags.aligned and b.flags.aligned):
        return False
    lda, ldb = _rows(a, it), _rows(b, it)
    if lda is None or ldb is None:
        return False
    if numpy.may_share_memory(c, a) or numpy.may_share_memory(c, b):
        return False
    fn, itype = entry
    if itype is ctypes.c_int32 and max(m, n, k, lda, ldb) >= 2**31:  # an LP64 build's int
        return False
    fn(_ROW_MAJOR, _TRANS, _NO_TRANS, itype(m), itype(n), itype(k), alpha, a.ctypes.data,
       itype(lda), b.ctypes.data, itype(ldb), beta, c.ctypes.data, itype(n))
    return True
