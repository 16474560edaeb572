"""The torch set: torch's in-place methods (``relu_``, ``tanh_``, ``mul_``), ``addmm_``
for the plain SGD step of a dense layer, integer-array indexing for the label
cross-entropy, the optimiser's product into a work buffer, the training accuracy's
count added in place, and the first layer's products with a sparse (CSR) input."""

from __future__ import annotations

from .._backend import is_sparse, is_writeable, sparse_transpose
from . import _common as C
from . import reference as R


def relu_forward_inplace(x, xp):
    return x.relu_() if is_writeable(x) else R.relu(x, xp=xp)


def relu_backward_inplace(dy, y, xp):
    return dy.mul_(y > 0) if is_writeable(dy) else R.relu_backward_inplace(dy, y, xp)


def tanh_forward_inplace(x, xp):
    return x.tanh_() if is_writeable(x) else R.tanh(x, xp=xp)


def dense_sgd_update(x, dy, W, b, lr, l2, xp):
    """The product accumulates into ``W`` (``addmm_``, ``beta = 1 - lr * l2``,
    ``alpha = -lr``) when inputs, gradients and weights share a dtype and ``W`` is not
    tracked by autograd, and all are two-dimensional (``addmm_`` does not batch: an
    ensemble's stacked weights take the reference path). A sparse CSR ``x`` enters as its
    transpose, a CSC view: torch's sparse-times-dense product accumulates into ``W`` alike."""
    if (W.ndim == 2 and x.ndim == 2 and is_writeable(W) and not W.requires_grad
            and x.dtype == dy.dtype == W.dtype):
        W.addmm_(sparse_transpose(x) if is_sparse(x) else x.T, dy, beta=1.0 - lr * l2, alpha=-lr)
        if b is not None:
            b = R.sgd_apply(b, R.bias_grad(dy, xp), lr, 0.0, xp)
        return W, b
    if is_sparse(x):
        return C.dense_sgd_update(x, dy, W, b, lr, l2, xp)
    return R.dense_sgd_update(x, dy, W, b, lr, l2, xp)


def add_argmax_hits(total, scores, labels, xp):
    """``argmax``, the comparison and its count added in place by torch's own methods
    (their dtypes match the reference's: int64 labels and count), without the cast and
    the wrapped ``sum`` of the reference."""
    if is_writeable(total) and total.dtype == labels.dtype == xp.int64 and scores.ndim == 2:
        return total.add_((scores.argmax(dim=1) == labels).sum())
    return R.add_argmax_hits(total, scores, labels, xp)


OVERRIDES = {
    **C.SPARSE_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    "add_argmax_hits": add_argmax_hits,
    **C.OPTIMIZER_OVERRIDES,
    "relu_forward_inplace": relu_forward_inplace,
    "relu_backward_inplace": relu_backward_inplace,
    "tanh_forward_inplace": tanh_forward_inplace,
    "dense_sgd_update": dense_sgd_update,
}
