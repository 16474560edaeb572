"""The NumPy set: NumPy's ufuncs with ``out=``, its bundled BLAS, and compiled one-pass
loops where Numba is installed (:mod:`._jit`). Each override checks that it applies
(dtype, layout, writeable) and otherwise calls the kernel it replaces.

The measurements behind each override are in docs/benchmarks.md ("Figures behind the code's
choices").
"""

from __future__ import annotations

import math

import numpy

from .._backend import is_sparse, is_writeable, memo, row_sums_finite
from . import _blas, _jit
from . import _common as C
from . import reference as R

_BLAS_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
# Below this many weights the BLAS call through ctypes costs more than the pass it saves.
_BLAS_ACC_MIN = 16384
_CONST_ROWS: dict = {}


def _const_row(value, n, dtype):
    """A row of ``n`` copies of ``value`` (0 or 1), made once per (value, length, dtype)
    and only ever read: ReLU's zeros, the ones of the bias gradient."""
    return memo(_CONST_ROWS, (value, n, dtype), lambda: (numpy.ones if value else numpy.zeros)((n,), dtype=dtype))


def all_finite(a, xp, rows: int | None = None) -> bool:
    """Float32/float64 arrays of one or two axes are screened by BLAS products first,
    ``a[block] @ ones`` block by block: a NaN or infinite entry makes its row's sum NaN
    or infinite, so finite sums prove the array finite without a boolean mask. Sums
    that overflowed, or came from a non-finite entry, fall through to the exact test."""
    if a.dtype in _BLAS_DTYPES and a.ndim in (1, 2) and a.shape[-1]:
        m = a if a.ndim == 2 else a[:, None]  # a column: its ones row is one long
        ones = _const_row(1, m.shape[1], m.dtype)
        step = R.block_rows(m) if rows is None else rows
        if all(row_sums_finite(m[i:j], ones) for i, j in R.row_blocks(m.shape[0], step)):
            return True
    return R.all_finite(a, xp, rows)


def bias_grad(dy, xp):
    """``ones @ dy`` for float32/float64: BLAS's matrix-vector product reads ``dy`` faster
    than NumPy's reduction over the first axis (the rows are added in another order). An
    ensemble's ``dy`` (K, n, m) takes a row of ones (1, n), batched: (K, 1, m), where
    NumPy's reduction over the middle axis is ten times slower."""
    if dy.dtype in _BLAS_DTYPES:
        if dy.ndim == 2:
            return _const_row(1, dy.shape[0], dy.dtype) @ dy
        if dy.ndim == 3:
            return _const_row(1, dy.shape[1], dy.dtype).reshape(1, dy.shape[1]) @ dy
    return C.bias_grad(dy, xp)


def relu_forward_inplace(x, xp):
    """A broadcast row of zeros runs NumPy's contiguous SIMD loop; a scalar does not."""
    if is_writeable(x) and x.ndim:
        return numpy.maximum(x, _const_row(0, x.shape[-1], x.dtype), out=x)
    return C.relu_forward_inplace(x, xp)


def relu_backward_inplace(dy, y, xp):
    """One compiled pass where Numba is installed (the kernel checks ``dy`` is writeable)."""
    if _jit.relu_backward(dy, y):
        return dy
    return C.relu_backward_inplace(dy, y, xp)


def dense_relu_forward(x, W, b, xp, *, relu_forward_inplace=R.relu_forward_inplace):
    """The bias and the ReLU in one compiled pass over the product, where Numba is
    installed; bit for bit the values of the two passes. A scipy.sparse ``x`` is
    multiplied by scipy's sparse product."""
    y = C.sparse_product(x, W, xp) if is_sparse(x) else x @ W
    if b is not None and _jit.bias_relu(y, b):
        return y
    return relu_forward_inplace(y if b is None else R.add_bias(y, b, xp), xp)


def dense_sgd_update(x, dy, W, b, lr, l2, xp, *, bias_grad=R.bias_grad, sgd_apply=R.sgd_apply):
    """The product accumulates into ``W`` by one BLAS call (``beta = 1 - lr * l2``,
    ``alpha = -lr``): no temporary the size of ``W``. A scipy.sparse ``x`` takes the
    sparse product instead; an ensemble's stacked weights (three axes) take ``matmul``."""
    if not (W.ndim == 2 and x.ndim == 2 and math.prod(W.shape) >= _BLAS_ACC_MIN
            and _blas.gemm_acc(W, x, dy, -lr, 1.0 - lr * l2)):
        # the reference's step (inlined: a call less per layer)
        if type(x) is numpy.ndarray and x.ndim == 2 and type(W) is numpy.ndarray and W.flags.writeable:
            g = x.T @ dy  # a fresh array: sgd_apply's operations on it, in its order
            if l2:
                g += l2 * W
            g *= -lr
            W += g
            if b is not None:
                db = bias_grad(dy, xp)
                if (type(b) is numpy.ndarray and b.flags.writeable and type(db) is numpy.ndarray
                        and db.flags.writeable):
                    db *= -lr
                    b += db
                else:
                    b = sgd_apply(b, db, lr, 0.0, xp)
            return W, b
        if is_sparse(x):
            g = C.sparse_product(x.T, dy, xp)
        else:
            g = (x.T if x.ndim == 2 else xp.matrix_transpose(x)) @ dy
        W = sgd_apply(W, g, lr, l2, xp)
    if b is not None:
        b = sgd_apply(b, bias_grad(dy, xp), lr, 0.0, xp)
    return W, b


def dense_backward(x, W, dy, has_bias, need_dx, xp, *, bias_grad=R.bias_grad):
    """Two-dimensional NumPy arrays multiply by their ``.T`` views (the standard
    ``matrix_transpose`` is a Python-level wrapper call per product: two of the three
    products of every layer's backward pass); the same products, so the same values.
    Anything else (a sparse input, an ensemble's stacked arrays) as the shared kernel."""
    if type(x) is numpy.ndarray and x.ndim == 2 and type(W) is numpy.ndarray and W.ndim == 2:
        dW = x.T @ dy
        db = bias_grad(dy, xp) if has_bias else None
        return (dy @ W.T if need_dx else None), dW, db
    return C.dense_backward(x, W, dy, has_bias, need_dx, xp, bias_grad=bias_grad)


def row_max(x, xp):
    """Many short rows are reduced from a transposed copy, column by column: NumPy
    reduces a short last axis row by row, at tens of nanoseconds a row."""
    if x.ndim == 2 and x.shape[1] <= 16 and x.shape[0] >= 32:
        return x.T.copy().max(axis=0).reshape(x.shape[0], 1)
    return C.row_max(x, xp)


def row_sum(x, xp):
    """As :func:`row_max`, from 64 rows (the sum's rounding order then differs)."""
    if x.ndim == 2 and x.shape[1] <= 16 and x.shape[0] >= 64:
        return x.T.copy().sum(axis=0).reshape(x.shape[0], 1)
    return C.row_sum(x, xp)


def cross_entropy_labels_mean(x, labels, xp, *, cross_entropy_labels=R.cross_entropy_labels,
                              batch_sum=R.batch_sum):
    """One compiled loop over the rows where Numba is installed; each row's exponentials
    are added in float64."""
    fused = _jit.cross_entropy_labels(x, labels)
    if fused is not None:
        return fused
    return R.cross_entropy_labels_mean(x, labels, xp, cross_entropy_labels=cross_entropy_labels,
                                       batch_sum=batch_sum)


def cross_entropy_labels_mean_hits(x, labels, hits, xp, *, cross_entropy_labels_mean=R.cross_entropy_labels_mean,
                                   add_argmax_hits=R.add_argmax_hits):
    """The compiled cross-entropy loop counts the right answers as it finds each row's
    maximum, where Numba is installed (int64 labels and count): the training accuracy
    at no pass of its own."""
    fused = _jit.cross_entropy_labels(x, labels, hits)
    if fused is not None:
        return (*fused, hits)
    return R.cross_entropy_labels_mean_hits(x, labels, hits, xp, cross_entropy_labels_mean=cross_entropy_labels_mean,
                                            add_argmax_hits=add_argmax_hits)


def add_argmax_hits(total, scores, labels, xp):
    """One compiled pass with no temporary where Numba is installed (float32/float64
    scores, int64 labels and count); else ``argmax`` and ``count_nonzero`` added into a
    writeable count, which spares the reference's cast, its sum and their wrappers."""
    if _jit.add_argmax_hits(total, scores, labels):
        return total
    if (type(total) is numpy.ndarray and total.flags.writeable and type(scores) is numpy.ndarray
            and type(labels) is numpy.ndarray and labels.dtype == numpy.int64 and scores.ndim == 2):
        total += numpy.count_nonzero(scores.argmax(axis=1) == labels)
        return total
    return R.add_argmax_hits(total, scores, labels, xp)


def adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work=None):
    """One compiled pass over the parameter where Numba is loaded (:func:`._jit.adam`),
    with the ufunc path's operations in its order and dtype, so the same values bit for
    bit; otherwise the ufunc path into the work buffer (``_common``). The step's
    constants are computed as that path computes them, from numbers in Python or from
    an ensemble's per-member arrays in their dtype. With hyper-parameters that are
    Python floats (a plain model's optimiser) the pass runs at every size, its checks
    being cheap (:func:`._jit.adam_numbers`); per-member arrays take it from
    :data:`._jit.ADAM_MIN` elements."""
    if type(p) is numpy.ndarray:
        if _numbers(lr, b1, b2, eps, wd) and type(t) is int:
            on = wd != 0
            coupled = on and not decoupled
            decay = on and bool(decoupled)
            if _jit.adam_numbers(p, g, m, v, vmax, (b1, 1.0 - b1, b2, 1.0 - b2, math.sqrt(1.0 - b2**t), eps,
                                                    lr / (1.0 - b1**t), wd if coupled else 0.0,
                                                    1.0 - lr * wd if decay else 1.0), coupled, decay):
                return p, m, v, vmax
        elif p.size >= _jit.ADAM_MIN:  # (smaller: the call costs more than it saves)
            decay = decoupled and R.is_on(wd)
            coupled = R.is_on(wd) and not decoupled

            def constants():
                return (b1, 1.0 - b1, b2, 1.0 - b2, R.hyper_sqrt(1.0 - b2**t, xp), eps, lr / (1.0 - b1**t),
                        wd if coupled else 0.0, 1.0 - lr * wd if decay else 1.0)

            if _jit.adam(p, g, m, v, vmax, constants, coupled, decay):
                return p, m, v, vmax
    return C.adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work)


def _numbers(*hyper) -> bool:
    """Whether every hyper-parameter is a Python float or int (not a NumPy scalar, which
    NumPy would not round to the array's dtype first)."""
    for h in hyper:
        if type(h) is not float and type(h) is not int:
            return False
    return True


OVERRIDES = {
    **C.UFUNC_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    **C.OPTIMIZER_OVERRIDES,
    **C.SPARSE_OVERRIDES,
    "adam_update": adam_update,
    "add_argmax_hits": add_argmax_hits,
    "all_finite": all_finite,
    "bias_grad": bias_grad,
    "dense_backward": dense_backward,
    "dense_relu_forward": dense_relu_forward,
    "dense_sgd_update": dense_sgd_update,
    "relu_forward_inplace": relu_forward_inplace,
    "relu_backward_inplace": relu_backward_inplace,
    "row_max": row_max,
    "row_sum": row_sum,
    "cross_entropy_labels_mean": cross_entropy_labels_mean,
    "cross_entropy_labels_mean_hits": cross_entropy_labels_mean_hits,
}
