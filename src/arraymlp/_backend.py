"""Array namespaces, devices, dtypes, moving arrays, and the random-number shim.

This is the only compute-adjacent module that imports NumPy: for the host random
generator and for conversion to host memory. Everything else takes ``xp`` from its
arrays (:func:`get_namespace`) once per public call and passes it down.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
import types
from typing import Any, Sequence

import array_api_compat
import numpy

__all__ = [
    "BACKENDS",
    "Generator",
    "MemberGenerators",
    "backend_name",
    "check_same_backend",
    "counter_bits",
    "member_counter_bits",
    "device_of",
    "get_namespace",
    "resolve_backend",
    "resolve_dtype",
    "to_backend",
    "to_numpy",
]

#: Backend names accepted by ``backend=`` arguments, mapped to the module that
#: provides a standard-conforming namespace for them.
BACKENDS = {
    "numpy": "array_api_compat.numpy",
    "cupy": "array_api_compat.cupy",
    "torch": "array_api_compat.torch",
    "array_api_strict": "array_api_strict",
    "jax": "jax.numpy",
}

_DTYPES = ("float16", "float32", "float64")


def resolve_backend(backend: Any) -> types.ModuleType:
    """Return the array namespace for a backend name or module.

    Parameters
    ----------
    backend : str or module
        One of ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``, ``"jax"``,
        or a namespace module (``numpy``, ``cupy``, ``torch``, ``array_api_strict``,
        ``jax.numpy`` or a module of ``array_api_compat``).

    Returns
    -------
    module
        A namespace that follows the Array API standard.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> xp = am.resolve_backend("numpy")
    >>> xp.__name__
    'array_api_compat.numpy'
    >>> am.resolve_backend(np) is xp
    True
    >>> am.resolve_backend("mxnet")
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'mxnet'; known backends: numpy, cupy, torch, array_api_strict, jax
    """
    if isinstance(backend, str):
        try:
            modname = BACKENDS[backend]
        except KeyError:
            msg = f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}"
            raise ValueError(msg) from None
        try:
            return importlib.import_module(modname)
        except ImportError as exc:
            hint = {
                "cupy": "install it with `pip install arraymlp[cuda12]` (or [cuda13])",
                "torch": "install PyTorch first",
                "array_api_strict": "install it with `pip install array-api-strict`",
                "jax": "install it with `pip install jax`",
            }.get(backend, "")
            msg = f"backend {backend!r} is not available: {exc}. {hint}".strip()
            raise ImportError(msg) from exc
    if isinstance(backend, types.ModuleType):
        name = backend.__name__
        if name.startswith("array_api_compat."):
            return backend
        root = name.split(".")[0]
        if root in ("numpy", "cupy", "torch"):
            return resolve_backend(root)
        return backend
    msg = f"backend must be a name or a namespace module, got {type(backend).__name__}"
    raise TypeError(msg)


def backend_name(xp: types.ModuleType) -> str:
    """Short name of a namespace: ``"numpy"``, ``"torch"``, ``"array_api_strict"``, ..."""
    name = xp.__name__
    if name.startswith("array_api_compat."):
        return name.split(".")[1]
    return name.split(".")[0]


def get_namespace(*arrays: Any, xp: types.ModuleType | None = None) -> types.ModuleType:
    """Namespace of ``arrays``, or ``xp`` when given.

    Raises a :class:`TypeError` naming both namespaces when the arrays come from
    different libraries.
    """
    if xp is not None:
        return xp
    arrays = tuple(a for a in arrays if a is not None)
    if not arrays:
        msg = "cannot infer an array namespace from no arrays; pass backend= or xp="
        raise TypeError(msg)
    first = _namespace_of(arrays[0])
    for a in arrays[1:]:
        other = _namespace_of(a)
        if other is not first:
            check_same_backend(first, other)
    return first


def _namespace_of(x: Any) -> types.ModuleType:
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        msg = (
            f"expected an array (numpy, cupy, torch, array_api_strict, ...), "
            f"got {type(x).__module__}.{type(x).__qualname__}"
        )
        raise TypeError(msg) from None


def check_same_backend(
    expected: types.ModuleType, got: types.ModuleType, what: str = "input"
) -> None:
    """Raise a :class:`TypeError` when two namespaces differ, saying how to convert."""
    if expected is got:
        return
    a, b = backend_name(expected), backend_name(got)
    msg = (
        f"{what} is a {b} array but the model's parameters are {a} arrays; "
        f"convert the input with arraymlp.to_backend({what.split()[-1]}, {a!r}) or move the model "
        f"with model.to({b!r})"
    )
    raise TypeError(msg)


def check_same_device(expected: Any, got: Any, what: str = "input") -> None:
    """Raise a :class:`ValueError` when two devices differ, saying how to move."""
    if expected == got:
        return
    msg = (
        f"{what} is on device {got!r} but the model's parameters are on {expected!r}; "
        f"move the input with arraymlp.to_backend({what.split()[-1]}, ..., device={expected!r}) or the "
        f"model with model.to(..., device={got!r})"
    )
    raise ValueError(msg)


def device_of(x: Any) -> Any:
    """Device of an array (``"cpu"`` for NumPy)."""
    return array_api_compat.device(x)


# ----------------------------------------------------------------------- sparse matrices
# A sparse matrix reaches only the first dense layer's kernels (``x @ W``, ``x.T @ dy``) and
# the training loop's row selection. Three kinds are known: scipy.sparse on NumPy,
# cupyx.scipy.sparse on CuPy and torch's sparse layouts (CSR, CSC, COO) on torch. None of
# those libraries is imported here: a matrix of theirs can only exist once its module is
# loaded, so ``sys.modules`` answers without an import.
def _torch_sparse(x: Any) -> bool:
    """Whether ``x`` is a torch tensor of a sparse layout (CSR, CSC, COO, BSR, BSC)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and x.layout is not torch.strided


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a scipy.sparse or cupyx.scipy.sparse matrix or array, or a torch
    tensor of a sparse layout. (Asked of every first-layer input on the hot path: a NumPy
    array and a torch tensor are answered first.)"""
    if type(x) is numpy.ndarray:
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.layout is not torch.strided
    for name in ("scipy.sparse", "cupyx.scipy.sparse"):
        module = sys.modules.get(name)
        if module is not None and module.issparse(x):
            return True
    return False


def sparse_namespace(x: Any) -> types.ModuleType:
    """The namespace a sparse matrix computes with: NumPy's for scipy.sparse, torch's for a
    sparse torch tensor, CuPy's for cupyx.scipy.sparse (the dense results of ``x @ W`` are
    arrays of that library)."""
    scipy_sparse = sys.modules.get("scipy.sparse")
    if scipy_sparse is not None and scipy_sparse.issparse(x):
        return resolve_backend("numpy")
    if _torch_sparse(x):
        return resolve_backend("torch")
    return resolve_backend("cupy")  # untested here: needs a CUDA device


def sparse_device(x: Any) -> Any:
    """Device of a sparse matrix: ``"cpu"`` for scipy.sparse, the tensor's for torch, its
    data's for CuPy."""
    return x.device if _torch_sparse(x) else device_of(x.data)


def sparse_values(x: Any) -> Any:
    """The stored values of a compressed-row matrix (what a finiteness check reads): a
    dense array of its library, without the zeros."""
    return x.values() if _torch_sparse(x) else x.data


def as_csr(x: Any, dtype: Any) -> Any:
    """``x`` in compressed-row form and ``dtype``: batches are then row slices. CSC and
    COO are converted once; a CSR matrix of that dtype is returned as it is (never
    written to) when its form is canonical (sorted column indices, no duplicates).

    A non-canonical CSR matrix is copied and made canonical here, once: cupyx's sparse
    product sorts and sums the entries of its operand in place before multiplying (which
    would rewrite the caller's arrays, and check the form again on every batch, a device
    synchronisation). A torch tensor is converted by ``to_sparse_csr`` (COO's duplicates
    are summed) and cast by ``to``, each of which returns the tensor itself when there is
    nothing to do."""
    if _torch_sparse(x):
        torch = sys.modules["torch"]
        if x.layout not in (torch.sparse_csr, torch.sparse_csc, torch.sparse_coo):
            msg = (f"a sparse torch tensor of layout {x.layout} is not supported; use CSR, CSC or COO "
                   "(x.to_sparse_csr())")
            raise TypeError(msg)
        if x.layout is not torch.sparse_csr:
            x = x.to_sparse_csr()
        return x if x.dtype == dtype else x.to(dtype)
    x = x.tocsr()
    if not x.has_canonical_format:  # the converted formats come out canonical: only a caller's CSR
        x = x.copy()
        x.sum_duplicates()
    return x if x.dtype == dtype else x.astype(dtype)


def sparse_transpose(x: Any) -> Any:
    """``x.T`` of a sparse matrix: a view in the other compressed form (CSR to CSC), no
    copy. (torch's ``.T`` is a strided view, which sparse tensors do not have.)"""
    return x.t() if _torch_sparse(x) else x.T


def _torch_csr(x: Any, crow: Any, lo: Any, hi: Any, n: int, pos: Any = None) -> Any:
    """The CSR tensor of ``n`` rows with row offsets ``crow`` whose entries are ``x``'s
    entries ``lo:hi`` (or those at positions ``pos``)."""
    torch = sys.modules["torch"]
    cols, vals = x.col_indices(), x.values()
    if pos is None:
        cols, vals = cols[lo:hi], vals[lo:hi]
    else:
        cols, vals = cols[pos], vals[pos]
    return torch.sparse_csr_tensor(crow, cols, vals, size=(n, x.shape[1]), dtype=x.dtype, device=x.device,
                                   check_invariants=False)


def _torch_csr_slice(x: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a torch CSR tensor (torch slices no sparse layout): the
    entries between two row offsets, read to the host in one transfer (a synchronisation
    per batch on a GPU)."""
    crow = x.crow_indices()
    lo, hi = crow[[start, stop]].tolist()
    return _torch_csr(x, crow[start:stop + 1] - lo, lo, hi, stop - start)


def _torch_csr_take(x: Any, idx: Any) -> Any:
    """Rows ``idx`` (an integer tensor, repeats allowed) of a torch CSR tensor: each
    row's entries, in ``idx``'s order, gathered by their positions."""
    torch = sys.modules["torch"]
    crow = x.crow_indices()
    idx = idx.to(crow.dtype)
    first = crow[idx]
    counts = crow[idx + 1] - first
    offsets = torch.zeros(idx.shape[0] + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    row = torch.repeat_interleave(torch.arange(idx.shape[0], device=crow.device), counts)
    pos = first[row] + torch.arange(row.shape[0], dtype=crow.dtype, device=crow.device) - offsets[row]
    return _torch_csr(x, offsets, None, None, int(idx.shape[0]), pos)


def take_rows(x: Any, idx: Any, xp: types.ModuleType) -> Any:
    """Rows ``idx`` (an integer array) of a dense array or a CSR matrix."""
    if not is_sparse(x):
        return xp.take(x, idx, axis=0)
    return _torch_csr_take(x, idx) if _torch_sparse(x) else x[idx]


def slice_rows(x: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a dense array or a CSR matrix (a view for dense arrays;
    for CSR, a matrix of those rows' entries only)."""
    if not is_sparse(x):
        return x[start:stop, ...]
    return _torch_csr_slice(x, start, stop) if _torch_sparse(x) else x[start:stop]


def resolve_dtype(xp: types.ModuleType, dtype: Any) -> Any:
    """Map ``"float32"`` / ``"float64"`` / ``"float16"`` (or a dtype) to ``xp``'s dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            msg = f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}"
            raise ValueError(msg)
        found = getattr(xp, dtype, None)
        if found is None:  # array-api-strict: the standard has no float16
            have = [d for d in _DTYPES if getattr(xp, d, None) is not None]
            msg = f"the {backend_name(xp)} backend has no {dtype}; use one of {', '.join(have)}"
            raise ValueError(msg)
        if dtype == "float64" and backend_name(xp) == "jax" and not has_float64(xp):
            msg = ("the jax backend runs in its default 32-bit mode, where float64 arrays are float32; "
                   "use dtype='float32', or enable 64-bit mode first (jax.config.update('jax_enable_x64', True))")
            raise ValueError(msg)
        return found
    for name in _DTYPES:
        if dtype == getattr(xp, name):
            return dtype
    msg = f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}"
    raise ValueError(msg)


def memo(cache: dict, key: Any, make: Any, limit: int = 32) -> Any:
    """``cache[key]``, made by ``make()`` on a miss; the cache is emptied when it holds
    ``limit`` entries, and an unhashable key (a CuPy device) is not cached. For the small
    values the hot path would otherwise rebuild every step (rows of constants, row
    indices, dtype answers); what it returns is only ever read."""
    try:
        return cache[key]
    except KeyError:
        pass
    except TypeError:
        return make()
    if len(cache) >= limit:
        cache.clear()
    out = cache[key] = make()
    return out


_INDEX_DTYPES: dict = {}


def dtype_mode(xp: types.ModuleType) -> Any:
    """What a namespace's dtype answers depend on besides the namespace: JAX's 64-bit
    switch, which may be flipped between calls (``jax.config.update``) or set for a
    block (``jax.enable_x64``); ``None`` for every other namespace. Part of the key of
    every remembered dtype answer, so that none outlives the mode it was made in."""
    if not xp.__name__.startswith("jax"):
        return None
    return bool(sys.modules["jax"].config.jax_enable_x64)


def index_dtype(xp: types.ModuleType) -> Any:
    """The namespace's default integer dtype for indices and class labels (int64 on
    NumPy, torch and array-api-strict; int32 on JAX unless its 64-bit mode is on, where
    asking for int64 would be truncated with a warning). Remembered per namespace (and
    per JAX mode: :func:`dtype_mode`)."""
    return memo(_INDEX_DTYPES, (xp, dtype_mode(xp)),
                lambda: xp.__array_namespace_info__().default_dtypes()["indexing"])


def has_float64(xp: types.ModuleType, device: Any = None) -> bool:
    """Whether ``xp`` makes float64 arrays on ``device``: not JAX in its default 32-bit
    mode (which hands back float32 for a float64 request), nor devices without float64."""
    f64 = getattr(xp, "float64", None)
    if f64 is None:
        return False
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # JAX warns that it truncates the request
            a = xp.zeros((1,), dtype=f64, device=device)
    except Exception:  # any refusal (a device without float64 raises its library's own error)
        return False
    return a.dtype == f64 and dtype_name(a.dtype) == "float64"


#: ``is_writeable_array``'s answer per array type, for the types where it does not
#: depend on the array (every type but NumPy's, whose arrays carry a flag each).
_WRITEABLE_BY_TYPE: dict[type, bool] = {}


def is_writeable(x: Any) -> bool:
    """Whether ``x`` may be updated in place (``array_api_compat.is_writeable_array``,
    answered for NumPy arrays from their flag and for other types from the answer for
    their type: the hot path asks it a dozen times a step)."""
    t = type(x)
    if t is numpy.ndarray:
        return x.flags.writeable
    try:
        return _WRITEABLE_BY_TYPE[t]
    except KeyError:
        pass
    w = array_api_compat.is_writeable_array(x)
    if not isinstance(x, numpy.ndarray):  # a NumPy subclass answers per array, by its flag
        _WRITEABLE_BY_TYPE[t] = w
    return w


def row_sums_finite(a: Any, ones: Any) -> bool:
    """For a NumPy array ``a`` and a row of ones as long as its last axis: whether every
    row sum ``a @ ones`` is finite (a NaN or infinite entry makes its row's sum NaN or
    infinite; sums of large finite entries may overflow, which is not reported). False,
    proving nothing, for subclasses (masked arrays multiply and reduce by their own
    rules)."""
    if type(a) is not numpy.ndarray:
        return False
    with numpy.errstate(over="ignore", invalid="ignore"):
        s = a @ ones
    return bool(numpy.isfinite(s).all())


def asarray_like(x: Any, like: Any, xp: types.ModuleType) -> Any:
    """``xp.asarray(x)`` for a value computed from ``like`` (a loss from its outputs),
    straight through NumPy when ``like`` is a NumPy array: array-api-compat's wrapper
    costs about ten times NumPy's own call (docs/benchmarks.md)."""
    if type(like) is numpy.ndarray:
        return numpy.asarray(x)
    return xp.asarray(x)


def is_float16(dtype: Any, xp: types.ModuleType) -> bool:
    """Whether ``dtype`` is ``xp``'s float16 (False where the namespace has none, as
    array-api-strict: the standard does not define it). Sums and squares of float16
    data overflow past 65504, so the library computes them in float32."""
    f16 = getattr(xp, "float16", None)
    return f16 is not None and dtype == f16


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for any backend's float32 dtype object (``float32``,
    ``torch.float32``, ``dtype('float32')``, ...); other dtypes keep their own name, so
    ``bfloat16`` is not mistaken for ``float16``."""
    s = str(dtype)
    if s.startswith("<class '") and s.endswith("'>"):  # a scalar type: numpy.float32
        s = s[8:-2]
    if s.startswith("dtype(") and s.endswith(")"):  # dtype('float32')
        s = s[6:-1].strip("'\"")
    return s.rsplit(".", 1)[-1]


def default_device(xp: types.ModuleType) -> Any:
    """The namespace's default device."""
    return xp.__array_namespace_info__().default_device()


def canonical_device(xp: types.ModuleType, device: Any = None) -> Any:
    """The device object arrays report for ``device`` (``"cpu"`` -> ``torch.device("cpu")``),
    so that devices compare equal however the user spelled them."""
    return device_of(xp.empty((0,), device=device if device is not None else default_device(xp)))


def quiet_overflow(xp: types.ModuleType):
    """A context in which NumPy does not warn on overflow or invalid values.

    The fit loop checks every loss for finiteness and raises a ``DivergenceError`` that
    names the epoch and step; NumPy's own ``RuntimeWarning`` (an exception where warnings
    are errors) would otherwise pre-empt that clearer message. NumPy-based namespaces
    (NumPy, array-api-strict) are the ones that warn; the state is harmless for others.
    """
    return numpy.errstate(over="ignore", invalid="ignore", divide="ignore")


def to_numpy(x: Any) -> numpy.ndarray:
    """Copy (or view) an array of any backend into a NumPy array on the host, of the
    same shape and dtype.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([3, 4, 2], backend="array_api_strict", seed=0)
    >>> W = am.to_numpy(model.params[0]["W"])
    >>> type(W).__name__, W.shape, W.dtype
    ('ndarray', (3, 4), dtype('float32'))
    >>> x = np.ones((2, 3))
    >>> am.to_numpy(x) is x
    True
    """
    if isinstance(x, numpy.ndarray):
        return x
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        # resolve_conj/resolve_neg: views with torch's lazy sign bits (z.conj().imag)
        return x.detach().resolve_conj().resolve_neg().cpu().numpy()
    try:
        return numpy.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return numpy.asarray(x)


def host_namespace() -> types.ModuleType:
    """The namespace of host (NumPy) data: where data staged for another device is checked."""
    return resolve_backend("numpy")


def host_array(x: Any) -> numpy.ndarray | None:
    """``x`` as a NumPy array when it is dense and lives in host memory (a NumPy array,
    or another library's array on its CPU device, viewed without a copy where DLPack
    allows), else None (a GPU array, a sparse matrix, a non-array)."""
    if isinstance(x, numpy.ndarray):
        return x
    if is_sparse(x):
        return None
    try:
        device = device_of(x)
    except (TypeError, AttributeError):
        return None
    if "cpu" not in str(device).lower():
        return None
    return to_numpy(x)


class StepValues:
    """Values of successive training steps (0-d or 1-d arrays) kept on their device,
    stacked into one array every ``every`` values (so a long epoch holds few arrays),
    and brought to the host in one transfer by :meth:`read`."""

    def __init__(self, xp: types.ModuleType, every: int):
        self.xp, self.every = xp, every
        self._chunks: list = []
        self._pending: list = []

    def append(self, value: Any) -> None:
        self._pending.append(value)
        if len(self._pending) == self.every:
            self._chunks.append(self.xp.stack(self._pending))
            self._pending = []

    def read(self) -> numpy.ndarray:
        """The values appended since the last read, as float64 on the host (the one
        transfer); the store is then empty."""
        if self._pending:
            self._chunks.append(self.xp.stack(self._pending))
        chunks, self._chunks, self._pending = self._chunks, [], []
        return to_numpy(chunks[0] if len(chunks) == 1 else self.xp.concat(chunks)).astype(numpy.float64)


def _for_torch_dlpack(x: Any) -> Any:
    """``x`` as torch's DLPack import takes it: without negative strides (torch rejects
    them; it aborts). A CuPy array with a negative stride is copied on its device, and
    one without is passed as it is (no copy to the host, no synchronisation); a host
    array is looked at through NumPy."""
    if array_api_compat.is_cupy_array(x):
        return x.copy() if any(st < 0 for st in x.strides) else x
    h = to_numpy(x)
    return numpy.ascontiguousarray(h) if any(st < 0 for st in h.strides) else x


def to_backend(x: Any, backend: Any, *, device: Any = None) -> Any:
    """Move an array to another backend (and device), zero-copy where DLPack allows.

    Parameters
    ----------
    x : array
        Any array that ``array_api_compat`` knows, of any shape.
    backend : str or module
        Target backend, as in :func:`resolve_backend`.
    device : optional
        Target device; default: the target's default device (for a GPU target) or
        ``x``'s device when it stays on the same backend.

    Returns
    -------
    array
        The same values and shape, as an array of the target namespace.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> import array_api_strict
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> s = am.to_backend(x, "array_api_strict")
    >>> s.shape, s.dtype == array_api_strict.float64, float(array_api_strict.sum(s))
    ((2, 3), True, 15.0)
    >>> bool(np.array_equal(am.to_numpy(s), x))
    True
    >>> am.to_backend(x, "numpy") is x
    True
    """
    xp = resolve_backend(backend)
    src = _namespace_of(x)
    if src is xp:
        if device is None or device_of(x) == device:
            return x
        return xp.asarray(x, device=device, copy=True) if backend_name(xp) != "torch" else x.to(device)
    if isinstance(x, numpy.ndarray) and not x.flags.writeable:
        x = numpy.array(x)  # a zero-copy view would let the target write into read-only memory
    if array_api_compat.is_torch_array(x):
        x = x.detach().resolve_conj().resolve_neg()  # DLPack cannot express torch's lazy sign bits
    if backend_name(xp) == "torch" and not array_api_compat.is_torch_array(x):
        x = _for_torch_dlpack(x)
    try:
        if isinstance(x, numpy.ndarray) and backend_name(xp) == "array_api_strict":
            # zero-copy as well; NumPy before 2.3 marks a DLPack import read-only, which
            # array-api-strict cannot report, and in-place updates would then fail
            y = xp.asarray(x)
        else:
            y = xp.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, ValueError, AttributeError, NotImplementedError):
        y = xp.asarray(to_numpy(x))
    if device is not None and device_of(y) != device:
        y = xp.asarray(y, device=device, copy=True) if backend_name(xp) != "torch" else y.to(device)
    return y


# -------------------------------------------------------------- host to device copies
class _PlainCopies:
    """Host to device copies where there is no GPU stream to overlap with: a copy of the
    host buffer made at once (the buffer is reused for the next batch)."""

    def __init__(self, xp: types.ModuleType, device: Any):
        self.xp, self.device = xp, device

    def host_buffer(self, shape: tuple, dtype: Any) -> numpy.ndarray:
        return numpy.empty(shape, dtype=dtype)

    def send(self, host: numpy.ndarray) -> Any:
        """A device copy of ``host`` (enqueued, where there is a stream)."""
        if backend_name(self.xp) == "torch":
            import torch

            return torch.tensor(host, device=self.device)
        return self.xp.asarray(host, device=self.device, copy=True)

    def mark(self, arrays: list) -> Any:
        """An event marking the copies sent so far (of ``arrays``) done."""

    def reusable(self, event: Any) -> None:
        """Wait (on the host) until the copy of ``event`` has read its host buffer."""

    def use(self, event: Any) -> None:
        """Make the compute stream wait for the copy of ``event`` (no host wait)."""


class _CupyCopies(_PlainCopies):
    """Pinned host buffers and copies on a side stream, ordered before the compute
    stream's use of them by an event: no synchronous copy, no host wait on compute."""

    def __init__(self, xp, device):
        import cupy

        super().__init__(xp, device)
        self._cupy = cupy
        # the model's device id, fixed now (None: the current one). CuPy keeps a current
        # stream per device, and an event must be recorded on its own device: every
        # stream call below runs with this device current.
        self._id = cupy.cuda.Device(getattr(device, "id", device)).id
        with cupy.cuda.Device(self._id):
            self.stream = cupy.cuda.Stream(non_blocking=True)

    def host_buffer(self, shape, dtype):
        dtype = numpy.dtype(dtype)
        n = int(numpy.prod(shape))
        mem = self._cupy.cuda.alloc_pinned_memory(max(n * dtype.itemsize, 1))
        return numpy.frombuffer(mem, dtype=dtype, count=n).reshape(shape)

    def send(self, host):
        cupy = self._cupy
        with cupy.cuda.Device(self._id):
            # ``out`` comes from the compute stream's pool, which may hand back memory that
            # kernels already queued there still read (freed in Python, not yet on the
            # device): the side stream's copy waits for the compute stream's queue as it
            # is now (a device-side wait). The copy then runs beside the next batch's work.
            out = cupy.empty(host.shape, dtype=host.dtype)
            self.stream.wait_event(cupy.cuda.get_current_stream().record())
            out.set(host, stream=self.stream)  # asynchronous from pinned memory
            return out

    def mark(self, arrays):
        with self._cupy.cuda.Device(self._id):
            return self.stream.record()

    def reusable(self, event):
        if event is not None:
            event.synchronize()

    def use(self, event):
        if event is not None:
            with self._cupy.cuda.Device(self._id):  # the compute stream of the model's device
                self._cupy.cuda.get_current_stream().wait_event(event)


class _TorchCudaCopies(_PlainCopies):
    """As :class:`_CupyCopies`, with torch's pinned tensors, streams and events."""

    def __init__(self, xp, device):
        import torch

        super().__init__(xp, device)
        self._torch = torch
        self.stream = torch.cuda.Stream(device=device)

    def host_buffer(self, shape, dtype):
        t = self._torch.empty(tuple(shape), dtype=getattr(self._torch, numpy.dtype(dtype).name), pin_memory=True)
        return t.numpy()

    def send(self, host):
        torch = self._torch
        with torch.cuda.stream(self.stream):
            return torch.from_numpy(host).to(self.device, non_blocking=True)

    def mark(self, arrays):
        event = self._torch.cuda.Event()
        event.record(self.stream)
        return event, [a for a in arrays if a is not None]

    def reusable(self, event):
        if event is not None:
            event[0].synchronize()

    def use(self, event):
        if event is not None:
            current = self._torch.cuda.current_stream(self.device)
            current.wait_event(event[0])
            for a in event[1]:
                a.record_stream(current)  # the allocator must not reuse them before compute is done


def host_copies(xp: types.ModuleType, device: Any = None) -> _PlainCopies:
    """The way host batches reach ``device`` of ``xp``: pinned buffers and asynchronous
    copies on a side stream for CuPy and CUDA torch, a plain copy elsewhere."""
    name = backend_name(xp)
    if name == "cupy":
        return _CupyCopies(xp, device)
    if name == "torch" and str(getattr(device, "type", device)).startswith("cuda"):
        return _TorchCudaCopies(xp, device)
    return _PlainCopies(xp, device)


_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
#: Multipliers of the 32-bit mixing function (an invertible xorshift-multiply chain
#: with a low avalanche bias, after the "triple32" constants of C. Wellons's hash search).
_MIX = (0xED5AD4BB, 0xAC4C1B51, 0x31848BAB)
_SHIFTS = (17, 11, 15, 14)


def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int: a bijection of [0, 2**64), computed on the host."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mul32(x: Any, c: int) -> Any:
    """``(x * c) mod 2**32`` for an int64 array ``x`` of values in [0, 2**32) and a
    constant ``c < 2**32``, in two halves so that no product reaches 2**63 (the
    standard leaves integer overflow unspecified)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _mix32(x: Any) -> Any:
    """A bijection of [0, 2**32) on int64 arrays (any namespace)."""
    x = x ^ (x >> _SHIFTS[0])
    for c, sh in zip(_MIX, _SHIFTS[1:]):
        x = _mul32(x, c)
        x = x ^ (x >> sh)
    return x


def _mix32_numpy(x: numpy.ndarray) -> numpy.ndarray:
    """:func:`_mix32` in NumPy's wrapping uint32 arithmetic: the same values, fewer passes."""
    x ^= x >> numpy.uint32(_SHIFTS[0])
    for c, sh in zip(_MIX, _SHIFTS[1:]):
        x *= numpy.uint32(c)
        x ^= x >> numpy.uint32(sh)
    return x


def _mix32_wrapping(x: Any) -> Any:
    """:func:`_mix32` in place on an int64 array of a library whose integer products
    wrap modulo 2**64 (torch, CuPy): the low 32 bits of ``x * c`` are exact, so one
    product and one mask replace :func:`_mul32`'s halves."""
    x ^= x >> _SHIFTS[0]
    for c, sh in zip(_MIX, _SHIFTS[1:]):
        x *= c
        x &= _M32
        x ^= x >> sh
    return x


def counter_bits(shape: tuple[int, ...], key: int, counter: int, xp: types.ModuleType, device: Any = None) -> Any:
    """32 random bits per element, a pure function of ``(key, counter, element index)``.

    With ``(s0, s1)`` the two 32-bit halves of ``splitmix64(key ^ splitmix64(counter))``
    (computed on the host) and ``i`` the element's flat index,
    ``bits = mix32(mix32((i + s0) mod 2**32) ^ s1)``, where ``mix32`` is a bijective
    xorshift-multiply hash of 32-bit words. Only int64 arithmetic of the standard is
    used, with no product reaching 2**63, so every namespace gives the same bits.

    NumPy (and torch on the CPU, sharing NumPy's result) computes it in NumPy's
    wrapping uint32 arithmetic, torch on a GPU and CuPy in int64 whose products wrap
    modulo 2**64, other namespaces by the overflow-free definition; the tests compare
    each with the definition computed on Python integers.

    Returns an array of ``shape`` and dtype int64 (uint32 on NumPy, and on namespaces
    without int64, such as JAX in its 32-bit mode) with values in [0, 2**32), on ``device``.
    """
    n = math.prod(shape)
    if n > _M32:
        msg = f"counter_bits draws at most 2**32 - 1 values per call, got shape {shape}"
        raise ValueError(msg)
    w = _splitmix64((key & _M64) ^ _splitmix64(counter & _M64))
    s0, s1 = w & _M32, w >> 32
    kind = backend_name(xp)
    # a namespace without int64 (JAX in its 32-bit mode) cannot run the portable
    # definition: the bits are made on the host and arrive as uint32
    no_int64 = dtype_name(index_dtype(xp)) != "int64"
    torch_cpu = kind == "torch" and getattr(canonical_device(xp, device), "type", None) == "cpu"
    if kind == "numpy" or no_int64 or torch_cpu:
        i = numpy.arange(n, dtype=numpy.uint32)
        i += numpy.uint32(s0)  # wraps mod 2**32
        h = _mix32_numpy(i)
        h ^= numpy.uint32(s1)
        h = _mix32_numpy(h).reshape(shape)
        if no_int64:
            return xp.asarray(h, device=device)
        return h if kind == "numpy" else xp.asarray(h.astype(numpy.int64))  # torch on the host: no copy
    i = xp.arange(n, dtype=xp.int64, device=device)
    if kind in ("torch", "cupy"):
        i += s0
        i &= _M32
        h = _mix32_wrapping(i)
        h ^= s1
        return xp.reshape(_mix32_wrapping(h), shape)
    # the portable definition: no integer product reaches 2**63 (array-api-strict, JAX, ...)
    h = _mix32(_mix32((i + s0) & _M32) ^ s1)
    return xp.reshape(h, shape)


def member_counter_bits(shape: tuple[int, ...], keys: Sequence[int], counters: Sequence[int],
                        xp: types.ModuleType, device: Any = None) -> Any:
    """:func:`counter_bits` of K streams at once: an array of shape ``(K, *shape)`` whose
    row ``k`` is ``counter_bits(shape, keys[k], counters[k], xp, device)``, bit for bit.

    The K streams' words ``(s0, s1)`` are computed on the host and enter as a column of
    K values (a copy to the device, never a read from it), so the draw is one pass over
    ``K * prod(shape)`` elements whatever K is: an ensemble's members each draw their
    own dropout masks, those of a plain model of their own seed.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp._backend import counter_bits, member_counter_bits
    >>> both = member_counter_bits((2, 3), [5, 9], [0, 4], np)
    >>> both.shape, bool(np.array_equal(both[1], counter_bits((2, 3), 9, 4, np)))
    ((2, 2, 3), True)
    """
    keys, counters = [int(v) for v in keys], [int(v) for v in counters]
    k, n = len(keys), math.prod(shape)
    if len(counters) != k or k < 1:
        msg = f"member_counter_bits needs one counter per key, got {k} keys and {len(counters)} counters"
        raise ValueError(msg)
    if n > _M32:
        msg = f"counter_bits draws at most 2**32 - 1 values per call, got shape {shape}"
        raise ValueError(msg)
    words = [_splitmix64((key & _M64) ^ _splitmix64(c & _M64)) for key, c in zip(keys, counters)]
    s0 = numpy.array([w & _M32 for w in words], dtype=numpy.uint32).reshape(k, 1)
    s1 = numpy.array([w >> 32 for w in words], dtype=numpy.uint32).reshape(k, 1)
    out_shape = (k, *shape)
    kind = backend_name(xp)
    no_int64 = dtype_name(index_dtype(xp)) != "int64"
    torch_cpu = kind == "torch" and getattr(canonical_device(xp, device), "type", None) == "cpu"
    if kind == "numpy" or no_int64 or torch_cpu:
        h = numpy.arange(n, dtype=numpy.uint32)[None, :] + s0  # wraps mod 2**32
        h = _mix32_numpy(h)
        h ^= s1
        h = _mix32_numpy(h).reshape(out_shape)
        if no_int64:
            return xp.asarray(h, device=device)
        return h if kind == "numpy" else xp.asarray(h.astype(numpy.int64))  # torch on the host: no copy
    c0 = xp.asarray(s0.astype(numpy.int64), device=device)
    c1 = xp.asarray(s1.astype(numpy.int64), device=device)
    i = xp.arange(n, dtype=xp.int64, device=device)
    if kind in ("torch", "cupy"):
        h = xp.reshape(i, (1, n)) + c0
        h &= _M32
        h = _mix32_wrapping(h)
        h ^= c1
        return xp.reshape(_mix32_wrapping(h), out_shape)
    h = _mix32(_mix32((xp.reshape(i, (1, n)) + c0) & _M32) ^ c1)
    return xp.reshape(h, out_shape)


class Generator:
    """One seeded random generator per model.

    Two streams come from one seed: a host stream (``numpy.random.Generator``) for
    initialisation and shuffling, so that the same seed gives the same initial weights
    and batch order on every backend; and a counter-based stream for per-step draws
    such as dropout masks (:func:`counter_bits`), computed where the data lives from
    two integers, a key derived from the seed and a counter of the draws made. The
    counter-based stream gives the same values on every backend and device, and its
    whole state is those two integers, so checkpoints, ``copy()`` and ``to()``
    continue it exactly.

    Parameters
    ----------
    seed : int or None
        ``None`` draws fresh entropy.
    xp : module
        The namespace arrays are made in.
    device : optional
        Device of those arrays.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> xp = am.resolve_backend("numpy")
    >>> a, b = am.Generator(0, xp), am.Generator(0, xp)
    >>> w = a.normal((3, 2), 0.1, xp.float32)
    >>> w.shape, w.dtype
    ((3, 2), dtype('float32'))
    >>> bool(np.array_equal(w, b.normal((3, 2), 0.1, xp.float32)))
    True
    >>> sorted(a.permutation(5).tolist())
    [0, 1, 2, 3, 4]
    >>> u = a.random((2, 3), xp.float32)
    >>> a.counter, bool(np.array_equal(u, am.Generator(0, xp).random((2, 3), xp.float32)))
    (1, True)
    """

    def __init__(self, seed: int | None, xp: types.ModuleType, device: Any = None):
        self.seed_sequence = numpy.random.SeedSequence(seed)
        host_seq, stream_seq = self.seed_sequence.spawn(2)
        self.host = numpy.random.Generator(numpy.random.PCG64(host_seq))
        self.xp = xp
        self.device = device
        #: the counter-based stream: its key (from the seed) and the number of draws made
        self.key = int(stream_seq.generate_state(1, dtype=numpy.uint64)[0])
        self.counter = 0

    # -- host stream: initialisation and shuffling -------------------------------
    def _put(self, a: numpy.ndarray, dtype: Any) -> Any:
        return self.xp.asarray(a, dtype=dtype, device=self.device)

    def full(self, shape: tuple[int, ...], value: float, dtype: Any) -> Any:
        """A constant array on the generator's device (draws nothing)."""
        return self.xp.full(shape, value, dtype=dtype, device=self.device)

    def normal(self, shape: tuple[int, ...], std: float, dtype: Any) -> Any:
        """Host-drawn normal values with standard deviation ``std``, shape ``shape``."""
        return self._put(self.host.normal(0.0, std, size=shape), dtype)

    def uniform(self, shape: tuple[int, ...], limit: float, dtype: Any) -> Any:
        """Host-drawn uniform values in ``[-limit, limit)``, shape ``shape``."""
        return self._put(self.host.uniform(-limit, limit, size=shape), dtype)

    def permutation(self, n: int) -> Any:
        """A host-drawn permutation of ``range(n)`` as an integer array on the device."""
        return self.xp.asarray(self.host.permutation(n), dtype=index_dtype(self.xp), device=self.device)

    # -- counter-based stream: per-step draws ----------------------------------------
    def bits(self, shape: tuple[int, ...]) -> Any:
        """32 random bits per element (integers in [0, 2**32)) of ``shape``, on the
        generator's device: the draw of the current counter, which then advances by one."""
        out = counter_bits(tuple(shape), self.key, self.counter, self.xp, self.device)
        self.counter += 1
        return out

    def random(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Uniform values in [0, 1) of ``shape``, multiples of 2**-24 (the top 24 of
        :meth:`bits`), so that float32 and float64 hold the same values exactly; a
        float16 request gets float32 (float16 cannot hold them)."""
        xp = self.xp
        if is_float16(dtype, xp):
            dtype = xp.float32
        b = self.bits(shape)
        if isinstance(b, numpy.ndarray):
            b >>= numpy.uint32(8)
            u = b.astype(numpy.float64 if dtype == numpy.float64 else numpy.float32)
        else:
            u = xp.astype(b >> 8, dtype)
        u *= 2.0 ** -24
        return u

    # -- state, for checkpoints ---------------------------------------------------
    def get_state(self) -> dict:
        """A JSON-able snapshot of both streams: the host generator's state and the
        counter-based stream's ``{"key": int, "counter": int}``."""
        return {"host": self.host.bit_generator.state, "stream": {"key": self.key, "counter": self.counter}}

    def moved(self, xp: types.ModuleType, device: Any = None) -> "Generator":
        """This generator for arrays of ``xp`` on ``device`` (a model's ``to`` or
        ``copy``): both streams continue where they are, on any backend."""
        new = Generator(self.seed_sequence.entropy, xp, device)
        new.set_state(self.get_state())
        return new

    def set_state(self, state: dict) -> None:
        """Restore a snapshot made by :meth:`get_state`. A snapshot without a
        ``"stream"`` entry (written before the stream was counter-based) restarts the
        stream at counter 0 of this generator's key."""
        self.host.bit_generator.state = state["host"]
        stream = state.get("stream")
        if stream is None:
            self.counter = 0
            return
        key, counter = stream["key"], stream["counter"]
        for name, v in (("key", key), ("counter", counter)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= _M64:
                msg = f"the random stream's {name} must be an integer in [0, 2**64), got {v!r}"
                raise ValueError(msg)
        self.key, self.counter = int(key), int(counter)


class MemberGenerators(Generator):
    """The random streams of an ensemble of K members: a shared generator and one
    :class:`Generator` per member.

    The shared streams (this object's own, those of a :class:`Generator`) draw what the
    members share: the batch order of ``fit(..., shuffle=True)``. Member ``i``'s generator
    draws member ``i``'s own: its dropout masks (:meth:`bits` gives every member its own
    draw, one pass over all of them, :func:`member_counter_bits`) and, with
    ``fit(..., shuffle="members")``, its batch order. Each member's generator is the one a
    plain model of member ``i``'s seed would hold at the same point, so member ``i``
    draws what that plain model draws.

    Parameters
    ----------
    shared : Generator
    members : sequence of Generator
        One per member (K), of the shared generator's namespace and device.

    Attributes
    ----------
    active : numpy.ndarray of bool, shape (K,), or None
        The members whose streams advance (``None``: all). A frozen member (per-member
        early stopping) still gets masks, but its counter stays, so that when it trains
        again it draws what its plain model, stopped at the same point, would draw.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> from arraymlp._backend import MemberGenerators
    >>> gens = MemberGenerators(am.Generator(0, np), [am.Generator(s, np) for s in (5, 6)])
    >>> u = gens.bits((2, 4, 3))                    # each member's (4, 3) draw
    >>> bool(np.array_equal(u[1], am.Generator(6, np).bits((4, 3))))
    True
    >>> gens.bits((4, 3)).shape, [m.counter for m in gens.members]   # a shared input: (K, 4, 3)
    ((2, 4, 3), [2, 2])
    """

    def __init__(self, shared: Generator, members: Sequence[Generator]):
        self.seed_sequence, self.host = shared.seed_sequence, shared.host
        self.xp, self.device = shared.xp, shared.device
        self.key, self.counter = shared.key, shared.counter
        self.members = list(members)
        self.active = None

    def bits(self, shape: tuple[int, ...]) -> Any:
        """Each member's draw of its own stream, shape ``(K, *per)``: ``per`` is
        ``shape[1:]`` for an array of the members' activations (K, n, d), else ``shape``
        (an input every member shares). Each active member's counter advances by one."""
        shape, k = tuple(shape), len(self.members)
        per = shape[1:] if len(shape) >= 3 and shape[0] == k else shape
        out = member_counter_bits(per, [m.key for m in self.members], [m.counter for m in self.members],
                                  self.xp, self.device)
        for i, m in enumerate(self.members):
            if self.active is None or self.active[i]:
                m.counter += 1
        return out

    def get_state(self) -> dict:
        """As :meth:`Generator.get_state`, with ``"members"``: each member's state."""
        return {**super().get_state(), "members": [m.get_state() for m in self.members]}

    def set_state(self, state: dict) -> None:
        """Restore a :meth:`get_state` snapshot (one without ``"members"`` leaves the
        members' streams as they are)."""
        super().set_state(state)
        members = state.get("members")
        if members is None:
            return
        if len(members) != len(self.members):
            msg = f"the random state holds {len(members)} members' streams but the ensemble has {len(self.members)}"
            raise ValueError(msg)
        for m, s in zip(self.members, members):
            m.set_state(s)

    def moved(self, xp: types.ModuleType, device: Any = None) -> "MemberGenerators":
        """As :meth:`Generator.moved`, every member's streams included."""
        return MemberGenerators(Generator.moved(self, xp, device), [m.moved(xp, device) for m in self.members])


def generator_from_state(entropy: Any, state: dict, xp: types.ModuleType, device: Any = None) -> Generator:
    """The generator a :meth:`Generator.get_state` snapshot describes: a
    :class:`MemberGenerators` when it holds members' streams, else a :class:`Generator`."""
    gen = Generator(entropy, xp, device)
    members = state.get("members")
    if members is not None:
        gen = MemberGenerators(gen, [Generator(entropy, xp, device) for _ in members])
    gen.set_state(state)
    return gen
