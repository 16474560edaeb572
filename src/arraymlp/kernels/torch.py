"""The torch set: torch's in-place methods (``relu_``, ``tanh_``, ``mul_``), ``addmm_``
for the plain SGD step of a dense layer, integer-array indexing for the label
cross-entropy, the optimiser's product into a work buffer, Adam's step on the CPU in
two compiled passes over the tensors' memory around torch's own square root, the
training accuracy's count added in place, and the first layer's products with a sparse
(CSR) input."""

from __future__ import annotations

import math

import torch

from .._backend import is_sparse, is_writeable, sparse_transpose
from . import _common as C
from . import _jit
from . import reference as R
from .numpy import _numbers

_FLOATS = (torch.float32, torch.float64)


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


def _disjoint(ts) -> bool:
    """Whether the tensors are contiguous and no two share memory, from their address
    ranges (faster than NumPy's overlap test of each pair of their views); False
    proves nothing."""
    spans = []
    for t in ts:
        if not t.is_contiguous():
            return False
        start = t.data_ptr()
        spans.append((start, start + t.nbytes))
    spans.sort()
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work=None):
    """CPU tensors outside autograd, with hyper-parameters that are Python numbers, take
    two compiled passes over NumPy views of their memory (``Tensor.numpy()``, no copy)
    around ``torch.sqrt`` into the work buffer (:func:`._jit.adam_around_sqrt`): the
    operations of the work-buffer path in its order and dtype, with torch's own square
    root (which rounds otherwise than NumPy's in places), so that path's values bit for
    bit in three passes instead of a dozen. Elsewhere (another device, a tensor autograd
    tracks, Numba absent or its kernels not loaded yet) the work-buffer path
    (``_common``)."""
    if (work is not None and _jit._kernels is not None and type(p) is torch.Tensor and p.dtype in _FLOATS
            and p.device.type == "cpu" and _numbers(lr, b1, b2, eps, wd) and type(t) is int):
        ts = (p, g, m, v) if vmax is None else (p, g, m, v, vmax)
        if all(type(a) is torch.Tensor and a.device.type == "cpu" and not a.requires_grad for a in ts):
            w = C._buffers(work, 1, p, xp)[0]
            disjoint = _disjoint((*ts, w))
            try:
                arrays = [a.numpy() for a in ts]
                wn = w.numpy()
            except RuntimeError:  # (a tensor with torch's negative or conjugate view bit)
                arrays = None
            if arrays is not None:
                on = wd != 0
                coupled = on and not decoupled
                decay = on and bool(decoupled)
                second = v if vmax is None else vmax
                if _jit.adam_around_sqrt(
                        arrays[0], arrays[1], arrays[2], arrays[3], None if vmax is None else arrays[4], wn,
                        (b1, 1.0 - b1, b2, 1.0 - b2, math.sqrt(1.0 - b2**t), eps, lr / (1.0 - b1**t),
                         wd if coupled else 0.0, 1.0 - lr * wd if decay else 1.0), coupled, decay,
                        lambda: torch.sqrt(second, out=w), disjoint):
                    return p, m, v, vmax
    return C.adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work)


OVERRIDES = {
    **C.SPARSE_OVERRIDES,
    **C.INDEXING_OVERRIDES,
    "add_argmax_hits": add_argmax_hits,
    **C.OPTIMIZER_OVERRIDES,
    "adam_update": adam_update,
    "relu_forward_inplace": relu_forward_inplace,
    "relu_backward_inplace": relu_backward_inplace,
    "tanh_forward_inplace": tanh_forward_inplace,
    "dense_sgd_update": dense_sgd_update,
}
