"""Overrides shared by several backend sets, each saying which namespaces take it.

- NumPy and CuPy (ufuncs with ``out=``, reductions by method): the in-place ReLU and
  tanh, the bias gradient and row reductions by method, the batch sum.
- NumPy, CuPy and torch (integer-array indexing, ``out=``): picking and subtracting the
  true class of a label cross-entropy, the optimiser's product into a work buffer.

Every function here has the signature and values of its reference kernel.
"""

from __future__ import annotations

import math

from .._backend import device_of, is_writeable, memo
from . import reference as R

#: Size from which :func:`axpy` computes its product into the optimiser's work buffer
#: instead of a temporary (smaller temporaries come from the allocator's heap, cheaply).
WORK_MIN = 32768

_ROWS: dict = {}


# ------------------------------------------------------------- NumPy and CuPy (ufuncs)
def relu_forward_inplace(x, xp):
    if is_writeable(x):
        return xp.maximum(x, 0, out=x)
    return R.relu(x, xp=xp)


def relu_backward_inplace(dy, y, xp):
    if is_writeable(dy):
        return xp.multiply(dy, y > 0, out=dy)
    return R.relu_backward_inplace(dy, y, xp)


def tanh_forward_inplace(x, xp):
    if is_writeable(x):
        return xp.tanh(x, out=x)
    return R.tanh(x, xp=xp)


def tanh_backward_inplace(dy, y, xp):
    if is_writeable(dy):
        d = y * y
        # out= needs an array: y * y of a 0-d NumPy array is a scalar
        d = xp.subtract(1.0, d, out=d) if is_writeable(d) else 1.0 - d
        dy *= d
        return dy
    return R.tanh_backward_inplace(dy, y, xp)


def bias_grad(dy, xp):
    # the method skips NumPy's Python-level reduction wrapper
    return dy.sum(axis=-2, keepdims=dy.ndim > 2)


def row_max(x, xp):
    return x.max(axis=-1, keepdims=True)


def row_sum(x, xp):
    return x.sum(axis=-1, keepdims=True)


def batch_sum(a, xp, dtype=None):
    return a.sum(dtype=dtype)


# --------------------------------------------------- NumPy, CuPy and torch (indexing)
def _rows(n, xp, like):
    """``xp.arange(n)`` where ``like`` lives, kept for the next batch of the same size."""
    device = device_of(like)
    return memo(_ROWS, (xp, n, device), lambda: xp.arange(n, device=device), limit=8)


def pick_labels(z, labels, xp):
    return z[_rows(z.shape[0], xp, z), labels]


def subtract_onehot(g, labels, xp):
    if is_writeable(g):
        g[_rows(g.shape[0], xp, g), labels] -= 1.0
        return g
    return R.subtract_onehot(g, labels, xp)


def axpy(p, a, g, xp, work=None):
    """``p + a * g`` into ``p``: the product into the optimiser's work buffer
    (``out=``), then added in place, the same values as ``p += a * g`` without its
    temporary. (torch's fused ``add_(g, alpha=a)`` would round once instead of twice.)"""
    if not is_writeable(p):
        return p + a * g
    n = math.prod(p.shape)
    if n >= WORK_MIN and work is not None:
        s = xp.reshape(work(n, p, xp), p.shape)
        xp.multiply(g, a, out=s)
        return xp.add(p, s, out=p)
    p += a * g  # small arrays: a temporary costs less than the bookkeeping
    return p


UFUNC_OVERRIDES = {
    "relu_forward_inplace": relu_forward_inplace,
    "relu_backward_inplace": relu_backward_inplace,
    "tanh_forward_inplace": tanh_forward_inplace,
    "tanh_backward_inplace": tanh_backward_inplace,
    "bias_grad": bias_grad,
    "row_max": row_max,
    "row_sum": row_sum,
    "batch_sum": batch_sum,
}

INDEXING_OVERRIDES = {
    "pick_labels": pick_labels,
    "subtract_onehot": subtract_onehot,
    "axpy": axpy,
}
