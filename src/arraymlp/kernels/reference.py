"""The reference kernels: every forward, backward and update of the library, written
only against the Array API standard. This file is the definition of the maths; the
per-backend sets in this package override some of these functions with faster ones
that must give the same values (the tests hold every override to its function here).

Conventions:

- ``xp`` is the array namespace, resolved once per public call by the caller and
  passed down; a kernel never looks it up per operation.
- A kernel never mutates its inputs, except the arguments its name or docstring says
  are handed over (``*_inplace`` kernels, :func:`sgd_apply`, :func:`axpy`,
  :func:`dense_sgd_update`, the optimiser updates ``*_update``).
  Those are updated in place only where the namespace allows it
  (:func:`arraymlp._backend.is_writeable`), and the result is returned either way.
- A composite kernel takes the primitives it is built from as keyword arguments with
  the reference ones as defaults (``dense_backward(..., bias_grad=bias_grad)``), so a
  backend set that speeds up a primitive rebinds the composites with
  :func:`functools.partial` instead of copying them.

The activation table :data:`ACTIVATIONS` holds one row per activation: its forward,
its backward, and whether the backward reads the activation's input or its output
(whichever is cheaper), so that forward and derivative cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from array_api_compat import device as _device
from array_api_compat import is_jax_array as _is_jax_array
from array_api_compat import is_numpy_array as _is_numpy_array
from array_api_compat import to_device

from .._backend import device_of, get_namespace, is_float16, is_writeable, memo
from .._docs import fill

LEAKY_SLOPE = 0.01
ELU_ALPHA = 1.0
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def _ns(x, xp):
    return xp if xp is not None else get_namespace(x)


# ------------------------------------------------------------------------ activations
@fill
def identity(x, *, xp=None):
    """Identity, ``y = x``.

    Parameters
    ----------
    x : array, any shape
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        ``x`` itself (no copy).
    """
    return x


_CONSTANTS: dict = {}


def constant_like(value: float, like, xp):
    """``value`` as a 0-d array of ``like``'s dtype on its device, kept for the next call.

    For ``maximum`` and ``minimum`` against a number: array-api-compat's torch wrappers
    turn a Python number into a tensor with ``torch.asarray``, a copy from the host that
    waits for the GPU at every call. A 0-d array of ``like``'s dtype gives the same
    values (the number would be cast to that dtype). On JAX nothing is kept: ``like`` may
    be traced under ``jax.jit``, and a kept traced value would outlive its trace.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.kernels.reference import constant_like
    >>> c = constant_like(0.5, np.ones(3, dtype=np.float32), np)
    >>> c.shape, c.dtype, float(c)
    ((), dtype('float32'), 0.5)
    """
    if _is_jax_array(like):  # maybe traced under jax.jit: a traced value must not be kept
        return xp.full((), value, dtype=like.dtype)
    device = getattr(like, "device", None)
    return memo(_CONSTANTS, (xp, like.dtype, getattr(device, "id", device), value),
                lambda: xp.full((), value, dtype=like.dtype, device=device_of(like)), limit=64)


@fill
def relu(x, *, xp=None):
    """Rectified linear unit, ``y = max(x, 0)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.maximum(x, constant_like(0.0, x, xp))


@fill
def leaky_relu(x, *, xp=None):
    """Leaky ReLU, ``y = x`` where ``x > 0``, else ``0.01 x``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.where(x > 0, x, x * LEAKY_SLOPE)


@fill
def elu(x, *, xp=None):
    """Exponential linear unit, ``y = x`` where ``x > 0``, else ``alpha (exp(x) - 1)``
    with ``alpha = 1``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.where(x > 0, x, ELU_ALPHA * xp.expm1(xp.minimum(x, constant_like(0.0, x, xp))))


@fill
def gelu(x, *, xp=None):
    """Gaussian error linear unit, tanh form:
    ``y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (the standard has no ``erf``).

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    t = xp.tanh(_GELU_C * (x + _GELU_K * x * x * x))
    return 0.5 * x * (1.0 + t)


@fill
def sigmoid(x, *, xp=None):
    """Logistic function ``y = 1 / (1 + exp(-x))``.

    Stable for any ``x``: only ``exp(-|x|)`` is computed, so nothing overflows.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    e = xp.exp(-xp.abs(x))
    r = 1.0 / (1.0 + e)
    return xp.where(x >= 0, r, e * r)


@fill
def silu(x, *, xp=None):
    """Sigmoid linear unit (swish), ``y = x * sigmoid(x)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return x * sigmoid(x, xp=xp)


@fill
def tanh(x, *, xp=None):
    """Hyperbolic tangent, ``y = tanh(x)``.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.tanh(x)


@fill
def softplus(x, *, xp=None):
    """Softplus, ``y = log(1 + exp(x))``.

    Computed as ``max(x, 0) + log1p(exp(-|x|))``, which never overflows.

    Parameters
    ----------
    x : array, any shape
        Real floating input.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Same dtype and device as ``x``; ``x`` itself is not modified.
    """
    xp = _ns(x, xp)
    return xp.maximum(x, constant_like(0.0, x, xp)) + xp.log1p(xp.exp(-xp.abs(x)))


@fill
def logsumexp(x, *, axis=-1, keepdims=True, xp=None):
    """``log(sum(exp(x), axis))``, shifted by the maximum so that it never overflows.

    Parameters
    ----------
    x : array, any shape
    axis : int, default -1
        Axis to reduce.
    keepdims : bool, default True
        Keep the reduced axis with length 1.
    {xp}

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


def row_max(x, xp):
    """``max(x, axis=-1, keepdims=True)``."""
    return xp.max(x, axis=-1, keepdims=True)


def row_sum(x, xp):
    """``sum(x, axis=-1, keepdims=True)``."""
    return xp.sum(x, axis=-1, keepdims=True)


@fill
def softmax(x, *, xp=None, row_max=row_max, row_sum=row_sum):
    """``exp(x - max(x)) / sum(exp(x - max(x)))`` over the last axis (the public form,
    with its parameters, is :func:`arraymlp.functional.softmax`); ``row_max`` and
    ``row_sum`` are the row reductions, which a kernel set binds to its own."""
    xp = _ns(x, xp)
    e = xp.exp(x - row_max(x, xp))
    s = row_sum(e, xp)
    if is_writeable(e):
        e /= s
        return e
    return e / s


@fill
def log_softmax(x, *, xp=None):
    """Log-softmax over the last axis, ``y = x - logsumexp(x)``.

    Computed as ``z - log(sum(exp(z)))`` with ``z = x - max(x)``, so that the result
    keeps full precision however large the logits (``x - logsumexp(x)`` would round
    ``logsumexp`` to the spacing of ``max(x)`` first).

    Parameters
    ----------
    x : array, shape (..., k)
        Logits.
    {xp}

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
    return xp.where(x > 0, dy, dy * (ELU_ALPHA * xp.exp(xp.minimum(x, constant_like(0.0, x, xp)))))


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


# In-place variants, for arrays the caller hands over (a temporary no one else holds
# or reads again). Each may overwrite its first argument and returns the result, which
# is that argument when it could be overwritten: the standard's in-place operators on
# writeable arrays, the functional form otherwise.
def identity_forward_inplace(x, xp):
    return x


def relu_forward_inplace(x, xp):
    """``max(x, 0)`` into ``x``."""
    return relu(x, xp=xp)


def relu_backward_inplace(dy, y, xp):
    """``dy * [y > 0]`` into ``dy``: one boolean mask and no select (``where`` branches
    on every element, and a random mask defeats the branch predictor)."""
    if is_writeable(dy):
        dy *= xp.astype(y > 0, dy.dtype)
        return dy
    return _relu_bw(dy, y, xp)


def tanh_forward_inplace(x, xp):
    """``tanh(x)`` into ``x``."""
    return tanh(x, xp=xp)


def tanh_backward_inplace(dy, y, xp):
    """``dy * (1 - y^2)`` into ``dy``, the factor built in one temporary."""
    if is_writeable(dy):
        d = y * y
        dy *= 1.0 - d
        return dy
    return _tanh_bw(dy, y, xp)


def sigmoid_backward_inplace(dy, y, xp):
    """``dy * y (1 - y)`` into ``dy``, the factor built in one temporary."""
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


#: The activation table: name to :class:`Activation` row (the reference kernels; a
#: backend's set has its own rows, with its in-place overrides).
#:
#: :meta hide-value:
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", identity, _identity_bw, "output", True, identity_forward_inplace, _identity_bw),
        Activation("relu", relu, _relu_bw, "output", True, relu_forward_inplace, relu_backward_inplace),
        Activation("leaky_relu", leaky_relu, _leaky_bw, "output"),
        Activation("elu", elu, _elu_bw, "input"),
        Activation("gelu", gelu, _gelu_bw, "input"),
        Activation("silu", silu, _silu_bw, "input"),
        Activation("tanh", tanh, _tanh_bw, "output", True, tanh_forward_inplace, tanh_backward_inplace),
        Activation("sigmoid", sigmoid, _sigmoid_bw, "output", True, None, sigmoid_backward_inplace),
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


# ----------------------------------------------------------------------------- dense
def add_bias(y, b, xp):
    """``y + b``, into ``y`` (a product the caller made) where it is writeable."""
    if is_writeable(y):
        y += b
        return y
    return y + b


def dense_forward(x, W, b, xp):
    """``y = x @ W + b`` for ``x`` (n, n_in), ``W`` (n_in, n_out), ``b`` (n_out,) or None.

    Leading axes broadcast as in ``xp.matmul``: an ensemble's ``W`` (K, n_in, n_out) and
    ``b`` (K, 1, n_out) with ``x`` (n, n_in) or (K, n, n_in) give ``y`` (K, n, n_out)."""
    y = x @ W
    return y if b is None else add_bias(y, b, xp)


def dense_relu_forward(x, W, b, xp, *, dense_forward=dense_forward, relu_forward_inplace=relu_forward_inplace):
    """``max(x @ W + b, 0)``: a dense layer and the ReLU after it, the product handed
    to the ReLU (the values of :func:`dense_forward` then :func:`relu`)."""
    return relu_forward_inplace(dense_forward(x, W, b, xp), xp)


def batch_axis_sum(a, xp):
    """``sum(a, axis=-2)``, the sum over the batch axis: shape (d,) for ``a`` (n, d), and
    (K, 1, d) (the axis kept) for an ensemble's ``a`` (K, n, d), the shape of the
    members' stacked biases."""
    return xp.sum(a, axis=-2, keepdims=a.ndim > 2)


def bias_grad(dy, xp):
    """``db = sum(dy, axis=-2)``: the bias gradient, summed over the batch (the mean over
    the batch belongs to the loss); (K, 1, n_out) for an ensemble's ``dy`` (K, n, n_out)."""
    return batch_axis_sum(dy, xp)


def dense_backward(x, W, dy, has_bias, need_dx, xp, *, bias_grad=bias_grad):
    """``(dx, dW, db)`` of ``y = x @ W + b``: ``dW = x^T @ dy``, ``db = sum(dy, axis=-2)``
    (None without bias), ``dx = dy @ W^T`` (None when not needed); the transposes are of
    the last two axes, so an ensemble's stacked ``W`` (K, n_in, n_out) works alike."""
    dW = xp.matrix_transpose(x) @ dy
    db = bias_grad(dy, xp) if has_bias else None
    dx = dy @ xp.matrix_transpose(W) if need_dx else None
    return dx, dW, db


def sgd_apply(p, g, lr, l2, xp, owned=True):
    """``p + (-lr) * (g + l2 * p)``, the rounding of :class:`arraymlp.SGD`'s step, into
    ``p`` where it is writeable. ``owned``: ``g`` is a fresh array of the caller's, which
    may be overwritten (otherwise it is only read)."""
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


def dense_sgd_update(x, dy, W, b, lr, l2, xp, *, bias_grad=bias_grad, sgd_apply=sgd_apply):
    """One plain SGD step of a dense layer from its input and output gradient:
    ``W <- W - lr * (x^T @ dy + l2 * W)``, ``b <- b - lr * sum(dy, axis=-2)``. ``W`` and
    ``b`` are handed over; returns ``(W, b)``. The input gradient ``dy @ W^T`` must be
    taken before: it reads the old ``W``."""
    W = sgd_apply(W, xp.matrix_transpose(x) @ dy, lr, l2, xp)
    if b is not None:
        b = sgd_apply(b, bias_grad(dy, xp), lr, 0.0, xp)
    return W, b


def axpy(p, a, g, xp, work=None):
    """``p + a * g``, into ``p`` where it is writeable (an optimiser's update).
    ``work(n, p, xp)`` may lend a flat scratch array of ``n`` elements; the reference
    does not need it."""
    if is_writeable(p):
        p += a * g
        return p
    return p + a * g


def _imul(a, c):
    """``a * c``, into ``a`` where it is writeable (an array the library made)."""
    if is_writeable(a):
        a *= c
        return a
    return a * c


def _iadd(a, c):
    """``a + c``, into ``a`` where it is writeable."""
    if is_writeable(a):
        a += c
        return a
    return a + c


def _isub(a, c):
    """``a - c``, into ``a`` where it is writeable."""
    if is_writeable(a):
        a -= c
        return a
    return a - c


def _idiv(a, c):
    """``a / c``, into ``a`` where it is writeable."""
    if is_writeable(a):
        a /= c
        return a
    return a / c


# ----------------------------------------------------------------------- finiteness
#: Checks over whole data sets walk them in blocks of about this many elements, so
#: that no temporary (a boolean mask, a cast) is ever the size of the data.
CHECK_BLOCK = 1 << 20


def block_rows(a, block: int | None = None) -> int:
    """Rows of ``a`` per block of a blocked check: about ``block`` elements (default
    :data:`CHECK_BLOCK`), at least one row."""
    per_row = math.prod(a.shape[1:]) if a.ndim > 1 else 1
    return max(1, (CHECK_BLOCK if block is None else block) // max(per_row, 1))


def row_blocks(n: int, rows: int):
    """``(start, stop)`` of consecutive blocks of ``rows`` rows covering ``range(n)``
    (stops within the axis: the standard leaves slice ends past it unspecified)."""
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


def all_finite(a, xp, rows: int | None = None) -> bool:
    """Whether every entry of ``a`` is finite, checked in blocks of ``rows`` rows
    (:func:`block_rows` by default) whose answers are combined on the device and read
    once: no boolean mask of the data's size, and one host read in all."""
    n = a.shape[0] if a.ndim else 0
    rows = block_rows(a) if rows is None else rows
    if n <= rows:
        return bool(xp.all(xp.isfinite(a)))
    ok = None
    for i, j in row_blocks(n, rows):
        blk = xp.all(xp.isfinite(a[i:j, ...]))
        ok = blk if ok is None else xp.logical_and(ok, blk)
    return bool(ok)


# ------------------------------------------------------------ label cross-entropy
def _onehot(labels, n, k, xp, like):
    return xp.reshape(labels, (n, 1)) == xp.arange(k, dtype=labels.dtype, device=device_of(like))


def pick_labels(z, labels, xp):
    """``z[i, labels[i]]`` for every row ``i``: shape (n,). Only the true class is read
    (never ``0 * z``, which is NaN for a masked logit of ``-inf``)."""
    n, k = z.shape
    if hasattr(xp, "take_along_axis"):
        return xp.reshape(xp.take_along_axis(z, xp.reshape(labels, (n, 1)), axis=1), (n,))
    # namespaces before the 2024.12 standard
    return xp.sum(xp.where(_onehot(labels, n, k, xp, z), z, xp.zeros_like(z)), axis=1)


def subtract_onehot(g, labels, xp):
    """``g - onehot(labels)``, into ``g`` where it is writeable."""
    n, k = g.shape
    onehot = xp.astype(_onehot(labels, n, k, xp, g), g.dtype)
    if is_writeable(g):
        g -= onehot
        return g
    return g - onehot


def cross_entropy_labels(x, labels, xp, *, row_max=row_max, row_sum=row_sum, pick_labels=pick_labels,
                         subtract_onehot=subtract_onehot):
    """Softmax cross-entropy of logits ``x`` (n, k) against integer labels (n,):
    ``(l, g)`` with the per-sample losses ``l_i = log(s_i) - z_i,y_i`` (``z = x - max(x)``,
    ``s = sum(exp(z))`` per row) and ``g = exp(z) / s - onehot``, unscaled. ``log p``
    is never formed, and the gradient is computed into ``exp(z)``."""
    z = x - row_max(x, xp)
    zy = pick_labels(z, labels, xp)
    g = xp.exp(z)
    s = row_sum(g, xp)
    per_sample = xp.log(s)[:, 0] - zy
    if is_writeable(g):
        g /= s
    else:
        g = g / s
    return per_sample, subtract_onehot(g, labels, xp)


def batch_sum(a, xp, dtype=None):
    """``sum(a)`` accumulated in ``dtype`` (None: ``a``'s own)."""
    return xp.sum(a, dtype=dtype)


def cross_entropy_labels_mean(x, labels, xp, *, cross_entropy_labels=cross_entropy_labels, batch_sum=batch_sum):
    """The unweighted case: ``(sum_i l_i, g / n)`` with ``l`` and ``g`` of
    :func:`cross_entropy_labels`; the sum accumulates in float32 for float16 logits."""
    per_sample, g = cross_entropy_labels(x, labels, xp)
    n = x.shape[0]
    total = batch_sum(per_sample, xp, xp.float32 if is_float16(per_sample.dtype, xp) else None)
    if is_writeable(g):
        g *= 1.0 / n
        return total, g
    return total, g * (1.0 / n)


# ------------------------------------------------------------------------ metrics
def add_argmax_hits(total, scores, labels, xp):
    """``total + sum_i [argmax(scores[i]) == labels[i]]``: the rows of ``scores`` (n, k)
    whose first highest score is at their label (n,), added to the count ``total``
    (shape (1,), an integer dtype), in place where it is writeable. The training
    accuracy's count of one batch; nothing is read to the host."""
    pred = xp.argmax(scores, axis=1)
    if pred.dtype != labels.dtype:
        pred = xp.astype(pred, labels.dtype)
    hits = xp.sum(xp.astype(pred == labels, total.dtype))
    if is_writeable(total):
        total += hits
        return total
    return total + hits


def cross_entropy_labels_mean_hits(x, labels, hits, xp, *, cross_entropy_labels_mean=cross_entropy_labels_mean,
                                   add_argmax_hits=add_argmax_hits):
    """:func:`cross_entropy_labels_mean` and :func:`add_argmax_hits` of the same logits
    and labels in one call: ``(sum_i l_i, g / n, hits)``, ``hits`` (shape (1,), an
    integer count) with the rows whose arg-max is their label added (in place where it
    is writeable). The training accuracy counted by the loss's own pass where a kernel
    set fuses the two (NumPy's compiled loop); the values of the two kernels."""
    total, g = cross_entropy_labels_mean(x, labels, xp)
    return total, g, add_argmax_hits(hits, x, labels, xp)


# ---------------------------------------------------------------------------- dropout
@fill
def dropout_forward(x, p, *, rng, training=True, xp=None):
    """Inverted dropout: zero each entry with probability ``p`` and scale the rest by
    ``1 / (1 - p)``, so that inference needs no rescaling.

    Parameters
    ----------
    x : array, shape (n, d)
    p : float in [0, 1)
        Probability of dropping an entry.
    rng : arraymlp.Generator
        The model's generator (or one of your own with ``random(shape, dtype)``);
        masks are drawn on ``x``'s device. An entry is kept where the generator's next
        32 random bits (:meth:`arraymlp.Generator.bits`) are at least
        ``ceil(p * 2**32)``, so the masks are the same on every backend.
    training : bool, default True
        With ``False`` (or ``p == 0``) nothing is dropped and ``x`` is returned as is.
    {xp}

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
    bits = getattr(rng, "bits", None)
    if bits is not None:  # a counter-based stream: keep where 32 random bits >= p * 2**32
        u, threshold = bits(tuple(x.shape)), min(math.ceil(p * 2.0**32), 2**32 - 1)
    else:  # a generator of one's own with only random()
        u, threshold = rng.random(tuple(x.shape), x.dtype), p
    if _device(u) != _device(x):  # a generator made for another (e.g. the default) device
        u = to_device(u, _device(x))
    # 0-d constants filled on the device and kept (constant_like): ``asarray`` of a Python
    # number is a copy from the host, which torch makes synchronously on a GPU
    if bits is not None and not _is_numpy_array(u):  # in the bits' dtype: JAX reads a bare int as int32
        threshold = constant_like(threshold, u, xp)
    mask = xp.where(u >= threshold, constant_like(1.0 / (1.0 - p), x, xp), constant_like(0.0, x, xp))
    return x * mask, mask


@fill
def dropout_backward(mask, dy, *, xp=None):
    """Gradient through :func:`dropout_forward`, ``dx = dy * mask``.

    Parameters
    ----------
    mask : array of shape (n, d), or None
        The mask :func:`dropout_forward` returned; ``None`` (nothing was dropped) passes
        ``dy`` through.
    dy : array, shape (n, d)
    {xp}

    Returns
    -------
    dx : array, shape (n, d)
    """
    return dy if mask is None else dy * mask


# ---------------------------------------------------------------------- layer norm
@fill
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
    {xp}

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


@fill
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
    {xp}

    Returns
    -------
    dx : array, shape (n, d)
    dgamma, dbeta : arrays, shape (d,)
    """
    xp = _ns(dy, xp)
    xhat, rstd = cache
    dgamma = batch_axis_sum(dy * xhat, xp)  # (d,), or (K, 1, d) for an ensemble
    dbeta = batch_axis_sum(dy, xp)
    g = dy * gamma
    dx = rstd * (g - xp.mean(g, axis=-1, keepdims=True) - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    return dx, dgamma, dbeta


# ------------------------------------------------------------------ optimiser steps
# One function per update rule, the values of :mod:`arraymlp.optim`'s classes; the
# state arrays and ``p`` are handed over (updated in place where writeable) and
# returned. The gradient is only read. ``work(n, p, xp)`` may lend scratch space (the
# optimiser's work buffer); the reference does not need it. A backend may replace each
# with one kernel per parameter array.
#
# A hyper-parameter (``lr``, ``momentum``, ``wd``, ``b1``, ``b2``, ``eps``, ...) is a
# Python number or an array of ``p``'s dtype and place that broadcasts against ``p``:
# an ensemble's per-member values have shape (K, 1, 1) against its stacked parameters
# (K, n_in, n_out). A Python number takes exactly the operations it always took (its
# derived constants, ``1 - b1`` or ``sqrt(1 - b2**t)``, are computed in Python and
# rounded once to the array's dtype, as the namespace rounds a Python scalar); an
# array takes the same operations, elementwise in its dtype. An array hyper-parameter
# counts as non-zero (its branch is taken; a member whose value is 0 gets the
# branch's identity, ``g + 0 * p``).
def is_on(h) -> bool:
    """Whether hyper-parameter ``h`` switches its term on.

    Parameters
    ----------
    h : number or array
        A Python number, or per-member values (an array, never read back to the host).

    Returns
    -------
    bool
        ``h != 0`` for a number; True for any array.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.kernels.reference import is_on
    >>> is_on(0.0), is_on(0.1), is_on(np.zeros((3, 1, 1)))
    (False, True, True)
    """
    return h != 0 if isinstance(h, (int, float)) else True


def hyper_sqrt(h, xp):
    """``sqrt(h)`` of a hyper-parameter: :func:`math.sqrt` of a Python number (rounded
    once when it meets an array), ``xp.sqrt`` of an array of per-member values.

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.kernels.reference import hyper_sqrt
    >>> hyper_sqrt(0.25, np), hyper_sqrt(np.array([[[4.0]], [[9.0]]]), np).ravel()
    (0.5, array([2., 3.]))
    """
    return math.sqrt(h) if isinstance(h, (int, float)) else xp.sqrt(h)


def sgd_momentum_update(p, g, buf, lr, momentum, dampening, nesterov, wd, first, xp, work=None, *, axpy=axpy):
    """Momentum SGD: ``g' = g + wd p``; ``buf = g'`` on the first step, else
    ``buf = momentum buf + (1 - dampening) g'``; ``p -= lr (g' + momentum buf)`` with
    Nesterov, ``p -= lr buf`` without. ``buf`` starts at zero. Returns ``(p, buf)``."""
    if is_on(wd):
        g = g + wd * p
    if first:
        buf = _iadd(buf, g)  # a copy of g: the buffer starts at zero
    else:
        buf = axpy(_imul(buf, momentum), 1.0 - dampening, g, xp, work)
    g = g + momentum * buf if nesterov else buf
    return axpy(p, -lr, g, xp, work), buf


def adam_update(p, g, m, v, vmax, lr, b1, b2, eps, wd, decoupled, t, xp, work=None):
    """Adam (``decoupled``: AdamW) at step ``t`` (from 1): with ``g' = g + wd p``
    (coupled) or ``p *= 1 - lr wd`` first (decoupled), ``m = b1 m + (1-b1) g'``,
    ``v = b2 v + (1-b2) g'^2``, ``vmax = max(vmax, v)`` (AMSGrad, when ``vmax`` is not
    None) and ``p -= lr/(1-b1^t) m / (sqrt(v or vmax)/sqrt(1-b2^t) + eps)``.
    Returns ``(p, m, v, vmax)``."""
    if is_on(wd):
        if decoupled:
            p = _imul(p, 1.0 - lr * wd)
        else:
            g = g + wd * p
    m = _iadd(_imul(m, b1), (1.0 - b1) * g)
    v = _iadd(_imul(v, b2), (1.0 - b2) * (g * g))
    den = v
    if vmax is not None:
        top = xp.maximum(vmax, v)
        if is_writeable(vmax):
            vmax[...] = top
        else:
            vmax = top
        den = vmax
    step_size = lr / (1.0 - b1**t)
    denom = xp.sqrt(den) / hyper_sqrt(1.0 - b2**t, xp) + eps
    return _isub(p, step_size * (m / denom)), m, v, vmax


def rmsprop_update(p, g, v, gbar, buf, lr, alpha, eps, momentum, wd, xp, work=None):
    """RMSprop: ``g' = g + wd p``, ``v = alpha v + (1-alpha) g'^2``; centred (``gbar``
    not None): ``gbar = alpha gbar + (1-alpha) g'`` and ``d = sqrt(v - gbar^2) + eps``,
    else ``d = sqrt(v) + eps``; with a momentum buffer ``buf = momentum buf + g'/d`` and
    ``p -= lr buf``, else ``p -= lr g'/d``. Returns ``(p, v, gbar, buf)``."""
    if is_on(wd):
        g = g + wd * p
    v = _iadd(_imul(v, alpha), (1.0 - alpha) * (g * g))
    if gbar is not None:
        gbar = _iadd(_imul(gbar, alpha), (1.0 - alpha) * g)
        avg = xp.sqrt(v - gbar * gbar) + eps
    else:
        avg = xp.sqrt(v) + eps
    if buf is not None:
        buf = _iadd(_imul(buf, momentum), g / avg)
        return _isub(p, lr * buf), v, gbar, buf
    return _isub(p, lr * (g / avg)), v, gbar, buf


def adagrad_update(p, g, s, lr, eps, wd, xp, work=None):
    """Adagrad with this step's rate ``lr`` (decay applied by the caller):
    ``g += wd * p``; ``s += g * g``; ``p -= lr * g / (sqrt(s) + eps)``. ``p`` and ``s``
    are handed over; returns ``(p, s)``."""
    if is_on(wd):
        g = g + wd * p
    s = _iadd(s, g * g)
    return _isub(p, lr * (g / (xp.sqrt(s) + eps))), s
