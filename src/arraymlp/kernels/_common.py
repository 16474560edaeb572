"""Overrides shared by several backend sets, each saying which namespaces take it.

- NumPy and CuPy (ufuncs with ``out=``, reductions by method): the in-place ReLU and
  tanh, the bias gradient and row reductions by method, the batch sum.
- NumPy, CuPy and torch (integer-array indexing, ``out=``): picking and subtracting the
  true class of a label cross-entropy, the optimiser's product into a work buffer.
- NumPy and CuPy (sparse matrices): the dense layer's products with a scipy.sparse
  (NumPy) or cupyx.scipy.sparse (CuPy) input, the first layer's.

Every function here has the signature and values of its reference kernel.
"""

from __future__ import annotations

import math

from .._backend import device_of, is_sparse, is_writeable, memo
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
    return dy.sum(axis=0)  # the method skips NumPy's Python-level reduction wrapper


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


# ------------------------------------------------------------- NumPy and CuPy (sparse)
# A sparse ``x`` is the first layer's input (nothing else in a network is sparse): its
# products are the sparse library's own, compressed rows times a dense matrix, costing
# O(nnz * n_out) and giving a dense array of the set's library. The reference kernels
# read ``x @ W`` and ``x.T @ dy`` too; these say so explicitly and keep the results plain
# arrays. The CuPy side (cupyx.scipy.sparse) is written the same way and is untested
# without a CUDA device.
def sparse_product(x, W, xp):
    """``x @ W`` for a sparse ``x`` (n, n_in) and a dense ``W`` (n_in, n_out): a dense
    array (n, n_out) of ``W``'s library."""
    y = x @ W
    return y if type(y) is type(W) else xp.asarray(y)  # never a numpy.matrix


def dense_forward(x, W, b, xp, *, add_bias=R.add_bias):
    """``y = x @ W + b``; a sparse ``x`` by the sparse library's product."""
    if is_sparse(x):
        y = sparse_product(x, W, xp)
        return y if b is None else add_bias(y, b, xp)
    return R.dense_forward(x, W, b, xp)


def dense_backward(x, W, dy, has_bias, need_dx, xp, *, bias_grad=R.bias_grad):
    """``(dx, dW, db)``; for a sparse ``x``, ``dW = x.T @ dy`` by the sparse library's
    product (a CSR matrix's transpose is a CSC view: no copy)."""
    if is_sparse(x):
        dW = sparse_product(x.T, dy, xp)
        db = bias_grad(dy, xp) if has_bias else None
        dx = dy @ W.T if need_dx else None  # dense: the gradient of a sparse input is not
        return dx, dW, db
    return R.dense_backward(x, W, dy, has_bias, need_dx, xp, bias_grad=bias_grad)


def dense_sgd_update(x, dy, W, b, lr, l2, xp, *, bias_grad=R.bias_grad, sgd_apply=R.sgd_apply):
    """The plain SGD step of a dense layer; for a sparse ``x`` the weight gradient is
    the sparse product ``x.T @ dy``, then applied as the reference applies it."""
    if is_sparse(x):
        W = sgd_apply(W, sparse_product(x.T, dy, xp), lr, l2, xp)
        if b is not None:
            b = sgd_apply(b, bias_grad(dy, xp), lr, 0.0, xp)
        return W, b
    return R.dense_sgd_update(x, dy, W, b, lr, l2, xp, bias_grad=bias_grad, sgd_apply=sgd_apply)


SPARSE_OVERRIDES = {
    "dense_forward": dense_forward,
    "dense_backward": dense_backward,
    "dense_sgd_update": dense_sgd_update,
}

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
