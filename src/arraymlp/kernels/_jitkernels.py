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


@numba.njit(cache=True, nogil=True)
def member_adam(p, g, m, v, b1, b2, step, eps):  # pragma: no cover - compiled
    """Adam's step of stacked members in one pass: ``p``, ``g``, ``m``, ``v`` (K, N); the
    per-member ``b1``, ``b2``, ``step``, ``eps`` (K,) in the arrays' dtype. The arithmetic is
    the reference's, in the arrays' dtype, one element at a time (the loop vectorises)."""
    k, n = p.shape
    one = p.dtype.type(1)
    for r in range(k):
        a1, a2, s, e = b1[r], b2[r], step[r], eps[r]
        c2 = one - a2
        for i in range(n):
            gi = g[r, i]
            vi = v[r, i] * a2 + (gi * gi) * c2
            mi = (m[r, i] - gi) * a1 + gi
            v[r, i] = vi
            m[r, i] = mi
            p[r, i] = p[r, i] - (one / (math.sqrt(vi) + e)) * mi * s
