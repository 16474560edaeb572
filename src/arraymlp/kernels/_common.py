"""Overrides shared by several backend sets, each saying which namespaces take it.

- NumPy and CuPy (ufuncs with ``out=``, reductions by method): the in-place ReLU and
  tanh, the bias gradient and row reductions by method, the batch sum.
- NumPy, CuPy and torch (integer-array indexing, ``out=``): picking and subtracting the
  true class of a label cross-entropy, the optimiser's product into a work buffer.
- NumPy, CuPy and torch (sparse matrices): the dense layer's products with a
  scipy.sparse (NumPy), cupyx.scipy.sparse (CuPy) or sparse torch tensor (torch) input,
  the first layer's.

Every function here has the signature and values of its reference kernel.
"""

from __future__ import annotations

import math

from .._backend import device_of, is_sparse, is_writeable, memo, sparse_transpose
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
    """``xp.arange(n)`` where ``like`` lives, kept for the next batch of the same size
    (keyed by the array's own ``device`` attribute: array-api-compat's ``device()``
    costs more than the lookup; a CuPy device is unhashable, so its ``id`` is the key)."""
    device = getattr(like, "device", None)
    return memo(_ROWS, (xp, n, getattr(device, "id", device)),
                lambda: xp.arange(n, device=device_of(like)), limit=8)


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
        s = work(n, p, xp).reshape(p.shape)
        xp.multiply(g, a, out=s)
        return xp.add(p, s, out=p)
    p += a * g  # small arrays: a temporary costs less than the bookkeeping
    return p


# ------------------------------------------------------ NumPy, CuPy and torch (sparse)
# A sparse ``x`` is the first layer's input (nothing else in a network is sparse): its
# products are the sparse library's own, compressed rows times a dense matrix, costing
# O(nnz * n_out) and giving a dense array of the set's library. The reference kernels
# read ``x @ W`` and ``x.T @ dy`` too; these say so explicitly and keep the results plain
# arrays (torch's sparse tensors have no strided ``.T``: the transpose is
# :func:`sparse_transpose`). The CuPy side (cupyx.scipy.sparse) is written the same way
# and is untested without a CUDA device.
#
# An ensemble's stacked operand has a member axis, (K, n_in, n_out). When a batch touches
# at most half the features (a wide sparse matrix, such as a TF-IDF one), the weight
# gradient ``x.T @ dy`` is one sparse product: the output gradients laid side by side,
# (n, K * n_out), only the touched feature rows computed, then scattered into the zero
# rows of the (K, n_in, n_out) gradient; the sparse entries are walked once, not K times.
# Otherwise, and always for the forward ``x @ W``, it is K sparse products, one per member:
# laying W side by side would copy the touched rows of all K weight matrices at each
# step, as much memory traffic as the product itself, and measured slower than the K
# products on the CPU (docs/sklearn.md gives the figures).
def sparse_product(x, W, xp):
    """``x @ W`` for a sparse ``x`` (n, n_in) and a dense ``W`` (n_in, n_out): a dense
    array (n, n_out) of ``W``'s library.

    A stacked ``W`` (K, n_in, n_out) (an ensemble's weights, or its output gradients
    (K, n, n_out) in ``x.T @ dy``) gives the K members' products, (K, n, n_out),
    ``y[k] = x @ W[k]`` (:func:`_stacked_product`).
    """
    if W.ndim == 3:
        return _stacked_product(x, W, xp)
    y = x @ W
    return y if type(y) is type(W) else xp.asarray(y)  # never a numpy.matrix


def _stacked_product(x, W, xp):
    """``x @ W[k]`` for every k, (K, a, m), of a sparse ``x`` (a, b) and ``W`` (K, b, m).

    A CSC ``x`` (the transpose of a CSR batch, in ``x.T @ dy``) that stores entries in
    at most half of its rows is one sparse product over those rows (``x.indices``):
    ``W`` side by side, (b, K * m), the result's other rows zero. Any other ``x`` is K
    sparse products."""
    k, m = int(W.shape[0]), int(W.shape[2])
    # the stored rows, sorted (a scipy or cupyx CSC matrix; a torch tensor takes K products)
    used = xp.unique_values(x.indices) if getattr(x, "format", None) == "csc" else None
    n_rows = int(x.shape[0])
    if used is None or 2 * int(used.shape[0]) > n_rows:
        return xp.stack([sparse_product(x, W[i, ...], xp) for i in range(k)])
    u = int(used.shape[0])
    side = xp.reshape(xp.permute_dims(W, (1, 0, 2)), (int(W.shape[1]), k * m))  # column block i is W[i]
    # the stored rows renumbered 0..u-1: a (u, a') matrix, its product (u, K * m)
    compact = type(x)((x.data, xp.searchsorted(used, x.indices), x.indptr), shape=(u, int(x.shape[1])))
    y = sparse_product(compact, side, xp)
    out = xp.zeros((k, n_rows, m), dtype=y.dtype)
    out[:, used, :] = xp.permute_dims(xp.reshape(y, (u, k, m)), (1, 0, 2))
    return out


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
        dW = sparse_product(sparse_transpose(x), dy, xp)
        db = bias_grad(dy, xp) if has_bias else None
        # dense: the gradient of a sparse input is not (the transpose is of the last two axes)
        dx = dy @ xp.matrix_transpose(W) if need_dx else None
        return dx, dW, db
    return R.dense_backward(x, W, dy, has_bias, need_dx, xp, bias_grad=bias_grad)


def dense_sgd_update(x, dy, W, b, lr, l2, xp, *, bias_grad=R.bias_grad, sgd_apply=R.sgd_apply):
    """The plain SGD step of a dense layer; for a sparse ``x`` the weight gradient is
    the sparse product ``x.T @ dy``, then applied as the reference applies it."""
    if is_sparse(x):
        W = sgd_apply(W, sparse_product(sparse_transpose(x), dy, xp), lr, l2, xp)
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


# ----------------------------------- NumPy, CuPy and torch (optimiser updates, out=)
# The reference updates allocate a temporary per operation. These compute the same
# operations, in the same order and dtype, into the optimiser's work buffer with
# ``out=``: bit for bit the reference's values without the temporaries. They apply when
# the parameter and its state may be written and the gradient has the parameter's dtype
# (a gradient of another dtype would round differently in a buffer of the parameter's).
# Hyper-parameters are numbers or arrays broadcasting against ``p`` (an ensemble's
# per-member values), as in the reference.
def _buffers(work, k, p, xp):
    """``k`` scratch arrays of ``p``'s shape, from one loan of the work buffer (reshaped by
    the array's own method: NumPy's function form adds a Python-level wrapper)."""
    shape = p.shape
    n = math.prod(shape)
    flat = work(k * n, p, xp)
    if k == 1:
        return [flat.reshape(shape)]
    return [flat[i * n:(i + 1) * n].reshape(shape) for i in range(k)]


def _out_applies(p, g, states, work) -> bool:
    if work is None or g.dtype != p.dtype or not is_writeable(p):
        return False
    for s in states:
        if s is not None and not is_writeable(s):
            return False
    return True


def _coupled(g, p, wd, w, xp):
    """``g + wd * p`` into ``w``."""
    xp.multiply(p, wd, out=w)
    return xp.add(g, w, out=w)


def adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work=None):
    if not _out_applies(p, g, (m, v, vmax), work):
        return R.adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work)
    on = R.is_on(wd)
    coupled = on and not decoupled
    w, *rest = _buffers(work, 2 if coupled else 1, p, xp)
    if on:
        if decoupled:
            p *= 1.0 - lr * wd
        else:
            g = _coupled(g, p, wd, rest[0], xp)
    m *= b1
    m += xp.multiply(g, 1.0 - b1, out=w)
    v *= b2
    xp.multiply(g, g, out=w)
    w *= 1.0 - b2
    v += w
    second = v if vmax is None else xp.maximum(vmax, v, out=vmax)
    xp.sqrt(second, out=w)
    w /= R.hyper_sqrt(1.0 - b2**t, xp)
    w += eps
    xp.divide(m, w, out=w)
    w *= lr / (1.0 - b1**t)
    p -= w
    return p, m, v, vmax


def rmsprop_update(p, g, square_avg, grad_avg, buf, lr, alpha, eps, momentum, wd, xp, work=None):
    if not _out_applies(p, g, (square_avg, grad_avg, buf), work):
        return R.rmsprop_update(p, g, square_avg, grad_avg, buf, lr, alpha, eps, momentum, wd, xp, work)
    w, w2 = _buffers(work, 2, p, xp)
    if R.is_on(wd):
        g = _coupled(g, p, wd, w2, xp)
    square_avg *= alpha
    xp.multiply(g, g, out=w)
    w *= 1.0 - alpha
    square_avg += w
    if grad_avg is not None:
        grad_avg *= alpha
        grad_avg += xp.multiply(g, 1.0 - alpha, out=w)
        xp.multiply(grad_avg, grad_avg, out=w)
        xp.subtract(square_avg, w, out=w)
        xp.sqrt(w, out=w)
    else:
        xp.sqrt(square_avg, out=w)
    w += eps
    xp.divide(g, w, out=w)  # g / avg; g's buffer (w2) is not read after this
    if buf is not None:
        buf *= momentum
        buf += w
        w = xp.multiply(buf, lr, out=w)
    else:
        w *= lr
    p -= w
    return p, square_avg, grad_avg, buf


def adagrad_update(p, g, s, lr, eps, wd, xp, work=None):
    if not _out_applies(p, g, (s,), work):
        return R.adagrad_update(p, g, s, lr, eps, wd, xp, work)
    w, w2 = _buffers(work, 2, p, xp)
    if R.is_on(wd):
        g = _coupled(g, p, wd, w2, xp)
    s += xp.multiply(g, g, out=w)
    xp.sqrt(s, out=w)
    w += eps
    xp.divide(g, w, out=w)
    w *= lr
    p -= w
    return p, s


OPTIMIZER_OVERRIDES = {
    "adam_update": adam_update,
    "rmsprop_update": rmsprop_update,
    "adagrad_update": adagrad_update,
}
