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
#: arg-max, comparison and count about 4 us).
_CALL_COST = {"relu": 2e-6, "ce": 2e-5, "hits": 4e-6}
_ELEMENT_COST = {"relu": 1.3e-9, "ce": 1.5e-8, "hits": 1e-9}
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


def member_adam(p, g, m, v, b1, b2, step, eps) -> bool:
    """Adam's step of an ensemble's stacked parameter in one pass, in place (see
    :func:`arraymlp.kernels.reference.member_adam_update`); False (nothing written) where
    the kernel does not apply. ``p``, ``g``, ``m``, ``v``: C-contiguous writeable NumPy
    arrays of one float dtype and shape (K, ...); the rest floats or (K, 1, 1) arrays."""
    kern = kernels()
    if kern is None or p.ndim < 2 or p.dtype not in _DTYPES:
        return False
    for a in (p, g, m, v):
        if type(a) is not numpy.ndarray or a.dtype != p.dtype or a.shape != p.shape or not a.flags.c_contiguous:
            return False
    if not (p.flags.writeable and m.flags.writeable and v.flags.writeable):
        return False
    # distinct buffers (the loop reads g, m, v after writing p, m, v element by element)
    if (numpy.may_share_memory(p, g) or numpy.may_share_memory(p, m) or numpy.may_share_memory(p, v)
            or numpy.may_share_memory(m, v) or numpy.may_share_memory(m, g) or numpy.may_share_memory(v, g)):
        return False
    k = p.shape[0]
    per = []
    for h in (b1, b2, step, eps):
        if type(h) is numpy.ndarray and h.size == k:
            per.append(numpy.ascontiguousarray(h.reshape(k), dtype=p.dtype))
        elif isinstance(h, float):
            per.append(numpy.full(k, h, dtype=p.dtype))
        else:
            return False
    try:
        kern.member_adam(p.reshape(k, -1), g.reshape(k, -1), m.reshape(k, -1), v.reshape(k, -1), *per)
    except Exception as exc:
        _fall_back(exc)
        return False
    return True
