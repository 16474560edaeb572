"""The compiled loops behind :mod:`arraymlp.kernels._jit` (imported only where Numba is).

Each loop does in one pass over memory what NumPy does in two or more. The ReLU kernels
round as the NumPy code they replace, bit for bit. The cross-entropy kernel differs
from NumPy's where ``exp`` and ``log`` do by an ulp, and adds each row's exponentials
in float64 (NumPy adds float32 rows pairwise in float32): as accurate for short rows,
more accurate for long ones. Arrays come C-contiguous
and of one floating dtype (the caller checks); indices are not bounds-checked, so the
cross-entropy kernel tests each label itself.
"""

from __future__ import annotations

import math

import numba


@numba.njit(cache=True, nogil=True)
def bias_relu(h, b):  # pragma: no cover - compiled
    """``h = maximum(h + b, 0)`` in place; ``h`` (n, m), ``b`` (m,). NaN stays NaN and
    ``-0.0`` becomes ``+0.0``, as NumPy's ``maximum(h + b, 0)`` gives."""
    n, m = h.shape
    zero = h.dtype.type(0)
    for i in range(n):
        for j in range(m):
            v = h[i, j] + b[j]
            h[i, j] = v if (v > zero or v != v) else zero


@numba.njit(cache=True, nogil=True)
def relu_backward(dy, y):  # pragma: no cover - compiled
    """``dy *= (y > 0)`` in place, as a product: ``inf * 0`` is NaN, ``-x * 0`` is ``-0.0``."""
    n, m = dy.shape
    one = dy.dtype.type(1)
    zero = dy.dtype.type(0)
    for i in range(n):
        for j in range(m):
            dy[i, j] = dy[i, j] * (one if y[i, j] > zero else zero)


@numba.njit(cache=True, nogil=True)
def cross_entropy_labels(x, labels, g, scale, hits):  # pragma: no cover - compiled
    """Softmax cross-entropy of logits ``x`` (n, k) against labels (n,).

    Writes ``g = (softmax(x) - onehot) * scale`` and returns ``(ok, total)``: ``total``
    is the sum over rows of ``log(sum(exp(z))) - z[y]`` with ``z = x - max(x)``,
    added in float64; ``ok`` is False (and ``g`` unfinished, ``hits`` untouched) when
    a label lies outside ``[0, k)``. ``hits[0] +=`` the rows whose arg-max is their
    label, found by the same scan as the row maximum (the arg-max as NumPy's: the first
    highest entry, or the first NaN): the training accuracy's count, at no extra pass.
    """
    n, k = x.shape
    total = 0.0
    right = 0
    for i in range(n):
        c = labels[i]
        if c < 0 or c >= k:
            return False, 0.0
        m = x[i, 0]
        best = 0
        nan = m != m
        for j in range(1, k):
            v = x[i, j]
            if v > m or v != v:
                if not nan:
                    best = j
                    nan = v != v
                m = v
        if best == c:
            right += 1
        s = 0.0  # float64: k terms added one by one, where NumPy adds pairwise
        for j in range(k):
            e = math.exp(x[i, j] - m)
            g[i, j] = e
            s += e
        total += math.log(s) - (x[i, c] - m)
        for j in range(k):
            g[i, j] = g[i, j] / s  # rounded once, from float64
        g[i, c] -= 1
        for j in range(k):
            g[i, j] = g[i, j] * scale
    hits[0] += right
    return True, total


@numba.njit(cache=True, nogil=True)
def add_argmax_hits(total, x, labels):  # pragma: no cover - compiled
    """``total[0] += `` the number of rows ``i`` of ``x`` (n, k) whose arg-max is
    ``labels[i]``; the arg-max as NumPy's: the first highest entry, or the first NaN."""
    n, k = x.shape
    hits = 0
    for i in range(n):
        best = 0
        m = x[i, 0]
        if m == m:
            for j in range(1, k):
                v = x[i, j]
                if v != v:
                    best = j
                    break
                if v > m:
                    m = v
                    best = j
        if best == labels[i]:
            hits += 1
    total[0] += hits


# error_model="numpy": a division by zero gives IEEE's infinity or NaN, as NumPy's does,
# instead of a check that raises; without the check the loop vectorises (about 4x)
@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam(p, g, m, v, vmax, h, coupled, decoupled, amsgrad):  # pragma: no cover - compiled
    """Adam's step in one pass, in place: ``p``, ``g``, ``m``, ``v`` and ``vmax`` (read only
    with ``amsgrad``) of shape (K, N), one row per member (K = 1 for a plain parameter);
    ``h`` (9, K) the members' constants in the arrays' dtype: ``b1``, ``1 - b1``, ``b2``,
    ``1 - b2``, ``sqrt(1 - b2**t)``, ``eps``, ``lr / (1 - b1**t)``, ``wd`` and ``1 - lr wd``.

    Each element takes the operations of the NumPy path (``_common.adam_update``) in its
    order and dtype, so that the values are the same bit for bit: ``g' = g + p wd``
    (coupled) or ``p = p (1 - lr wd)`` (decoupled), ``m = m b1 + g' (1 - b1)``,
    ``v = v b2 + (g' g') (1 - b2)``, ``vmax = maximum(vmax, v)`` (NaN if either is),
    ``p = p - (m / (sqrt(vmax or v) / sqrt(1 - b2**t) + eps)) step``."""
    k, n = p.shape
    for r in range(k):
        b1, omb1, b2, omb2, bc2, eps, step, wd, decay = (h[0, r], h[1, r], h[2, r], h[3, r], h[4, r], h[5, r],
                                                         h[6, r], h[7, r], h[8, r])
        for i in range(n):
            pi = p[r, i]
            gi = g[r, i]
            if decoupled:
                pi = pi * decay
            elif coupled:
                gi = gi + pi * wd
            mi = m[r, i] * b1 + gi * omb1
            vi = v[r, i] * b2 + (gi * gi) * omb2
            m[r, i] = mi
            v[r, i] = vi
            if amsgrad:
                top = vmax[r, i]
                if vi > top or vi != vi:
                    top = vi
                vmax[r, i] = top
                vi = top
            p[r, i] = pi - (mi / (math.sqrt(vi) / bc2 + eps)) * step


# Adam in two passes around a square root the caller takes (torch's, whose rounding
# differs from IEEE's correctly rounded one in places): the operations and order of
# :func:`adam`, with ``w = sqrt(v or vmax)`` read from the caller's array.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam_moments(p, g, m, v, vmax, h, coupled, decoupled, amsgrad):  # pragma: no cover - compiled
    """The first pass of :func:`adam`: ``p``'s decoupled decay, ``m``, ``v`` and ``vmax``."""
    k, n = p.shape
    for r in range(k):
        b1, omb1, b2, omb2, wd, decay = h[0, r], h[1, r], h[2, r], h[3, r], h[7, r], h[8, r]
        for i in range(n):
            gi = g[r, i]
            if decoupled:
                p[r, i] = p[r, i] * decay
            elif coupled:
                gi = gi + p[r, i] * wd
            m[r, i] = m[r, i] * b1 + gi * omb1
            vi = v[r, i] * b2 + (gi * gi) * omb2
            v[r, i] = vi
            if amsgrad:
                top = vmax[r, i]
                if vi > top or vi != vi:
                    top = vi
                vmax[r, i] = top


@numba.njit(cache=True, nogil=True, error_model="numpy")
def adam_apply(p, m, w, h):  # pragma: no cover - compiled
    """The second pass of :func:`adam`: ``p = p - (m / (w / sqrt(1 - b2**t) + eps)) step``,
    ``w`` holding ``sqrt(v or vmax)``."""
    k, n = p.shape
    for r in range(k):
        bc2, eps, step = h[4, r], h[5, r], h[6, r]
        for i in range(n):
            p[r, i] = p[r, i] - (m[r, i] / (w[r, i] / bc2 + eps)) * step
