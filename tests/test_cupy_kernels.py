"""The CuPy kernel set, checked on the host.

Without a GPU the CuPy row of the parity table (tests/test_kernels.py) skips. Here the
CUDA sources of :mod:`arraymlp.kernels.cupy` are compiled as C++ by the host compiler
(with ``-ffp-contract=off``, as the kernels are built with ``--fmad=false``) behind a
stand-in ``cupy`` module, and each override runs on NumPy arrays against the reference
kernel: the element loop of an ``ElementwiseKernel`` body, a grid of the cross-entropy's
``RawKernel``, and the arguments of the cuBLAS gemm. tests/test_cupy_nvrtc.py compiles
the same sources with CUDA's own compiler (and, where CuPy imports, checks CuPy's typing
of each launch); the launch itself is left to the GPU run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from arraymlp.kernels import KERNELS
from arraymlp.kernels import reference as R

CXX = shutil.which("g++") or shutil.which("c++")
_LIBS: dict = {}
_TMP = Path(tempfile.mkdtemp(prefix="arraymlp-cuda-host-"))

_SHIM = r"""
#include <cmath>
#include <cstring>
using std::exp; using std::log; using std::sqrt;
struct Dim3 { int x; };
static Dim3 blockDim, blockIdx, threadIdx;
#define __global__
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
"""


def _compile(source: str) -> ctypes.CDLL:
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _LIBS:
        src, lib = _TMP / f"{key}.cpp", _TMP / f"{key}.so"
        src.write_text(source)
        subprocess.run([CXX, "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                       capture_output=True, text=True)
        _LIBS[key] = ctypes.CDLL(str(lib))
    return _LIBS[key]


def _ctype(dtype) -> tuple[str, type]:
    return ("float", ctypes.c_float) if dtype == np.float32 else ("double", ctypes.c_double)


class _Elementwise:
    """``cupy.ElementwiseKernel`` on the host: the body in a loop over the elements,
    array parameters bound by reference (outputs) or value (inputs), as CuPy does."""

    def __init__(self, in_params, out_params, operation, name="kernel", *, options=()):
        assert "--fmad=false" in options
        self.ins = [p.strip().split() for p in in_params.split(",")]
        self.outs = [p.strip().split() for p in out_params.split(",")]
        self.body, self.name = operation, name

    def __call__(self, *args):
        assert len(args) == len(self.ins) + len(self.outs), (self.name, len(args))
        outs = args[len(self.ins):]
        assert all(isinstance(o, np.ndarray) and o.flags.c_contiguous for o in outs)
        dtype = outs[0].dtype
        ctype, cscalar = _ctype(dtype)
        shape = outs[0].shape
        params, loads, call = [], [], []
        for (t, name), a in zip(self.ins, args):
            assert t == "T", self.name
            if isinstance(a, np.ndarray):
                assert a.dtype == dtype, (self.name, name, a.dtype)
                params.append(f"const T* {name}_p")
                loads.append(f"const T {name} = {name}_p[i];")
                call.append(np.ascontiguousarray(np.broadcast_to(a, shape)).ctypes.data_as(ctypes.c_void_p))
            else:
                params.append(f"T {name}")
                call.append(cscalar(a))
        for (t, name), a in zip(self.outs, outs):
            assert t == "T" and a.dtype == dtype and a.shape == shape, (self.name, name)
            params.append(f"T* {name}_p")
            loads.append(f"T& {name} = {name}_p[i];")
            call.append(a.ctypes.data_as(ctypes.c_void_p))
        src = (f"{_SHIM}\ntypedef {ctype} T;\nextern \"C\" void run(long n, {', '.join(params)}) {{\n"
               f"  for (long i = 0; i < n; ++i) {{\n    {' '.join(loads)}\n    {self.body}\n  }}\n}}\n")
        _compile(src).run(ctypes.c_long(int(np.prod(shape))), *call)
        return outs[0] if len(outs) == 1 else outs


class _Raw:
    """``cupy.RawKernel`` of the label cross-entropy on the host: every thread of the grid
    in turn."""

    def __init__(self, code, name, *, options=()):
        assert "--fmad=false" in options
        self.code, self.name = code, name

    def __call__(self, grid, block, args):
        x, labels, g, loss, n, k, inv_n = args
        ctype, _ = _ctype(x.dtype)
        driver = (f"extern \"C\" void launch(int gx, int bx, const {ctype}* x, const long long* labels, {ctype}* g, "
                  f"{ctype}* loss, int n, int k, {ctype} inv_n) {{\n  blockDim.x = bx;\n"
                  f"  for (int b = 0; b < gx; ++b) for (int t = 0; t < bx; ++t) {{\n"
                  f"    blockIdx.x = b; threadIdx.x = t; {self.name}(x, labels, g, loss, n, k, inv_n);\n  }}\n}}\n")
        lib = _compile(_SHIM + self.code + driver)
        ptr = ctypes.c_void_p
        scalar = _ctype(x.dtype)[1]
        assert labels.dtype == np.int64 and isinstance(n, np.int32) and isinstance(k, np.int32)
        assert isinstance(inv_n, x.dtype.type)
        lib.launch(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), x.ctypes.data_as(ptr), labels.ctypes.data_as(ptr),
                   g.ctypes.data_as(ptr), loss.ctypes.data_as(ptr), ctypes.c_int(int(n)), ctypes.c_int(int(k)),
                   scalar(float(inv_n)))


GEMMS = []


def _order(a) -> str:
    return "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "strided"


def _gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
    """``cupy.cublas.gemm``'s contract (CuPy 14): ``out = alpha op(a) @ op(b) + beta out``,
    computed here in float64. What CuPy asserts is asserted (2-D operands of one dtype
    among float32, float64, complex64, complex128; ``out`` of shape (m, n) and that dtype;
    ``trans`` of "N", "T" or "H"), and the layouts are recorded: CuPy writes ``out`` in
    place without a copy only when ``out``, ``a`` and ``b`` are each C- or F-contiguous
    (otherwise it computes into an F-ordered copy and copies back)."""
    assert transa in ("N", "T", "H") and transb in ("N", "T", "H")
    assert a.ndim == b.ndim == 2 and a.dtype == b.dtype and a.dtype.char in "fdFD"
    m, k = a.shape if transa == "N" else a.shape[::-1]
    n = b.shape[1] if transb == "N" else b.shape[0]
    assert (b.shape[0] if transb == "N" else b.shape[1]) == k
    assert out is not None and out.ndim == 2 and out.shape == (m, n) and out.dtype == a.dtype
    assert isinstance(alpha, (float, np.floating)) and isinstance(beta, (float, np.floating))  # host scalars
    GEMMS.append((transa, transb, a.shape, b.shape, out.shape, _order(out), _order(a), _order(b)))
    opa = a.T if transa != "N" else a
    opb = b.T if transb != "N" else b
    out[...] = alpha * (opa.astype(np.float64) @ opb.astype(np.float64)) + beta * out
    return out


@pytest.fixture
def host_cupy(monkeypatch):
    """:mod:`arraymlp.kernels.cupy` over a stand-in ``cupy`` that runs its kernels here."""
    if CXX is None:
        pytest.skip("no C++ compiler on this machine")
    fake = types.ModuleType("cupy")
    fake.ElementwiseKernel, fake.RawKernel = _Elementwise, _Raw
    fake.empty_like, fake.empty, fake.int32 = np.empty_like, np.empty, np.int32
    fake.cublas = types.ModuleType("cupy.cublas")
    fake.cublas.gemm = _gemm
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cublas", fake.cublas)
    mod = importlib.import_module("arraymlp.kernels.cupy")
    monkeypatch.setattr(mod, "_on", lambda a: contextlib.nullcontext())
    monkeypatch.setattr(mod, "_BUILT", {})
    GEMMS.clear()
    return mod


def _r(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _same(got, ref, dtype, exact=True):
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
            continue
        g, r = np.asarray(g), np.asarray(r)
        assert g.dtype == r.dtype and g.shape == r.shape
        if exact:
            np.testing.assert_array_equal(g, r)
        else:
            tol = 1e-12 if dtype == np.float64 else 2e-6
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


def test_the_cupy_set_loads_without_cupy_and_every_override_is_in_the_parity_table():
    from tests.test_kernels import CASES

    code = "import sys, arraymlp.kernels.cupy as m; print('cupy' in sys.modules, len(m.OVERRIDES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, n = out.stdout.split()
    assert loaded == "False" and int(n) >= 16  # imported lazily, when a kernel is first built
    mod = importlib.import_module("arraymlp.kernels.cupy")
    assert set(mod.OVERRIDES) <= set(KERNELS) <= set(CASES)
    for name in ("adam_update", "cross_entropy_labels_mean", "dense_relu_forward", "dense_sgd_update",
                 "relu_backward_inplace", "rmsprop_update", "sgd_momentum_update", "tanh_backward_inplace"):
        assert mod.OVERRIDES[name] is getattr(mod, name), name


DTYPES = (np.float64, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["relu_backward_inplace", "tanh_backward_inplace", "sigmoid_backward_inplace"])
def test_activation_backward_kernels(host_cupy, name, dtype):
    dy, y = _r((50, 7), 0, dtype), _r((50, 7), 1, dtype)
    if name != "relu_backward_inplace":
        y = np.tanh(y) if name.startswith("tanh") else 1 / (1 + np.exp(-y))
    y[0, 0], dy[1, 1] = 0.0, np.nan  # the boundary and a NaN carried through
    got = getattr(host_cupy, name)(dy.copy(), y, np)
    ref = getattr(R, name)(dy.copy(), y, np)
    _same((got,), (ref,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_kernel(host_cupy, dtype):
    x, W, b = _r((40, 9), 2, dtype), _r((9, 6), 3, dtype), _r((6,), 4, dtype)
    got = host_cupy.dense_relu_forward(x, W, b, np)
    ref = R.dense_relu_forward(x, W, b, np)
    _same((got,), (ref,), dtype)
    assert np.any(got == 0) and np.any(got > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel(host_cupy, dtype):
    x = _r((300, 10), 5, dtype) * 3
    x[7, 2] = -np.inf  # a masked logit
    labels = np.arange(300) % 10
    got = host_cupy.cross_entropy_labels_mean(x, labels, np)
    ref = R.cross_entropy_labels_mean(x, labels, np)
    _same(got, ref, dtype, exact=False)  # the row sums run in another order
    bad = labels.copy()
    bad[3] = 10  # outside the classes: NaN, never a silent value
    total, g = host_cupy.cross_entropy_labels_mean(x, bad, np)
    assert np.isnan(total) and np.isnan(g[3]).all() and np.isfinite(np.delete(g, 3, axis=0)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_sgd_update_is_one_gemm_into_W(host_cupy, dtype):
    x, dy, W, b = _r((9, 16), 6, dtype), _r((9, 12), 7, dtype), _r((16, 12), 8, dtype), _r((12,), 9, dtype)
    W0 = W.copy()
    gotW, gotb = host_cupy.dense_sgd_update(x, dy, W, b.copy(), 0.05, 0.3, np)
    refW, refb = R.dense_sgd_update(x, dy, W0.copy(), b.copy(), 0.05, 0.3, np)
    assert gotW is W and GEMMS == [("T", "N", (9, 16), (9, 12), (16, 12), "C", "C", "C")]
    _same((gotW, gotb), (refW, refb), dtype, exact=False)


@pytest.mark.parametrize("layout", ["F-ordered W", "F-ordered x and dy", "one output column"])
def test_dense_sgd_update_gemm_takes_every_layout_cublas_writes_in_place(host_cupy, layout):
    """An F-ordered ``W`` (a transposed copy, a loaded file), F-ordered operands, and a
    (n_in, 1) ``W`` (both C- and F-contiguous) are written in place by the gemm, with
    the reference's values; a strided ``W`` (a view) takes the reference."""
    n_out = 1 if layout == "one output column" else 12
    x, dy, W, b = _r((9, 16), 6), _r((9, n_out), 7), _r((16, n_out), 8), _r((n_out,), 9)
    if layout == "F-ordered W":
        W = np.asfortranarray(W)
    elif layout == "F-ordered x and dy":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    refW, refb = R.dense_sgd_update(x, dy, W.copy(), b.copy(), 0.05, 0.3, np)
    gotW, gotb = host_cupy.dense_sgd_update(x, dy, W, b.copy(), 0.05, 0.3, np)
    assert gotW is W and len(GEMMS) == 1 and "strided" not in GEMMS[0]
    _same((gotW, gotb), (refW, refb), np.float64, exact=False)
    GEMMS.clear()
    big = _r((16, 2 * n_out), 10)
    view = big[:, ::2]  # strided: the reference, not a gemm into a copy
    refW, _ = R.dense_sgd_update(x, dy, view.copy(), None, 0.05, 0.3, np)
    gotW, _ = host_cupy.dense_sgd_update(x, dy, view, None, 0.05, 0.3, np)
    assert not GEMMS
    _same((gotW,), (refW,), np.float64)


_SGD = [dict(nesterov=False, first=True, wd=0.0), dict(nesterov=False, first=False, wd=0.01),
        dict(nesterov=True, first=False, wd=0.0)]
_ADAM = [dict(decoupled=False, wd=0.0, ams=False), dict(decoupled=False, wd=0.05, ams=True),
         dict(decoupled=True, wd=0.05, ams=False)]
_RMS = [dict(centered=c, momentum=m, wd=w) for c, m, w in ((False, 0.0, 0.0), (True, 0.0, 0.02), (False, 0.9, 0.0),
                                                           (True, 0.9, 0.02))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _SGD, ids=str)
def test_momentum_sgd_kernel(host_cupy, case, dtype):
    p, g, buf = _r((300,), 10, dtype), _r((300,), 11, dtype), _r((300,), 12, dtype)
    if case["first"]:
        buf[...] = 0
    args = (0.1, 0.9, 0.0 if case["nesterov"] else 0.2, case["nesterov"], case["wd"], case["first"], np)
    got = host_cupy.sgd_momentum_update(p.copy(), g, buf.copy(), *args)
    ref = R.sgd_momentum_update(p.copy(), g, buf.copy(), *args)
    _same(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _ADAM, ids=str)
def test_adam_kernel(host_cupy, case, dtype):
    p, g, m = _r((300,), 13, dtype), _r((300,), 14, dtype), _r((300,), 15, dtype)
    v, vmax = np.abs(_r((300,), 16, dtype)), np.abs(_r((300,), 17, dtype))
    vm = vmax.copy() if case["ams"] else None
    args = (0.01, 0.9, 0.999, 1e-8, case["wd"], case["decoupled"], 3, np)
    got = host_cupy.adam_update(p.copy(), g, m.copy(), v.copy(), vm, *args)
    ref = R.adam_update(p.copy(), g, m.copy(), v.copy(), None if vm is None else vmax.copy(), *args)
    _same(got, ref, dtype, exact=False)  # sqrt and division: correctly rounded in both, kept to 1 ulp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _RMS, ids=str)
def test_rmsprop_kernel(host_cupy, case, dtype):
    p, g = _r((300,), 18, dtype), _r((300,), 19, dtype)
    v, gbar, buf = np.abs(_r((300,), 20, dtype)) + 1, 0.1 * _r((300,), 21, dtype), _r((300,), 22, dtype)
    gb = gbar.copy() if case["centered"] else None
    bf = buf.copy() if case["momentum"] else None
    args = (0.01, 0.99, 1e-8, case["momentum"], case["wd"], np)
    got = host_cupy.rmsprop_update(p.copy(), g, v.copy(), gb, bf, *args)
    ref = R.rmsprop_update(p.copy(), g, v.copy(), None if gb is None else gbar.copy(),
                           None if bf is None else buf.copy(), *args)
    _same(got, ref, dtype, exact=False)


def test_ineligible_arguments_take_the_reference(host_cupy):
    """float16 (and mixed dtypes) are not taken by the kernels: the reference runs."""
    p, g = _r((20,), 23, np.float16), _r((20,), 24, np.float16)
    buf = np.zeros(20, np.float16)
    got = host_cupy.sgd_momentum_update(p.copy(), g, buf.copy(), 0.1, 0.9, 0.0, False, 0.0, True, np)
    ref = R.sgd_momentum_update(p.copy(), g, buf.copy(), 0.1, 0.9, 0.0, False, 0.0, True, np)
    _same(got, ref, np.float16)
    assert not host_cupy._BUILT  # no kernel was built
