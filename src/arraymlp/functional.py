"""Pure kernels: each forward beside its backward, over plain arrays.

Every function takes the array namespace as the keyword ``xp`` (resolved once per
public call by the caller; :func:`arraymlp._backend.get_namespace` when omitted), uses
only functions of the Array API standard, and never mutates its inputs. In-place
updates are made only on temporaries a kernel created itself, and only where the
namespace allows them. The one exception says so in its name: :func:`dense_sgd_update`
updates the parameters it is given, as an optimiser's step does.

The activation table :data:`ACTIVATIONS` holds one row per activation: its forward,
its backward, and whether the backward reads the activation's input or its output
(whichever is cheaper), so that forward and derivative cannot drift apart.

This module is public: people running their own training loops on their own arrays
may call these functions directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from array_api_compat import device as _device
from array_api_compat import (
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    to_device,
)

from . import _blas, _jit
from ._backend import get_namespace, is_float16, is_writeable, row_sums_finite

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_backward",
    "activation_forward",
    "dense_backward",
    "dense_forward",
    "dense_sgd_update",
    "dropout_backward",
    "dropout_forward",
    "elu",
    "gelu",
    "get_activation",
    "identity",
    "layer_norm_backward",
    "layer_norm_forward",
    "leaky_relu",
    "log_softmax",
    "logsumexp",
    "relu",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "tanh",
]

LEAKY_SLOPE = 0.01
ELU_ALPHA = 1.0
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _ns(x, xp):
    return xp if xp is not None else get_namespace(x)


_FAST_KIND: dict[Any, str | None] = {}


def _fast_kind(xp) -> str | None:
    """``"numpy"``, ``"cupy"``, ``"torch"`` or ``None``: which backend-specific fast
    path, if any, the in-place kernels may take on namespace ``xp`` (memoised, so the
    check costs one dictionary lookup per call)."""
    try:
        return _FAST_KIND[xp]
    except KeyError:
        pass
    kind = None
    if is_numpy_namespace(xp):
        kind = "numpy"
    elif is_cupy_namespace(xp):
        kind = "cupy"
    elif is_torch_namespace(xp):
        kind = "torch"
    _FAST_KIND[xp] = kind
    return kind


# ----------------------------------------------------------------------------- dense
def _memo(cache: dict, key, make: Callable[[], Any], limit: int = 32):
    """``cache[key]``, made by ``make()`` on a miss; the cache is emptied when it holds
    ``limit`` entries, and an unhashable key is not cached. For the small values the
    hot path would otherwise rebuild every step (rows of constants, row indices, dtype
    answers); what it returns is only ever read."""
    try:
        return cache[key]
    except KeyError:
        pass
    except TypeError:
        return make()
    if len(cache) >= limit:
        cache.clear()
    out = cache[key] = make()
    return out


_CONST_ROWS: dict[Any, Any] = {}


def _const_row(value, n, dtype, xp):
    """A row of ``n`` copies of ``value`` (0 or 1), made once per (namespace, value,
    length, dtype): ReLU's zeros, the ones of the bias gradient. For the NumPy paths
    only: the key holds no device."""
    return _memo(_CONST_ROWS, (xp, value, n, dtype), lambda: (xp.ones if value else xp.zeros)((n,), dtype=dtype))


def _all_finite(a, xp, rows: int = 8192) -> bool:
    """Whether every entry of ``a`` is finite.

    On NumPy, for float32/float64 arrays of one or two axes, the rows are first summed
    by BLAS (``a @ ones``): a NaN or infinite entry makes its row's sum NaN or infinite
    (IEEE arithmetic propagates both through ``* 1`` and ``+``), so finite sums prove
    the array finite, at the cost of one multithreaded read with no mask (4096 x 784
    float32: 0.23 ms against 0.69 ms for ``all(isfinite(a))`` on 2 cores). Sums that
    overflowed, or came from a non-finite entry, fall through to the exact test.

    The exact test builds the boolean mask of ``rows`` rows at a time, not of the whole
    array: when ``fit`` checks a data set, it does not cost another copy of its size.
    """
    if _fast_kind(xp) == "numpy" and a.dtype in _BLAS_DTYPES and a.ndim in (1, 2) and a.shape[-1]:
        if row_sums_finite(a, _const_row(1, a.shape[-1], a.dtype, xp)):
            return True
    n = a.shape[0] if a.ndim else 0
    if n <= rows:
        return bool(xp.all(xp.isfinite(a)))
    # slice ends within the axis: the standard leaves ends past it unspecified
    return all(bool(xp.all(xp.isfinite(a[i:min(i + rows, n), ...]))) for i in range(0, n, rows))


def _bias_grad(dy, xp):
    """``sum(dy, axis=0)``. On NumPy, for float32/float64, as ``ones @ dy``: BLAS's
    matrix-vector product reads ``dy`` at 2-5x the speed of NumPy's reduction over the
    first axis (4096 x 64: 18 us against 91 us; 256 x 512: 7 against 20 us). Both add
    the rows one after another, in different orders."""
    kind = _fast_kind(xp)
    if kind == "numpy" and len(dy.shape) == 2 and dy.dtype in _BLAS_DTYPES:
        return _const_row(1, dy.shape[0], dy.dtype, xp) @ dy
    if kind in ("numpy", "cupy"):
        return dy.sum(axis=0)  # the method skips NumPy's Python-level reduction wrapper
    return xp.sum(dy, axis=0)


# Below this many weights the ctypes call costs more (~10 us) than the pass it saves:
# measured on 2 cores, 64 x 64 weights took 19 us by BLAS and 12 us by the standard
# path, 128 x 128 weights 31 us and 39 us.
_BLAS_ACC_MIN = 16384
_BLAS_DTYPES = ("float32", "float64")


def dense_forward(x, W, b=None, *, xp=None):
    """Affine map ``y = x @ W + b``.

    Parameters
    ----------
    x : array, shape (n, n_in)
    W : array, shape (n_in, n_out)
    b : array, shape (n_out,), optional
        Omitted for a layer without bias.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape (n, n_out)
    """
    xp = _ns(x, xp)
    y = x @ W
    return y if b is None else _add_bias(y, b)


def _dense_relu_forward(x, W, b, xp):
    """``maximum(x @ W + b, 0)`` for a dense layer followed by ReLU, the bias and the
    ReLU in one compiled pass over the product (:func:`arraymlp._jit.bias_relu`), or
    None (nothing computed) where that does not apply: not NumPy, no bias, no kernels.
    The result is the one :func:`dense_forward` then ReLU give, bit for bit."""
    if b is None or _fast_kind(xp) != "numpy" or _jit.kernels() is None:
        return None
    y = x @ W
    if _jit.bias_relu(y, b):
        return y
    return _relu_fw_inplace(_add_bias(y, b), xp)  # another dtype or layout


def _add_bias(y, b):
    if is_writeable(y):
        y += b
        return y
    return y + b


def dense_backward(x, W, dy, *, has_bias=True, need_dx=True, xp=None):
    """Gradients of ``y = x @ W + b``.

    ``dW = x.T @ dy``; ``db = sum(dy, axis=0)``, the bias gradient summed over the
    batch (the mean over the batch belongs to the loss); ``dx = dy @ W.T``.

    Parameters
    ----------
    x : array, shape (n, n_in)
        The layer's input, as given to :func:`dense_forward`.
    W : array, shape (n_in, n_out)
    dy : array, shape (n, n_out)
        Gradient of the loss with respect to the layer's output ``y``.
    has_bias : bool, default True
        Whether to compute ``db``.
    need_dx : bool, default True
        Whether to compute ``dx``; false for the first layer of a network, whose input
        gradient nobody needs.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    dx : array of shape (n, n_in), or None when ``need_dx`` is false
    dW : array, shape (n_in, n_out)
    db : array of shape (n_out,), or None when ``has_bias`` is false
    """
    xp = _ns(dy, xp)
    dW = x.T @ dy
    db = _bias_grad(dy, xp) if has_bias else None
    dx = dy @ W.T if need_dx else None
    return dx, dW, db


def dense_sgd_update(x, dy, W, b=None, *, lr, l2=0.0, xp=None):
    """One plain SGD step of a dense layer, straight from its input and output gradient.

    ``W <- W - lr * (x.T @ dy + l2 * W)`` and ``b <- b - lr * sum(dy, axis=0)``: the
    update :class:`arraymlp.SGD` (no momentum, no weight decay, no clipping) makes with
    the gradients of :func:`dense_backward`, without a weight gradient in between. On
    NumPy (with the BLAS its wheels bundle) and on torch the product accumulates into
    ``W`` in one BLAS call (``beta = 1 - lr * l2``, ``alpha = -lr``), so the step costs
    no pass over a temporary the size of ``W``; elsewhere the standard path computes
    the gradient and subtracts it, with the optimiser's rounding.

    Compute the input gradient ``dy @ W.T`` *before* this call: it needs the old ``W``.

    Parameters
    ----------
    x : array, shape (n, n_in)
        The layer's input.
    dy : array, shape (n, n_out)
        Gradient of the loss with respect to the layer's output.
    W : array, shape (n_in, n_out)
    b : array, shape (n_out,), optional
    lr : float
        Learning rate.
    l2 : float
        L2 coefficient on ``W`` (the gradient of ``l2/2 * sum(W**2)``).
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted.

    Returns
    -------
    W : array, shape (n_in, n_out)
    b : array of shape (n_out,), or None
        The arrays given, updated in place where the namespace allows it; new arrays
        otherwise. ``x`` and ``dy`` are not modified.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.functional import dense_sgd_update
    >>> W, b = np.ones((2, 1)), np.zeros(1)
    >>> x, dy = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.5], [1.0]])
    >>> W, b = dense_sgd_update(x, dy, W, b, lr=0.5)
    >>> W.ravel().tolist(), b.tolist()  # W - 0.5 * x.T @ dy, b - 0.5 * sum(dy, axis=0)
    ([-0.75, -1.5], [-0.75])
    """
    xp = _ns(dy, xp)
    kind = _fast_kind(xp)
    decay = 1.0 - lr * l2
    if kind == "numpy" and math.prod(W.shape) >= _BLAS_ACC_MIN and _blas.gemm_acc(W, x, dy, -lr, decay):
        pass
    elif kind == "torch" and is_writeable(W) and not W.requires_grad and x.dtype == dy.dtype == W.dtype:
        W.addmm_(x.T, dy, beta=decay, alpha=-lr)
    else:
        W = _sgd_apply(W, x.T @ dy, lr, l2, xp)
    if b is not None:
        b = _sgd_apply(b, _bias_grad(dy, xp), lr, 0.0, xp)
    return W, b


def _sgd_apply(p, g, lr, l2, xp, owned=True):
    """``p + (-lr) * (g + l2 * p)`` with the rounding of :class:`arraymlp.SGD`'s step,
    ``p`` updated in place where allowed. ``owned``: ``g`` is a fresh array of the
    caller's, which may be overwritten (otherwise it is left as it is)."""
    if l2:
        if owned and is_writeable(g):
            g += l2 * p
        else:
            g, owned = g + l2 * p, True
    if is_writeable(p):
        if owned and is_writeable(g):
            g *= -lr
            p += g
        else:
            p += (-lr) * g
        return p
    return p + (-lr) * g


# ------------------------------------------------------------------------ activations
def identity(x, *, xp=None):
    """Identity, ``y = x``.

    Parameters
    ----------
    x : array, any shape
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        ``x`` itself (no copy).
    """
    return x


def relu(x, *, xp=None):
    """Rectified linear unit, ``y = max(x, 0)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.maximum(x, 0.0)


def leaky_relu(x, *, xp=None):
    """Leaky ReLU, ``y = x`` where ``x > 0``, else ``0.01 x``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.where(x > 0, x, x * LEAKY_SLOPE)


def elu(x, *, xp=None):
    """Exponential linear unit, ``y = x`` where ``x > 0``, else ``alpha (exp(x) - 1)``
    with ``alpha = 1``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.where(x > 0, x, ELU_ALPHA * xp.expm1(xp.minimum(x, 0.0)))


def gelu(x, *, xp=None):
    """Gaussian error linear unit, tanh form:
    ``y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (the standard has no ``erf``).

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    t = xp.tanh(_GELU_C * (x + _GELU_K * x * x * x))
    return 0.5 * x * (1.0 + t)


def sigmoid(x, *, xp=None):
    """Logistic function ``y = 1 / (1 + exp(-x))``.

    Stable for any ``x``: only ``exp(-|x|)`` is computed, so nothing overflows.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    e = xp.exp(-xp.abs(x))
    r = 1.0 / (1.0 + e)
    return xp.where(x >= 0, r, e * r)


def silu(x, *, xp=None):
    """Sigmoid linear unit (swish), ``y = x * sigmoid(x)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return x * sigmoid(x, xp=xp)


def tanh(x, *, xp=None):
    """Hyperbolic tangent, ``y = tanh(x)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.tanh(x)


def softplus(x, *, xp=None):
    """Softplus, ``y = log(1 + exp(x))``.

    Computed as ``max(x, 0) + log1p(exp(-|x|))``, which never overflows.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def logsumexp(x, *, axis=-1, keepdims=True, xp=None):
    """``log(sum(exp(x), axis))``, shifted by the maximum so that it never overflows.

    Parameters
    ----------
    x : array, any shape
    axis : int, default -1
        Axis to reduce.
    keepdims : bool, default True
        Keep the reduced axis with length 1.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    array
        Shape of ``x`` with ``axis`` of length 1 (``keepdims``) or removed.
    """
    xp = _ns(x, xp)
    m = xp.max(x, axis=axis, keepdims=True)
    # a row that is all -inf (or holds +inf) is not shifted: -inf - -inf would be NaN
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = m + xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else xp.squeeze(out, axis=axis)


def _row_reduce(x, op, xp):
    """``xp.max`` or ``xp.sum`` of ``x`` over its last axis, ``keepdims=True``.

    NumPy reduces a short last axis row by row, at ~40 ns a row: for 4096 rows of 10
    logits that is 195 us for the maximum and 85 us for the sum. On NumPy, for rows of
    at most 16 columns, the rows are reduced from a transposed copy instead, column by
    column: 26 and 24 us there. That pays from 32 rows for the maximum (1.3 against
    2.2 us) and from 64 for the sum (1.3 against 1.6 us), whose rounding order then
    differs from the row-wise one.
    """
    kind = _fast_kind(xp)
    if (kind == "numpy" and len(x.shape) == 2 and x.shape[1] <= 16
            and x.shape[0] >= (32 if op == "max" else 64)):
        t = x.T.copy()
        r = t.max(axis=0) if op == "max" else t.sum(axis=0)
        return r.reshape(x.shape[0], 1)
    if kind in ("numpy", "cupy"):  # by method: no Python-level wrapper
        return x.max(axis=-1, keepdims=True) if op == "max" else x.sum(axis=-1, keepdims=True)
    if op == "max":
        return xp.max(x, axis=-1, keepdims=True)
    return xp.sum(x, axis=-1, keepdims=True)


def softmax(x, *, xp=None):
    """Softmax over the last axis, ``y_ij = exp(x_ij) / sum_k exp(x_ik)``.

    Shifted by the row maximum, so it is finite for any finite logits.

    Parameters
    ----------
    x : array, shape (..., k)
        Logits.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Non-negative, each row summing to 1.
    """
    xp = _ns(x, xp)
    e = xp.exp(x - _row_reduce(x, "max", xp))
    s = _row_reduce(e, "sum", xp)
    if is_writeable(e):
        e /= s
        return e
    return e / s


def log_softmax(x, *, xp=None):
    """Log-softmax over the last axis, ``y = x - logsumexp(x)``.

    Computed as ``z - log(sum(exp(z)))`` with ``z = x - max(x)``, so that the result
    keeps full precision however large the logits (``x - logsumexp(x)`` would round
    ``logsumexp`` to the spacing of ``max(x)`` first).

    Parameters
    ----------
    x : array, shape (..., k)
        Logits.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape of ``x``
        Log-probabilities, ``<= 0``.
    """
    xp = _ns(x, xp)
    z = x - xp.max(x, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


# Backward rules, each ``(dy, saved) -> dx`` where ``saved`` is the input or the output
# as the table row says.
def _relu_bw(dy, y, xp):
    return xp.where(y > 0, dy, xp.zeros_like(dy))


def _leaky_bw(dy, y, xp):
    return xp.where(y > 0, dy, dy * LEAKY_SLOPE)


def _elu_bw(dy, x, xp):
    return xp.where(x > 0, dy, dy * (ELU_ALPHA * xp.exp(xp.minimum(x, 0.0))))


def _gelu_bw(dy, x, xp):
    if is_float16(x.dtype, xp):  # x * x overflows float16 from |x| = 256 on
        return xp.astype(_gelu_bw(xp.astype(dy, xp.float32), xp.astype(x, xp.float32), xp), x.dtype)
    x2 = x * x
    t = xp.tanh(_GELU_C * (x + _GELU_K * x2 * x))
    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3.0 * _GELU_K * x2))
    return dy * d


def _sigmoid_bw(dy, y, xp):
    return dy * (y * (1.0 - y))


def _silu_bw(dy, x, xp):
    s = sigmoid(x, xp=xp)
    return dy * (s * (1.0 + x * (1.0 - s)))


def _tanh_bw(dy, y, xp):
    return dy * (1.0 - y * y)


def _softplus_bw(dy, x, xp):
    return dy * sigmoid(x, xp=xp)


def _softmax_bw(dy, y, xp):
    # Jacobian-vector product of softmax: dx = y * (dy - sum(dy * y))
    return y * (dy - xp.sum(dy * y, axis=-1, keepdims=True))


def _log_softmax_bw(dy, y, xp):
    # y = log softmax(x); dx = dy - softmax(x) * sum(dy)
    return dy - xp.exp(y) * xp.sum(dy, axis=-1, keepdims=True)


def _identity_bw(dy, y, xp):
    return dy


# In-place variants, for arrays the caller hands over (``inplace=True``: a temporary no
# one else holds or reads again). Each may overwrite its first argument and returns the
# result, which is that argument when it could be overwritten. The standard path uses
# the standard's in-place operators on writeable arrays and the functional form
# otherwise; NumPy and CuPy (ufuncs with ``out=``) and torch (``*_`` methods) have fast
# paths behind a check of the namespace. ``fast=False`` forces the standard path; the
# tests hold every fast path to the standard one on every backend row.
def _identity_fw_inplace(x, xp, fast=True):
    return x




def _relu_fw_inplace(x, xp, fast=True):
    kind = _fast_kind(xp) if fast else None
    if kind == "numpy" and is_writeable(x):
        # a broadcast row of zeros runs NumPy's contiguous SIMD loop; a scalar does not
        return xp.maximum(x, _const_row(0, x.shape[-1], x.dtype, xp), out=x)
    if kind == "cupy":
        return xp.maximum(x, 0, out=x)
    if kind == "torch":
        return x.relu_()
    return relu(x, xp=xp)


def _relu_bw_inplace(dy, y, xp, fast=True):
    # dx = dy * [y > 0], one boolean mask and no select: ``where`` branches on every
    # element and a random mask defeats the branch predictor (NumPy: ~20x slower)
    kind = _fast_kind(xp) if fast else None
    if kind == "numpy" and _jit.relu_backward(dy, y):  # (it checks that dy is writeable)
        return dy  # one compiled pass, where Numba is installed
    if kind in ("numpy", "cupy") and is_writeable(dy):
        return xp.multiply(dy, y > 0, out=dy)
    if kind == "torch":
        return dy.mul_(y > 0)
    if is_writeable(dy):
        dy *= xp.astype(y > 0, dy.dtype)
        return dy
    return _relu_bw(dy, y, xp)


def _tanh_fw_inplace(x, xp, fast=True):
    kind = _fast_kind(xp) if fast else None
    if kind in ("numpy", "cupy") and is_writeable(x):
        return xp.tanh(x, out=x)
    if kind == "torch":
        return x.tanh_()
    return tanh(x, xp=xp)


def _tanh_bw_inplace(dy, y, xp, fast=True):
    # dx = dy * (1 - y^2), with the factor built in one temporary
    if is_writeable(dy):
        d = y * y
        # out= needs an array: y * y of a 0-d NumPy array is a scalar
        d = xp.subtract(1.0, d, out=d) if (fast and _fast_kind(xp) in ("numpy", "cupy")
                                          and is_writeable(d)) else 1.0 - d
        dy *= d
        return dy
    return _tanh_bw(dy, y, xp)


def _sigmoid_bw_inplace(dy, y, xp, fast=True):
    # dx = dy * (y (1 - y)), the factor built in one temporary
    if is_writeable(dy):
        d = 1.0 - y
        d *= y
        dy *= d
        return dy
    return _sigmoid_bw(dy, y, xp)


@dataclasses.dataclass(frozen=True)
class Activation:
    """One row of the activation table.

    Attributes
    ----------
    name : str
    forward : callable ``(x, *, xp) -> y``, same shape as ``x``
    backward : callable ``(dy, saved, xp) -> dx``
    saves : ``"input"`` or ``"output"``: which array ``backward`` reads
    elementwise : bool, false for softmax and log_softmax (rows couple)
    forward_inplace : callable ``(x, xp) -> y`` or None
        Same values as ``forward``, computed into ``x`` where it can be overwritten
        (used when the caller hands ``x`` over). Only rows that save their output
        have one: the others need their input intact for the backward pass.
    backward_inplace : callable ``(dy, saved, xp) -> dx`` or None
        Same values as ``backward``, computed into ``dy`` where it can be overwritten.
    """

    name: str
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    saves: str
    elementwise: bool = True
    forward_inplace: Callable[..., Any] | None = None
    backward_inplace: Callable[..., Any] | None = None

    def __post_init__(self):
        if self.forward_inplace is not None and self.saves != "output":
            msg = f"activation {self.name!r}: an in-place forward overwrites the input its backward reads"
            raise ValueError(msg)


#: The activation table: name to :class:`Activation` row.
#:
#: :meta hide-value:
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", identity, _identity_bw, "output", True, _identity_fw_inplace, _identity_bw),
        Activation("relu", relu, _relu_bw, "output", True, _relu_fw_inplace, _relu_bw_inplace),
        Activation("leaky_relu", leaky_relu, _leaky_bw, "output"),
        Activation("elu", elu, _elu_bw, "input"),
        Activation("gelu", gelu, _gelu_bw, "input"),
        Activation("silu", silu, _silu_bw, "input"),
        Activation("tanh", tanh, _tanh_bw, "output", True, _tanh_fw_inplace, _tanh_bw_inplace),
        Activation("sigmoid", sigmoid, _sigmoid_bw, "output", True, None, _sigmoid_bw_inplace),
        Activation("softplus", softplus, _softplus_bw, "input"),
        Activation("softmax", softmax, _softmax_bw, "output", elementwise=False),
        Activation("log_softmax", log_softmax, _log_softmax_bw, "output", elementwise=False),
    )
}


def get_activation(name: str | Activation) -> Activation:
    """Look up a row of :data:`ACTIVATIONS`.

    Parameters
    ----------
    name : str, Activation or None
        A key of :data:`ACTIVATIONS`; an :class:`Activation` is returned as is, and
        ``None`` means ``"identity"``.

    Returns
    -------
    Activation

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    if isinstance(name, Activation):
        return name
    if name is None:
        return ACTIVATIONS["identity"]
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        msg = f"unknown activation {name!r}; known activations: {', '.join(ACTIVATIONS)}"
        raise ValueError(msg) from None


def activation_forward(name, x, *, xp=None, inplace=False):
    """Apply activation ``name`` to ``x``, keeping what the backward pass needs.

    Parameters
    ----------
    name : str or Activation
        A key of :data:`ACTIVATIONS` (or a row of it).
    x : array, shape (n, d)
        Any shape for the elementwise activations; softmax and log_softmax act on the
        last axis.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).
    inplace : bool, default False
        Hand ``x`` over (a temporary nothing else holds or reads again): activations
        that save their output then compute ``y`` into ``x`` where the namespace allows
        it, saving an allocation. With ``False``, ``x`` is never modified.

    Returns
    -------
    y : array, shape of ``x``
    saved : array, shape of ``x``
        What :func:`activation_backward` needs: ``x`` or ``y``, whichever the table row
        says its derivative is cheaper from.
    """
    xp = _ns(x, xp)
    act = get_activation(name)
    if inplace and act.forward_inplace is not None:
        y = act.forward_inplace(x, xp)
    else:
        y = act.forward(x, xp=xp)
    return y, (y if act.saves == "output" else x)


def activation_backward(name, saved, dy, *, xp=None, inplace=False):
    """Gradient through activation ``name``: ``dx = dy * f'(x)`` for the elementwise
    activations, the Jacobian-vector product for softmax and log_softmax.

    Parameters
    ----------
    name : str or Activation
        A key of :data:`ACTIVATIONS` (or a row of it).
    saved : array, shape (n, d)
        The ``saved`` array :func:`activation_forward` returned (the activation's input
        or output).
    dy : array, shape of ``saved``
        Gradient of the loss with respect to the activation's output.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).
    inplace : bool, default False
        Hand ``dy`` over; ``dx`` is then computed into it where possible. With
        ``False``, ``dy`` is never modified.

    Returns
    -------
    dx : array, shape of ``dy``
        Gradient with respect to the activation's input.
    """
    xp = _ns(dy, xp)
    act = get_activation(name)
    if inplace and act.backward_inplace is not None:
        return act.backward_inplace(dy, saved, xp)
    return act.backward(dy, saved, xp)


# ---------------------------------------------------------------------------- dropout
def dropout_forward(x, p, *, rng, training=True, xp=None):
    """Inverted dropout: zero each entry with probability ``p`` and scale the rest by
    ``1 / (1 - p)``, so that inference needs no rescaling.

    Parameters
    ----------
    x : array, shape (n, d)
    p : float in [0, 1)
        Probability of dropping an entry.
    rng : arraymlp.Generator
        The model's generator (or one of your own); masks are drawn on ``x``'s device.
    training : bool, default True
        With ``False`` (or ``p == 0``) nothing is dropped and ``x`` is returned as is.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape (n, d)
    mask : array of shape (n, d), or None
        The scale applied to each entry (0 or ``1/(1-p)``), for
        :func:`dropout_backward`; ``None`` when nothing was dropped.
    """
    xp = _ns(x, xp)
    if not training or p == 0.0:
        return x, None
    u = rng.random(tuple(x.shape), x.dtype)
    if _device(u) != _device(x):  # a generator made for another (e.g. the default) device
        u = to_device(u, _device(x))
    mask = xp.where(u >= p, xp.asarray(1.0 / (1.0 - p), dtype=x.dtype, device=x.device),
                    xp.asarray(0.0, dtype=x.dtype, device=x.device))
    return x * mask, mask


def dropout_backward(mask, dy, *, xp=None):
    """Gradient through :func:`dropout_forward`, ``dx = dy * mask``.

    Parameters
    ----------
    mask : array of shape (n, d), or None
        The mask :func:`dropout_forward` returned; ``None`` (nothing was dropped) passes
        ``dy`` through.
    dy : array, shape (n, d)
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    dx : array, shape (n, d)
    """
    return dy if mask is None else dy * mask


# ---------------------------------------------------------------------- layer norm
def layer_norm_forward(x, gamma, beta, *, eps=1e-5, xp=None):
    """Normalise each row over its features, then scale and shift:
    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``.

    Parameters
    ----------
    x : array, shape (n, d)
    gamma, beta : arrays, shape (d,)
        Scale and shift.
    eps : float, default 1e-5
        Added to the variance.
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    y : array, shape (n, d)
    cache : tuple ``(xhat, rstd)`` with shapes (n, d) and (n, 1)
        What :func:`layer_norm_backward` needs.
    """
    xp = _ns(x, xp)
    if is_float16(x.dtype, xp):  # statistics in float32: squares of 256 overflow float16
        _, (xhat, rstd) = layer_norm_forward(xp.astype(x, xp.float32), gamma, beta, eps=eps, xp=xp)
        xhat, rstd = xp.astype(xhat, x.dtype), xp.astype(rstd, x.dtype)
        return xhat * gamma + beta, (xhat, rstd)
    mu = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = xc * rstd
    return xhat * gamma + beta, (xhat, rstd)


def layer_norm_backward(cache, gamma, dy, *, xp=None):
    """Gradients of :func:`layer_norm_forward`.

    ``dgamma = sum(dy * xhat, 0)``, ``dbeta = sum(dy, 0)`` and, with ``g = dy * gamma``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` (means over the features).

    Parameters
    ----------
    cache : tuple of arrays
        ``(xhat, rstd)`` of shapes (n, d) and (n, 1), as :func:`layer_norm_forward`
        returned it.
    gamma : array, shape (d,)
    dy : array, shape (n, d)
    xp : namespace, optional
        The array namespace; taken from the arrays when omitted (resolve it once per
        call of your own and pass it down).

    Returns
    -------
    dx : array, shape (n, d)
    dgamma, dbeta : arrays, shape (d,)
    """
    xp = _ns(dy, xp)
    xhat, rstd = cache
    dgamma = xp.sum(dy * xhat, axis=0)
    dbeta = xp.sum(dy, axis=0)
    g = dy * gamma
    dx = rstd * (g - xp.mean(g, axis=-1, keepdims=True) - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    return dx, dgamma, dbeta
