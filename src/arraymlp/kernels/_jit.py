"""Compiled one-pass kernels for NumPy arrays, where Numba is installed.

NumPy runs each elementwise operation as its own pass over memory, and each call costs
about a microsecond before it touches an element. Three places of a training step pay
for that more than their arithmetic:

- a hidden layer's ``maximum(x @ W + b, 0)``: two passes (bias, then ReLU) fused into
  one;
- ReLU's backward ``dy * (y > 0)``: a mask, then a product, fused into one pass;
- softmax cross-entropy against labels: a dozen small calls (row maximum, shift, exp,
  row sum, log, picking the true class, ...) fused into one loop over the rows.

The measured effect of each is on the benchmarks page (docs/benchmarks.md). The kernels
live in :mod:`arraymlp.kernels._jitkernels`, compiled on first use and cached on
disk by Numba (``cache=True``). Each function here returns ``None`` or False where its
kernel does not apply (Numba missing or switched off, another dtype or layout, labels
out of range) and the caller then takes its NumPy path, which is also the reference the
tests hold these kernels to.

Loading them costs a process 0.3 s or more (importing Numba, reading or compiling the
kernels), which a short fit of a small network never wins back: each kernel saves
microseconds a call. So they load only once they would pay, as a ski rental: the NumPy
path runs, and each call a kernel could have taken adds its estimated NumPy time
(:data:`_CALL_COST` plus :data:`_ELEMENT_COST` per element) to a tally; when the tally
reaches :data:`LOAD_COST`, the kernels load and run from then on. A run thus spends at
most about twice what the better of the two choices would have. Calling
:func:`kernels` loads them at once (the benchmarks and tests do). The cross-entropy
kernel runs only for at most :data:`CE_MAX_CLASSES` classes: one scalar ``exp`` at a
time loses to NumPy's vectorised one on long rows (measured: 0.5 of NumPy's time at
1024 x 32 float32, 0.98 at 1024 x 64, 1.06 at 512 x 128, 1.42 at 256 x 512).

Set the environment variable ``ARRAYMLP_JIT=0`` to switch the kernels off (NumPy's
ufuncs only); Numba's own ``NUMBA_DISABLE_JIT=1`` does too, since the kernels would
then run as Python loops. The variable is read once, at the first use. Where the
kernels cannot be loaded or compiled (no writeable cache folder, say), a
RuntimeWarning says so once and NumPy's ufuncs run from then on.

The kernels set none of NumPy's floating-point error flags: an overflow in the bias
addition or ``inf * 0`` in ReLU's backward gives the same values as NumPy's path but no
warning, and ``numpy.errstate(all="raise")`` does not stop there.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy

_UNSET = object()
_kernels: Any = _UNSET  # the kernels module once loaded; None when unavailable or off
_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_INT64 = numpy.dtype(numpy.int64)

#: Seconds of NumPy-path time that loading the kernels is taken to cost (measured 0.3 to
#: 1.8 s for importing Numba and loading three cached kernels on a 2-core machine).
LOAD_COST = 0.5
#: Estimated NumPy time of one call a kernel could replace, in seconds: a fixed part and
#: a part per element (ReLU kernels: about 2 us + 1.3 ns per float32 element on one
#: core; the cross-entropy's dozen NumPy calls about ten times that; the accuracy count's
#: arg-max, comparison and count about 4 us; Adam's dozen passes over a parameter
#: about 15 us + 3 ns per float32 element).
_CALL_COST = {"relu": 2e-6, "ce": 2e-5, "hits": 4e-6, "adam": 1.5e-5}
_ELEMENT_COST = {"relu": 1.3e-9, "ce": 1.5e-8, "hits": 1e-9, "adam": 3e-9}
#: The cross-entropy kernel takes rows of at most this many classes.
CE_MAX_CLASSES = 32
_spent = 0.0  # estimated NumPy time of the calls the kernels could have taken so far


def _ready(kind: str, size: int):
    """The kernels module where loaded (or now worth loading), else None: before the
    kernels load, each eligible call adds its estimated NumPy time to the tally."""
    global _spent
    if _kernels is not _UNSET:
        return _kernels
    _spent += _CALL_COST[kind] + _ELEMENT_COST[kind] * size
    if _spent < LOAD_COST:
        return None
    return kernels()


def _load():
    if os.environ.get("ARRAYMLP_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import numba
    except Exception:  # not installed, or built for another NumPy: NumPy's ufuncs then
        return None
    if numba.config.DISABLE_JIT:
        return None
    try:  # the decorators look for a cache folder, and raise where none is writeable
        from . import _jitkernels
    except Exception as exc:
        _fall_back(exc)
        return None
    return _jitkernels


def _fall_back(exc: BaseException) -> None:
    """Switch the kernels off for this process, saying why once."""
    global _kernels
    _kernels = None
    warnings.warn(f"arraymlp: the compiled NumPy kernels are off ({type(exc).__name__}: {exc}); "
                  "NumPy's ufuncs run instead (set ARRAYMLP_JIT=0 to skip them)", RuntimeWarning, stacklevel=3)


def kernels():
    """The compiled kernels module, or None where Numba is missing or the kernels are
    switched off (looked up once)."""
    global _kernels
    if _kernels is _UNSET:
        _kernels = _load()
    return _kernels


def set_enabled(flag: bool | None) -> None:
    """Switch the kernels off (False), or back to what the environment allows (True or
    None; they load again at their next eligible call): for tests and measurements that
    compare both paths in one process."""
    global _kernels, _spent
    _kernels = None if flag is False else _UNSET
    if flag is not False:
        _spent = LOAD_COST


def _plain(a) -> bool:
    """A C-contiguous float32/float64 NumPy ndarray (not a subclass) of two axes."""
    return type(a) is numpy.ndarray and a.ndim == 2 and a.dtype in _DTYPES and a.flags.c_contiguous


def bias_relu(h, b) -> bool:
    """``h = maximum(h + b, 0)`` in place, in one pass; False (``h`` untouched) where the
    kernel does not apply. ``h`` (n, m) must be writeable; ``b`` (m,)."""
    if (_kernels is None or not _plain(h) or type(b) is not numpy.ndarray or b.dtype != h.dtype
            or b.shape != (h.shape[1],) or not b.flags.c_contiguous or not h.flags.writeable):
        return False
    k = _ready("relu", h.size)
    if k is None:
        return False
    try:
        k.bias_relu(h, b)
    except Exception as exc:  # a compilation that failed: nothing was written
        _fall_back(exc)
        return False
    return True


def relu_backward(dy, y) -> bool:
    """``dy *= (y > 0)`` in place, in one pass; False (``dy`` untouched) where the kernel
    does not apply. ``dy`` must be writeable."""
    if (_kernels is None or not _plain(dy) or not _plain(y) or y.dtype != dy.dtype or y.shape != dy.shape
            or not dy.flags.writeable or (dy is not y and numpy.may_share_memory(dy, y))):
        return False  # (overlapping views would read what the loop has just written)
    k = _ready("relu", dy.size)
    if k is None:
        return False
    try:
        k.relu_backward(dy, y)
    except Exception as exc:
        _fall_back(exc)
        return False
    return True


def _count(a) -> bool:
    """A writeable int64 NumPy array of shape (1,): a count the kernels add to."""
    return type(a) is numpy.ndarray and a.dtype == _INT64 and a.shape == (1,) and a.flags.writeable


def cross_entropy_labels(x, labels, hits=None):
    """Softmax cross-entropy of logits ``x`` (n, k) against int64 labels (n,):
    ``(total, g)``, with ``total`` the float64 sum of the per-row losses and
    ``g = (softmax(x) - onehot) / n`` a new array; None where the kernel does not
    apply (including a label outside ``[0, k)``, rows of more than
    :data:`CE_MAX_CLASSES` classes, and a ``hits`` that is not a writeable int64 array
    of shape (1,)). ``x`` is only read. With ``hits``, the rows whose arg-max is their
    label are added to ``hits[0]`` by the same pass (nothing is added where None is
    returned)."""
    if (_kernels is None or not _plain(x) or type(labels) is not numpy.ndarray or labels.dtype != _INT64
            or labels.shape != (x.shape[0],) or x.shape[0] == 0 or not 0 < x.shape[1] <= CE_MAX_CLASSES
            or (hits is not None and not _count(hits))):
        return None
    k = _ready("ce", x.size)
    if k is None:
        return None
    g = numpy.empty_like(x)
    try:
        ok, total = k.cross_entropy_labels(x, labels, g, x.dtype.type(1.0 / x.shape[0]),
                                           numpy.zeros(1, _INT64) if hits is None else hits)
    except Exception as exc:
        _fall_back(exc)
        return None
    return (total, g) if ok else None


def add_argmax_hits(total, x, labels) -> bool:
    """``total[0] +=`` the rows of ``x`` (n, k) whose arg-max is their int64 label, in
    one pass with no temporary; False (``total`` untouched) where the kernel does not
    apply. ``total`` is a writeable int64 array of shape (1,)."""
    if (_kernels is None or type(total) is not numpy.ndarray or type(labels) is not numpy.ndarray
            or type(x) is not numpy.ndarray or total.dtype != _INT64 or labels.dtype != _INT64
            or x.dtype not in _DTYPES or x.ndim != 2 or total.shape != (1,) or labels.shape != (x.shape[0],)
            or not x.shape[1] or not x.flags.c_contiguous or not total.flags.writeable):
        return False
    k = _ready("hits", x.size)
    if k is None:
        return False
    try:
        k.add_argmax_hits(total, x, labels)
    except Exception as exc:
        _fall_back(exc)
        return False
    return True


#: Adam's compiled pass takes per-member (array) hyper-parameters for parameters of at
#: least this many elements: below, its call (checks, a table of the members' constants,
#: dispatch: about 15 us) costs more than the dozen ufunc passes it replaces. With
#: hyper-parameters that are Python numbers it runs at every size
#: (:func:`adam_numbers`, whose checks cost a few microseconds).
ADAM_MIN = 16384


def _constants(hyper, k: int, p):
    """The (9, K) table of the step's constants in ``p``'s dtype: each a number (rounded
    once to that dtype, as NumPy rounds a Python scalar in an operation with the array)
    or an array in that dtype of one value per member, shape (K, 1, ..., 1) against ``p``
    (K, ...), or of one value; None for anything else."""
    if k == 1 and all(isinstance(h, (int, float)) for h in hyper):
        return numpy.array(hyper, dtype=p.dtype).reshape(len(hyper), 1)
    table = numpy.empty((len(hyper), k), dtype=p.dtype)
    for row, h in zip(table, hyper):
        if isinstance(h, (int, float)):
            row[...] = h
        elif (type(h) is numpy.ndarray and h.dtype == p.dtype and h.ndim <= p.ndim
              and (h.size == 1 or h.shape == (k,) + (1,) * (p.ndim - 1))):
            row[...] = h.reshape(h.size)
        else:
            return None
    return table


def _adam_arrays(p, g, m, v, vmax, disjoint: bool = False):
    """The arrays of an Adam step, ``(p, g, m, v[, vmax])``, where the compiled pass may
    take them (see :func:`adam`), else None. Arrays that own their memory and are
    distinct objects cannot overlap, which spares the pairwise memory test (about
    0.3 us a pair) in the usual case: state the optimiser made, a fresh gradient; so
    does ``disjoint``, the caller's word that it has compared the memory ranges."""
    dt = p.dtype
    if dt not in _DTYPES:
        return None
    shape = p.shape
    arrays = (p, g, m, v) if vmax is None else (p, g, m, v, vmax)
    owners = True
    for a in arrays:
        # (a dtype of the same kind and byte order is one object: identity first)
        if type(a) is not numpy.ndarray or (a.dtype is not dt and a.dtype != dt) or a.shape != shape:
            return None
        f = a.flags
        if not f.c_contiguous or not (f.writeable or a is g):
            return None
        owners = owners and f.owndata
    # distinct buffers: the loop reads each element of g, m, v after writing p, m, v
    if disjoint or (owners and len({id(a) for a in arrays}) == len(arrays)):
        return arrays
    if any(numpy.may_share_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:]):
        return None
    return arrays


_last_table: tuple = (None, None, None)  # (dtype, constants, their (9, 1) table) of the last call


def _table(constants: tuple, dt):
    """The (9, 1) table of ``constants`` in dtype ``dt``, remembered for the next call of
    the same step (every parameter of a step has the same constants). Zeros are never
    remembered: equality does not tell ``-0.0`` from ``0.0``."""
    global _last_table
    last_dt, last, table = _last_table
    if last_dt is dt and last == constants:
        return table
    table = numpy.array(constants, dtype=dt).reshape(9, 1)
    b1, _, b2, _, _, eps, step, _, _ = constants
    if b1 and b2 and eps and step:
        _last_table = (dt, constants, table)
    return table


def adam_numbers(p, g, m, v, vmax, constants: tuple, coupled: bool, decoupled: bool) -> bool:
    """:func:`adam` for hyper-parameters that are Python numbers, at any size: the step's
    nine constants (as :func:`adam` lists them) come as a tuple of Python numbers, rounded
    once to ``p``'s dtype, as NumPy rounds a Python scalar in an operation with an array;
    ``coupled`` and ``decoupled`` are bools. Its checks cost a few microseconds, so the
    one pass pays for the smallest parameter (measured in docs/benchmarks.md)."""
    if _kernels is None or type(p) is not numpy.ndarray:
        return False
    arrays = _adam_arrays(p, g, m, v, vmax)
    if arrays is None:
        return False
    kern = _ready("adam", p.size)
    if kern is None:
        return False
    rows = (1, p.size)
    try:
        kern.adam(p.reshape(rows), g.reshape(rows), m.reshape(rows), v.reshape(rows),
                  (v if vmax is None else vmax).reshape(rows), _table(constants, p.dtype), coupled, decoupled,
                  vmax is not None)
    except Exception as exc:
        _fall_back(exc)
        return False
    return True


def adam_around_sqrt(p, g, m, v, vmax, w, constants: tuple, coupled: bool, decoupled: bool, sqrt,
                     disjoint: bool = False) -> bool:
    """:func:`adam_numbers` in two compiled passes around ``sqrt()``, the caller's square
    root of ``v`` (or ``vmax``) into ``w``: for a library whose square root rounds
    otherwise than IEEE's (torch's vectorised one), so that the values stay that
    library's own, bit for bit. ``w`` is a scratch array of ``p``'s dtype and shape,
    sharing memory with none of the others (``disjoint``: the caller has checked that no
    two of the arrays share memory); False (nothing written) where the passes do not
    apply."""
    if _kernels is None or type(p) is not numpy.ndarray or type(w) is not numpy.ndarray:
        return False
    arrays = _adam_arrays(p, g, m, v, vmax, disjoint)
    if (arrays is None or w.dtype != p.dtype or w.shape != p.shape or not w.flags.c_contiguous
            or not w.flags.writeable or (not disjoint and any(numpy.may_share_memory(w, a) for a in arrays))):
        return False
    kern = _ready("adam", p.size)
    if kern is None:
        return False
    if p.dtype not in _split_ready:
        try:  # both passes compiled before the first writes: the second cannot fail halfway
            one = numpy.ones((1, 1), dtype=p.dtype)
            kern.adam_moments(one, one.copy(), one.copy(), one.copy(), one.copy(), numpy.ones((9, 1), p.dtype),
                              coupled, decoupled, vmax is not None)
            kern.adam_apply(one, one.copy(), one.copy(), numpy.ones((9, 1), p.dtype))
        except Exception as exc:
            _fall_back(exc)
            return False
        _split_ready.add(p.dtype)
    rows = (1, p.size)
    table = _table(constants, p.dtype)
    pr, mr = p.reshape(rows), m.reshape(rows)
    kern.adam_moments(pr, g.reshape(rows), mr, v.reshape(rows), (v if vmax is None else vmax).reshape(rows),
                      table, coupled, decoupled, vmax is not None)
    sqrt()
    kern.adam_apply(pr, mr, w.reshape(rows), table)
    return True


_split_ready: set = set()  # dtypes whose two passes are compiled


def adam(p, g, m, v, vmax, constants, coupled: bool, decoupled: bool) -> bool:
    """Adam's step of one parameter array in one pass, in place (the operations of
    :func:`arraymlp.kernels._common.adam_update`, bit for bit); False (nothing written)
    where the kernel does not apply. ``p``, ``g``, ``m``, ``v`` (and ``vmax`` unless None):
    C-contiguous NumPy arrays of one float dtype and shape, distinct, all but ``g``
    writeable. ``constants()`` gives the step's ``(b1, 1 - b1, b2, 1 - b2, sqrt(1 - b2**t),
    eps, lr / (1 - b1**t), wd, 1 - lr wd)`` (called only once the arrays qualify), each a
    number, or an array of K per-member values of shape (K, 1, ...) against an
    ensemble's stacked ``p`` (K, ...)."""
    if _kernels is None or type(p) is not numpy.ndarray or p.size < ADAM_MIN or _adam_arrays(p, g, m, v, vmax) is None:
        return False
    kern = _ready("adam", p.size)
    if kern is None:
        return False
    hyper = constants()
    k = p.shape[0] if any(type(h) is numpy.ndarray for h in hyper) else 1
    table = _constants(hyper, k, p)
    if table is None:
        return False
    rows = (k, p.size // k)
    try:
        kern.adam(p.reshape(rows), g.reshape(rows), m.reshape(rows), v.reshape(rows),
                  (v if vmax is None else vmax).reshape(rows), table, bool(coupled), bool(decoupled),
                  vmax is not None)
    except Exception as exc:
        _fall_back(exc)
        return False
    return True
