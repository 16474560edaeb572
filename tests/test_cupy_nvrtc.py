"""The CuPy kernel set's CUDA sources, compiled by NVRTC.

NVRTC (CUDA's runtime compiler, the one CuPy hands its kernels to) needs no GPU and no
driver: only its library, ``libnvrtc`` (the ``nvidia-cuda-nvrtc`` wheel for CUDA 13,
``nvidia-cuda-nvrtc-cu12`` for CUDA 12, or a CUDA toolkit). Every kernel that
:mod:`arraymlp.kernels.cupy` builds is recorded by driving each override over every
variant it has (optimiser options, per-member hyper-parameter arrays, float32 and
float64) behind a recording stand-in ``cupy``, then compiled for compute capability 9.0
(H100) with the options CuPy adds to the set's own (``--std=c++17``, ``-ftz=true``,
``--device-as-default-execution-space``). A compile error or any warning fails.

Two views of each ``ElementwiseKernel``: the body inside a plain element loop (this
needs only ``libnvrtc``), and, where CuPy imports (it does without a GPU), the exact
source CuPy generates for the call, with its ``CArray``/``CIndexer`` parameters and its
headers. The PTX is checked too: the kernel is there under its name, and the element
kernels hold no fused multiply-add (``--fmad=false``: the reference's roundings). Where
CuPy imports, its typing of every launch (the dtype ``T`` takes, Python numbers cast to
it) is checked as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.util
import itertools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ARCH = "--gpu-architecture=compute_90"  # H100; NVRTC needs no device for it
#: what CuPy appends to a kernel's own options before NVRTC sees them (CuPy 14)
CUPY_TAIL = ("-ftz=true", ARCH, "--device-as-default-execution-space")


# ------------------------------------------------------------------------ NVRTC by ctypes
def _nvrtc_candidates() -> list[str]:
    """Where ``libnvrtc`` may be: the NVIDIA wheels (``nvidia/cu13/lib``,
    ``nvidia/cuda_nvrtc/lib``), a toolkit named by ``CUDA_PATH``/``CUDA_HOME``, the
    loader's search path."""
    found: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        found += sorted(Path(root).glob("*/lib/libnvrtc.so*"), reverse=True)
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            found += sorted(Path(os.environ[env]).glob("lib*/libnvrtc.so*"), reverse=True)
    names = [str(p) for p in found if "builtins" not in p.name]
    lib = ctypes.util.find_library("nvrtc")
    return names + ([lib] if lib else [])


class NVRTC:
    """The few NVRTC entry points a compile needs."""

    def __init__(self, path: str):
        self.path, self.lib = path, ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            msg = f"{what}: {self.lib.nvrtcGetErrorString(code).decode()}"
            raise RuntimeError(msg)

    def compile(self, source: str, options, name: str = "kernel.cu") -> tuple[bool, str, str]:
        """``(compiled, log, ptx)`` of ``source`` under ``options``."""
        lib, prog = self.lib, ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [o.encode() for o in options]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            ptx = b""
            if rc == 0:
                self._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
                buf = ctypes.create_string_buffer(size.value)
                self._check(lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
                ptx = buf.value
            return rc == 0, log.value.decode(errors="replace").strip(), ptx.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc() -> NVRTC:
    tried = []
    for path in _nvrtc_candidates():
        try:
            return NVRTC(path)
        except (OSError, AttributeError, RuntimeError) as e:
            tried.append(f"{path}: {e}")
    pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit with CUDA_PATH set)"
                + (f"; tried {tried}" if tried else ""))


# ------------------------------------------------------- the kernels the CuPy set builds
class _Kernel:
    """A kernel built by the set, and the calls it received (arguments as given)."""

    def __init__(self, kind: str, spec: tuple, options: tuple):
        self.kind, self.spec, self.options, self.calls = kind, spec, tuple(options), []

    def __call__(self, *args):
        self.calls.append(args)


def _recording_cupy(built: list) -> types.ModuleType:
    fake = types.ModuleType("cupy")

    def elementwise(in_params, out_params, operation, name="kernel", *, options=()):
        k = _Kernel("elementwise", (in_params, out_params, operation, name), options)
        built.append(k)
        return k

    def raw(code, name, *, options=()):
        k = _Kernel("raw", (code, name), options)
        built.append(k)
        return k

    fake.ElementwiseKernel, fake.RawKernel = elementwise, raw
    fake.empty_like, fake.empty, fake.int32 = np.empty_like, np.empty, np.int32
    fake.cublas = types.ModuleType("cupy.cublas")
    fake.cublas.gemm = lambda *a, **k: None
    return fake


def _drive(mod, dtype) -> None:
    """Every override of the set over every variant it builds a kernel for, on NumPy
    arrays of ``dtype``: plain arrays (n,) and an ensemble's stacked (K, n, m) with its
    per-member hyper-parameters as (K, 1, 1) arrays."""
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, W, b = r(6, 4), r(4, 3), r(3)
    mod.dense_relu_forward(x, W, b, np)
    for name in ("relu_backward_inplace", "tanh_backward_inplace", "sigmoid_backward_inplace"):
        getattr(mod, name)(r(6, 3), r(6, 3), np)
    mod.cross_entropy_labels_mean(r(6, 3), np.arange(6, dtype=np.int64) % 3, np)
    mod.dense_sgd_update(x, r(6, 3), W, b, 0.1, 0.01, np)
    for shape, hyper in (((5,), float), ((2, 4, 3), lambda v: np.full((2, 1, 1), v, dtype=dtype))):
        p = r(*shape)
        for nesterov, first, wd in itertools.product((False, True), (False, True), (0.0, 0.01)):
            mod.sgd_momentum_update(p, r(*shape), r(*shape), hyper(0.1), hyper(0.9), 0.0, nesterov, hyper(wd)
                                    if wd else 0.0, first, np)
        for decoupled, wd, ams in itertools.product((False, True), (0.0, 0.05), (False, True)):
            mod.adam_update(p, r(*shape), r(*shape), np.abs(r(*shape)), np.abs(r(*shape)) if ams else None,
                            hyper(0.01), hyper(0.9), hyper(0.999), 1e-8, hyper(wd) if wd else 0.0, decoupled, 3, np)
        for centered, momentum, wd in itertools.product((False, True), (0.0, 0.9), (0.0, 0.02)):
            mod.rmsprop_update(p, r(*shape), np.abs(r(*shape)) + 1, r(*shape) if centered else None,
                               r(*shape) if momentum else None, hyper(0.01), 0.99, 1e-8, hyper(momentum)
                               if momentum else 0.0, hyper(wd) if wd else 0.0, np)


@pytest.fixture(scope="module")
def built() -> dict:
    """``{dtype name: [kernels built, with their calls]}``, recorded behind a stand-in
    ``cupy`` (restored afterwards)."""
    out = {}
    mod = importlib.import_module("arraymlp.kernels.cupy")
    for dtype in (np.float32, np.float64):
        kernels: list = []
        fake = _recording_cupy(kernels)
        saved = {k: sys.modules.get(k) for k in ("cupy", "cupy.cublas")}
        saved_on, saved_built = mod._on, mod._BUILT
        try:
            sys.modules["cupy"], sys.modules["cupy.cublas"] = fake, fake.cublas
            mod._on, mod._BUILT = (lambda a: contextlib.nullcontext()), {}
            _drive(mod, dtype)
        finally:
            mod._on, mod._BUILT = saved_on, saved_built
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        out[np.dtype(dtype).name] = kernels
    return out


def test_every_kernel_of_the_set_is_recorded(built):
    """The drive reaches every kernel body the set can build (a new override or variant
    that is not driven here fails this count)."""
    for dtype, kernels in built.items():
        bodies = {k.spec for k in kernels if k.kind == "elementwise"}
        names = sorted({k.spec[3] for k in kernels if k.kind == "elementwise"})
        assert names == ["arraymlp_adam", "arraymlp_bias_relu", "arraymlp_relu_bw", "arraymlp_rmsprop",
                         "arraymlp_sgd_momentum", "arraymlp_sigmoid_bw", "arraymlp_tanh_bw"], names
        # bias+relu, 3 backward, momentum SGD 2x2x2, Adam 2 without decay + 2x2 with, RMSprop 2x2x2
        assert len(bodies) == 1 + 3 + 8 + 6 + 8, dtype
        raw = [k for k in kernels if k.kind == "raw"]
        assert len(raw) == 1 and raw[0].spec[1] == f"arraymlp_ce_labels_{'float' if dtype == 'float32' else 'double'}"
        assert all(k.calls for k in kernels), "a kernel built but never launched"
        assert all(k.options == ("--fmad=false",) for k in kernels)
        for k in kernels:  # what CuPy's ElementwiseKernel.__call__ requires of its arguments
            if k.kind != "elementwise":
                continue
            n_in, n_out = len(_params(k.spec[0])), len(_params(k.spec[1]))
            for args in k.calls:
                assert len(args) == n_in + n_out, k.spec[3]  # inputs then every output
                outs = args[n_in:]
                shape = np.broadcast_shapes(*(a.shape for a in args if isinstance(a, np.ndarray)))
                assert all(isinstance(o, np.ndarray) and o.shape == shape for o in outs), k.spec[3]


# ---------------------------------------------------------------- the sources, two ways
def _ctype(dtype: str) -> str:
    return {"float32": "float", "float64": "double"}[dtype]


def _params(spec: str) -> list[tuple[str, str]]:
    return [tuple(p.split()) for p in spec.split(",")]


def _plain_source(k: _Kernel, dtype: str) -> str:
    """An ``ElementwiseKernel`` body in a plain grid-stride loop: inputs as const
    references, outputs as references, scalars by value, all of type ``T``."""
    in_params, out_params, body, name = k.spec
    args, loads = [], []
    for (t, n), a in zip(_params(in_params), k.calls[0]):
        assert t == "T"
        if isinstance(a, np.ndarray):
            args.append(f"const T* _raw_{n}")
            loads.append(f"const T &{n} = _raw_{n}[i];")
        else:
            args.append(f"const T {n}")
    for t, n in _params(out_params):
        assert t == "T"
        args.append(f"T* _raw_{n}")
        loads.append(f"T &{n} = _raw_{n}[i];")
    return (f"typedef {_ctype(dtype)} T;\n"
            f"extern \"C\" __global__ void {name}({', '.join(args)}, const long long _n) {{\n"
            "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < _n;\n"
            "       i += (long long)blockDim.x * gridDim.x) {\n"
            f"    {' '.join(loads)}\n    {body}\n  }}\n}}\n")


def _raw_source(k: _Kernel) -> tuple[str, str]:
    return k.spec[0], k.spec[1]


def _check(nvrtc: NVRTC, source: str, name: str, options, *, no_fma: bool) -> list[str]:
    ok, log, ptx = nvrtc.compile(source, options, f"{name}.cu")
    problems = []
    if not ok:
        problems.append(f"{name}: compile error\n{log}")
    elif log:
        problems.append(f"{name}: warnings\n{log}")
    elif f".entry {name}(" not in ptx:
        problems.append(f"{name}: no entry point of that name in the PTX")
    elif no_fma and "fma." in ptx:
        problems.append(f"{name}: a fused multiply-add in the PTX despite --fmad=false")
    return problems


def test_the_check_sees_errors_warnings_and_contractions(nvrtc):
    """What the compile check reports, on sources with a known flaw: an error, a
    warning (an unused variable), and a multiply-add contracted unless ``--fmad=false``."""
    assert nvrtc.version >= (12, 0)
    axpy = 'extern "C" __global__ void k(float* p, const float* a, const float* b) { p[0] = p[0] + a[0] * b[0]; }'
    assert _check(nvrtc, axpy, "k", (ARCH,), no_fma=True) == ["k: a fused multiply-add in the PTX despite --fmad=false"]
    assert _check(nvrtc, axpy, "k", ("--fmad=false", ARCH), no_fma=True) == []
    unused = axpy.replace("{", "{ int u;", 1)
    assert "declared but never referenced" in _check(nvrtc, unused, "k", ("--fmad=false", ARCH), no_fma=True)[0]
    assert "compile error" in _check(nvrtc, axpy.replace("float* p", "flaot* p"), "k", (ARCH,), no_fma=False)[0]
    assert _check(nvrtc, axpy, "other", (ARCH,), no_fma=False) == ["other: no entry point of that name in the PTX"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernels_compile_with_nvrtc(nvrtc, built, dtype):
    """Every kernel the set builds, compiled for sm_90 by NVRTC: the raw cross-entropy
    kernel as it is handed to CuPy, each element-wise body in a plain element loop. No
    error, no warning; no fused multiply-add in an element-wise kernel."""
    problems, seen = [], set()
    for k in built[dtype]:
        if k.kind == "raw":
            src, name = _raw_source(k)
            problems += _check(nvrtc, src, name, ("--std=c++17", *k.options, *CUPY_TAIL), no_fma=False)
            continue
        src = _plain_source(k, dtype)
        if src not in seen:
            seen.add(src)
            problems += _check(nvrtc, src, k.spec[3], ("--std=c++17", *k.options, *CUPY_TAIL), no_fma=True)
    assert len(seen) == 26
    assert not problems, "\n\n".join(problems)


# ------------------------------------------------------------- as CuPy itself writes them
def _cupy_generation():
    """CuPy's own code generation, reachable without a device (CuPy 14): the module
    that writes an ``ElementwiseKernel``'s source, its argument descriptions and its
    header list, or a skip naming what is missing."""
    try:
        import cupy
        from cupy._core import _carray, _kernel, _scalar, core
    except Exception as e:  # CuPy absent, or present but unusable here
        pytest.skip(f"cupy does not import here ({type(e).__name__}: {e})")
    needed = ("_get_elementwise_kernel_code", "_ArgInfo", "_TypeMap")
    if not all(hasattr(_kernel, n) for n in needed) or not hasattr(core, "_cupy_header_list"):
        pytest.skip(f"this CuPy ({cupy.__version__}) has no {needed} / core._cupy_header_list to generate with")
    return cupy, _kernel, _scalar, _carray, core


def _reduced(arrays, shape):
    """CuPy 14's dimension reduction of a launch (``_reduce_dims``): ``(ndim, [c-contiguous
    per array])`` as its kernel sees them. All operands C-contiguous: one dimension. A
    broadcast operand (a stride 0) in two dimensions: kept as they are. Otherwise unit
    axes are skipped and an axis merges into the one before it where every
    non-contiguous operand walks them as one; the views keep their operands' flags."""
    shape = tuple(shape)
    views = [np.broadcast_to(a, shape) for a in arrays]
    contiguous = [a.shape == shape and a.flags.c_contiguous for a in arrays]
    ndim = len(shape)
    if ndim <= 1:
        return ndim, contiguous
    if all(contiguous):
        return 1, contiguous
    if ndim == 2:
        return 2, contiguous
    strided = [v for v, c in zip(views, contiguous) if not c]
    size, axes, last = list(shape), [], -1
    for ax in range(ndim):
        if size[ax] == 1:
            continue
        if last >= 0:
            if any(v.strides[ax] * size[ax] != v.strides[last] for v in strided):
                axes.append(last)
            else:
                size[ax] *= size[last]
        last = ax
    if last >= 0:
        axes.append(last)
    return (ndim if len(axes) == ndim else len(axes)), contiguous


def _cupy_source(gen, k: _Kernel, args: tuple) -> str:
    """The source CuPy 14 compiles for ``k`` called with ``args`` (its generator, the
    argument descriptions its launch would make, its header prefix)."""
    cupy, _kernel, _scalar, _carray, core = gen
    in_params, out_params, body, name = k.spec
    ek = cupy.ElementwiseKernel(in_params, out_params, body, name, options=k.options)
    outs = args[len(_params(in_params)):]
    shape = np.broadcast_shapes(*(a.shape for a in args if isinstance(a, np.ndarray)))
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    ndim, contiguous = _reduced(arrays, shape)
    dt = outs[0].dtype
    infos, j = [], 0
    for a in args:
        if isinstance(a, np.ndarray):
            infos.append(_kernel._ArgInfo(1, cupy.ndarray, a.dtype, ndim, contiguous[j], True))
            j += 1
        else:
            infos.append(_kernel._ArgInfo(3, _scalar.CScalar, dt, 0, True, True))  # a scalar takes T
    infos.append(_kernel._ArgInfo(2, _carray.Indexer, None, ndim, True, True))
    code = _kernel._get_elementwise_kernel_code(tuple(infos), _kernel._TypeMap((("T", dt),)), ek.params,
                                                ek.operation, ek.name, ek.preamble, **ek.kwargs)
    return "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + code


def _cupy_options(gen, options: tuple) -> tuple:
    """The options CuPy gives NVRTC: its own assembly (bundled CCCL and CuPy headers,
    C++17, the CUDA headers), then its tail. Without CUDA headers (float32 and float64
    need none) the assembly is made without them."""
    core = gen[4]
    try:
        full = core.assemble_cupy_compiler_options(tuple(options))
    except RuntimeError:  # no CUDA headers found
        full = (*core._get_cccl_include_options(), *options, "--std=c++17", f"-I{core._get_header_dir_path()}")
    return (*full, *CUPY_TAIL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernels_compile_with_nvrtc_as_cupy_writes_them(nvrtc, built, dtype):
    """The exact source CuPy generates for each launch the set makes (its CArray and
    CIndexer parameters, the reduced dimensions of broadcast hyper-parameters, its
    headers), and the raw kernel with CuPy's options: NVRTC compiles them for sm_90 with
    no warning, and the element-wise kernels hold no fused multiply-add."""
    gen = _cupy_generation()
    problems, seen = [], set()
    for k in built[dtype]:
        if k.kind == "raw":
            src, name = _raw_source(k)
            problems += _check(nvrtc, src, name, _cupy_options(gen, k.options), no_fma=False)
            continue
        for args in k.calls:
            src = _cupy_source(gen, k, args)
            if src not in seen:
                seen.add(src)
                problems += _check(nvrtc, src, k.spec[3], _cupy_options(gen, k.options), no_fma=True)
    assert len(seen) > 26  # the plain and the ensemble's broadcast launches differ
    assert not problems, "\n\n".join(problems)


def test_reduced_dimensions_are_cupys():
    """The stand-in of CuPy's dimension reduction on the launches the set makes."""
    y, b = np.zeros((6, 3)), np.zeros(3)
    assert _reduced([b, y], y.shape) == (2, [False, True])  # the bias broadcast over rows
    p, lr = np.zeros((2, 4, 3)), np.zeros((2, 1, 1))
    assert _reduced([p, lr], p.shape) == (2, [True, False])  # per-member values over (K, n*m)
    assert _reduced([np.zeros(5), np.zeros(5)], (5,)) == (1, [True, True])
    assert _reduced([np.zeros((4, 3)), np.zeros((4, 3))], (4, 3)) == (1, [True, True])
    p, lr = np.zeros((2, 1, 3)), np.zeros((2, 1, 1))  # an ensemble's bias: the unit axis dropped
    assert _reduced([p, lr], p.shape) == (2, [True, False])
    p, b = np.zeros((2, 4, 3)), np.zeros((1, 1, 3))  # one row over (K, n) rows: those merge
    assert _reduced([p, b], p.shape) == (2, [True, False])
    p, m = np.zeros((2, 4, 3)), np.zeros((2, 1, 3))  # nothing merges: three dimensions
    assert _reduced([p, m], p.shape) == (3, [True, False])


def test_cupy_types_every_launch_in_the_parameters_dtype(built):
    """CuPy's own typing of each launch the set makes (``ElementwiseKernel``'s type
    decision, reachable without a device): ``T`` is the parameters' dtype, the arrays
    (per-member hyper-parameters included) agree with it, and a Python number is cast to
    it (a float64 number into a float32 kernel is a float32 there, as in NumPy's
    ``p - lr * g`` on float32 arrays). A float64 array into a float32 kernel is refused
    by CuPy: the check is live."""
    cupy = _cupy_generation()[0]
    for dtype, kernels in built.items():
        for k in kernels:
            if k.kind != "elementwise":
                continue
            ek = cupy.ElementwiseKernel(*k.spec, options=k.options)
            n_in = len(_params(k.spec[0]))
            for args in k.calls:
                ins = tuple(a.dtype if isinstance(a, np.ndarray) else None for a in args[:n_in])
                outs = tuple(a.dtype for a in args[n_in:])
                in_types, out_types, _ = ek._decide_params_type(ins, outs)
                assert {np.dtype(t) for t in in_types + out_types} == {np.dtype(dtype)}, (k.spec[3], ins)
    ek = cupy.ElementwiseKernel("T g, T lr", "T p", "p = p - lr * g;", "arraymlp_probe")
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert ek._decide_params_type((f32, None), (f32,))[0] == (f32, f32)
    with pytest.raises(TypeError, match="mismatched"):
        ek._decide_params_type((f32, f64), (f32,))
