"""Loss functions: one table, each row ``fn(outputs, targets) -> (loss, d_outputs)``.

Every loss returns its value (a 0-d array of the outputs' dtype, on their device) and
its gradient with respect to ``outputs`` (same shape as ``outputs``), so the model's
backward pass starts from ``d_outputs`` and never differentiates the loss itself. The
mean over the batch is taken here, once, exactly as PyTorch's ``reduction="mean"``
defines it; layers only ever sum over the batch.

Fusion
------
Three losses are the natural partners of an output activation: softmax with
cross-entropy, sigmoid with binary cross-entropy, identity with squared error (and
absolute and Huber error). Computing ``softmax`` first and then ``-log`` of it loses
everything to rounding once a logit is large (``log(0) = -inf``), and chaining the
softmax Jacobian onto ``-t / p`` divides by probabilities that have underflowed. The
combined forms do not: ``log_softmax(z) = z - logsumexp(z)`` and
``d/dz CE = softmax(z) - t`` are finite for any finite logits. So each row names the
activation it fuses with (:attr:`Loss.fused_activation`); when a model's last layer
applies that activation, the model hands the loss the *logits* (the last layer's
input), skips that activation's own forward and backward, and takes ``d_outputs`` as
the gradient with respect to the logits. The fused losses therefore always take
logits: ``cross_entropy`` applies the softmax, ``binary_cross_entropy`` the sigmoid,
and ``poisson_nll`` reads its input as a log-rate (its activation would be ``exp``,
which has no row in :data:`arraymlp.functional.ACTIVATIONS`, hence ``None``).

Sample weights
--------------
Every loss takes ``sample_weight`` of shape ``(n,)``. With ``l_i`` the loss of sample
``i`` (the mean over that sample's output elements, or its cross-entropy term), the
weighted loss is ``sum_i w_i l_i / sum_i w_i``: all-ones weights give the unweighted
value and integer weights equal repeating rows.

Checks
------
Every loss validates its inputs (shapes, dtypes, devices, label range, finite targets
and weights). ``check=False`` skips the checks that read the targets' and weights'
values (label range, finite targets, finite non-negative weights with a positive sum)
and so cost a pass over them and, on a GPU, a wait for the device: the model's
training step passes it for data its caller validated once, up front (``fit``
validates the whole ``y`` and ``sample_weight`` before the first step). Unchecked, a
batch whose weights are all zero has loss 0 and gradient 0 (it changes nothing).

Like :mod:`arraymlp.functional`, everything here uses only functions of the Array API
standard through ``xp`` (taken from ``outputs`` when not given), creates arrays with
the outputs' dtype and device, and never mutates its inputs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from ._backend import asarray_like, device_of, get_namespace, index_dtype, is_float16, is_writeable, memo
from .functional import log_softmax
from .kernels import kernels_for
from .kernels.reference import block_rows, constant_like, row_blocks

__all__ = [
    "LOSSES",
    "Loss",
    "binary_cross_entropy",
    "check_targets",
    "count_not_binary",
    "cross_entropy",
    "get_loss",
    "huber",
    "mae",
    "mse",
    "poisson_nll",
]

HUBER_DELTA = 1.0


# ------------------------------------------------------------------------- checks
def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def _dtype(dtype) -> str:
    """``"int64"`` for numpy's, torch's or array_api_strict's int64."""
    return str(dtype).rsplit(".", 1)[-1]


def _namespace(outputs, targets, sample_weight, xp):
    if xp is not None:
        return xp
    return get_namespace(outputs, targets, sample_weight)


def _check_device(name, what, outputs, x):
    d_out, d_x = device_of(outputs), device_of(x)
    if d_out != d_x:
        msg = (
            f"{name}: {what} is on device {d_x!r} but outputs are on {d_out!r}; "
            f"move {what} with arraymlp.to_backend({what}, ..., device={d_out!r})"
        )
        raise ValueError(msg)


def _check_outputs(name, outputs, xp, *, two_d=False):
    """Outputs must be a non-empty real floating array with a batch axis."""
    if not xp.isdtype(outputs.dtype, "real floating"):
        msg = f"{name}: outputs must have a real floating dtype, got {_dtype(outputs.dtype)}"
        raise ValueError(msg)
    shape = _shape(outputs)
    if two_d and len(shape) != 2:
        msg = f"{name}: outputs must be logits of shape (n, k), got shape {shape}"
        raise ValueError(msg)
    if len(shape) == 0:
        msg = f"{name}: outputs must have a batch axis, got a 0-d array"
        raise ValueError(msg)
    if shape[0] == 0:
        msg = f"{name}: empty batch: outputs have shape {shape}"
        raise ValueError(msg)
    if math.prod(shape) == 0:
        msg = f"{name}: outputs have no elements per sample: shape {shape}"
        raise ValueError(msg)
    return shape


def _check_finite(name, t, xp):
    if not kernels_for(xp).all_finite(t, xp):
        msg = f"{name}: targets contain NaN or infinity"
        raise ValueError(msg)


def count_not_binary(targets, xp):
    """How many values of ``targets`` are neither 0 nor 1: a 0-d int64 array, counted
    block by block on the device (no temporary the size of the data) and not read.

    Parameters
    ----------
    targets : array, shape (n,) or (n, k)
        Real or boolean values (booleans count as 0 and 1).
    xp : namespace

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> int(am.losses.count_not_binary(np.array([0, 1, 2, 1, -1]), np))
    2
    """
    if targets.dtype == xp.bool:
        return xp.zeros((), dtype=index_dtype(xp), device=device_of(targets))
    total = None
    for i, j in row_blocks(_shape(targets)[0], block_rows(targets)):
        b = targets[i:j, ...]
        count = xp.sum(xp.astype((b != 0) & (b != 1), index_dtype(xp)))
        total = count if total is None else total + count
    return total


def _check_binary_labels(name, targets, xp):
    """Integer (or boolean) targets of a binary loss must be 0 and 1: one read."""
    if int(count_not_binary(targets, xp)):
        lo, hi = int(xp.min(targets)), int(xp.max(targets))
        msg = (f"{name}: integer targets must be the labels 0 and 1, found values in [{lo}, {hi}] "
               "(several classes belong to cross_entropy)")
        raise ValueError(msg)


def _same_shape_targets(name, outputs, targets, xp, check=True, binary=False):
    """Float targets with the outputs' shape (``(n,)`` is accepted for ``(n, 1)``),
    cast to the outputs' dtype (finite unless ``check`` is false). ``binary``: integer
    and boolean 0/1 labels are accepted too (values other than 0 and 1 raise unless
    ``check`` is false)."""
    _check_device(name, "targets", outputs, targets)
    o_shape, t_shape = _shape(outputs), _shape(targets)
    if binary and (targets.dtype == xp.bool or _integral(targets.dtype, xp)):
        if check:
            _check_binary_labels(name, targets, xp)
        targets = xp.astype(targets, outputs.dtype)
        check = False  # 0/1: finite
    if xp.isdtype(targets.dtype, "integral"):
        msg = (
            f"{name}: needs float targets with the outputs' shape, got integer targets "
            f"of dtype {_dtype(targets.dtype)} (integer class labels belong to cross_entropy); "
            f"convert them with xp.astype(targets, outputs.dtype)"
        )
        raise ValueError(msg)
    if not xp.isdtype(targets.dtype, "real floating"):
        msg = f"{name}: targets must have a real floating dtype, got {_dtype(targets.dtype)}"
        raise ValueError(msg)
    if t_shape != o_shape:
        if len(o_shape) == 2 and o_shape[1] == 1 and t_shape == (o_shape[0],):
            targets = xp.reshape(targets, o_shape)
        else:
            msg = f"{name}: targets shape {t_shape} does not match outputs shape {o_shape}"
            raise ValueError(msg)
    t = xp.astype(targets, outputs.dtype, copy=False)
    if check:
        _check_finite(name, t, xp)
    return t


_INTEGRAL: dict[Any, bool] = {}


def _integral(dtype, xp) -> bool:
    """``xp.isdtype(dtype, "integral")``, remembered per (namespace, dtype): the training
    step asks it every batch, and NumPy's ``isdtype`` costs a few microseconds."""
    return memo(_INTEGRAL, (xp, dtype), lambda: bool(xp.isdtype(dtype, "integral")))


def _label_range(labels, xp) -> tuple[int, int]:
    """``(min, max)`` of integer labels, block by block (each block cast to the
    namespace's index dtype: some namespaces cannot reduce every integer dtype, torch's
    uint32), combined on the device and read once."""
    lo = hi = None
    itype = index_dtype(xp)
    for i, j in row_blocks(_shape(labels)[0], block_rows(labels)):
        b = labels[i:j]
        b = b if b.dtype == itype else xp.astype(b, itype)
        b_lo, b_hi = xp.min(b), xp.max(b)
        lo = b_lo if lo is None else xp.minimum(lo, b_lo)
        hi = b_hi if hi is None else xp.maximum(hi, b_hi)
    return int(lo), int(hi)


def _class_targets(name, outputs, targets, xp, check=True, convert=True):
    """Targets of :func:`cross_entropy`: ``(t, labels)``, the float ``(n, k)`` targets
    and ``None``, or ``None`` and the labels ``(n,)`` in the namespace's index dtype when
    they came as integer labels. ``check=False`` skips reading the labels' range and the
    targets' values; ``convert=False`` returns the targets as they came (no cast)."""
    if not check and _integral(targets.dtype, xp):
        itype = index_dtype(xp)
        return None, (targets if targets.dtype == itype else xp.astype(targets, itype))
    _check_device(name, "targets", outputs, targets)
    n, k = _shape(outputs)
    t_shape = _shape(targets)
    if xp.isdtype(targets.dtype, "integral"):
        if t_shape != (n,):
            msg = (
                f"{name}: integer targets must be class labels of shape (n,) = ({n},) for "
                f"outputs of shape {(n, k)}, got shape {t_shape}; pass one-hot or "
                f"probability targets as floats of shape (n, k)"
            )
            raise ValueError(msg)
        lo, hi = _label_range(targets, xp)
        if lo < 0 or hi >= k:
            msg = (
                f"{name}: labels must lie in [0, {k}) for outputs with k={k} classes; "
                f"found labels in [{lo}, {hi}]"
            )
            raise ValueError(msg)
        if not convert:
            return None, targets
        itype = index_dtype(xp)
        return None, (targets if targets.dtype == itype else xp.astype(targets, itype))
    if not xp.isdtype(targets.dtype, "real floating"):
        msg = (
            f"{name}: targets must be integer labels of shape (n,) or float "
            f"probabilities of shape (n, k), got dtype {_dtype(targets.dtype)}"
        )
        raise ValueError(msg)
    if t_shape != (n, k):
        hint = ""
        if t_shape == (n,):
            hint = (
                "; float targets of shape (n,) look like labels: "
                "convert them to an integer dtype"
            )
        msg = (
            f"{name}: probability targets shape {t_shape} does not match "
            f"outputs shape {(n, k)}{hint}"
        )
        raise ValueError(msg)
    t = xp.astype(targets, outputs.dtype, copy=False) if convert else targets
    if check:
        _check_finite(name, t, xp)
    return t, None


def _weight_shape(name, sample_weight, outputs, xp):
    """Raise unless ``sample_weight`` is a real array of shape (n,) on the outputs' device."""
    _check_device(name, "sample_weight", outputs, sample_weight)
    n = _shape(outputs)[0]
    if not (
        xp.isdtype(sample_weight.dtype, "real floating")
        or xp.isdtype(sample_weight.dtype, "integral")
    ):
        msg = (
            f"{name}: sample_weight must be a real number array, "
            f"got dtype {_dtype(sample_weight.dtype)}"
        )
        raise ValueError(msg)
    if _shape(sample_weight) != (n,):
        msg = (
            f"{name}: sample_weight must have shape (n,) = ({n},) to match outputs of "
            f"shape {_shape(outputs)}, got shape {_shape(sample_weight)}"
        )
        raise ValueError(msg)


def _weight_values(name, tot: float, lo: float) -> None:
    """Raise unless weights of sum ``tot`` and minimum ``lo`` are finite,
    non-negative and not all zero."""
    # a NaN or an infinity anywhere makes the sum non-finite
    if not math.isfinite(tot):
        msg = f"{name}: sample_weight must be finite, found a sum of {tot}"
        raise ValueError(msg)
    if lo < 0.0:
        msg = f"{name}: sample_weight must be non-negative, found minimum {lo}"
        raise ValueError(msg)
    if tot == 0.0:
        msg = f"{name}: sample_weight is all zero; at least one sample needs a positive weight"
        raise ValueError(msg)


def _sample_weight(name, sample_weight, outputs, xp, check=True):
    """``(w, sum(w))`` with ``w`` of shape (n,) in the outputs' dtype, or ``(None, None)``.

    ``check=False`` reads nothing back: the sum stays on the device, and a zero sum
    (a batch of zero weights) is replaced by 1 so that the batch contributes nothing."""
    if sample_weight is None:
        return None, None
    _weight_shape(name, sample_weight, outputs, xp)
    w = xp.astype(sample_weight, outputs.dtype, copy=False)
    total = xp.sum(w, dtype=_acc(w.dtype, xp))
    if not check:
        return w, xp.where(total > 0, total, xp.ones_like(total))
    _weight_values(name, float(total), float(xp.min(w)))
    return w, total


def _acc(dtype, xp):
    """The dtype a sum over the batch accumulates in: float32 for float16 data, whose
    range ends at 65504 (a batch of 256 squared errors of 16 would overflow), and
    ``None`` (the data's own dtype) otherwise."""
    return xp.float32 if is_float16(dtype, xp) else None


def _result(loss, outputs, xp):
    """The loss as a 0-d array in the outputs' dtype."""
    loss = asarray_like(loss, outputs, xp)
    return loss if loss.dtype == outputs.dtype else xp.astype(loss, outputs.dtype)


def _weights_over(w, denom, g, shape, xp):
    """``w / denom`` reshaped to broadcast over ``g``'s trailing axes, in ``g``'s dtype."""
    c = xp.reshape(w / denom, shape)
    return c if c.dtype == g.dtype else xp.astype(c, g.dtype)


def _scale(g, c):
    """``g * c``, in place when ``g`` is a writeable temporary of ours."""
    if is_writeable(g):
        g *= c
        return g
    return g * c


# ---------------------------------------------------------------------- reduction
def _mean_elementwise(name, kernel, outputs, targets, xp, sample_weight, check=True, binary=False):
    """Mean over the batch of a loss that is a sum of per-element terms.

    ``kernel(o, t, xp) -> (e, g)`` gives the per-element loss ``e`` and its derivative
    ``g = de/do``, both shaped like ``o``. Unweighted: ``L = sum(e) / (n m)`` with ``m``
    elements per sample, ``dL/do = g / (n m)``. Weighted: ``l_i = sum_j e_ij / m``,
    ``L = sum_i w_i l_i / sum_i w_i``, ``dL/do_ij = g_ij w_i / (m sum w)``.
    """
    xp = _namespace(outputs, targets, sample_weight, xp)
    shape = _check_outputs(name, outputs, xp)
    t = _same_shape_targets(name, outputs, targets, xp, check, binary)
    w, total = _sample_weight(name, sample_weight, outputs, xp, check)
    n = shape[0]
    m = math.prod(shape[1:])
    e, g = kernel(outputs, t, xp)
    acc = _acc(e.dtype, xp)
    if w is None:
        loss = xp.sum(e, dtype=acc) / float(n * m)
        g = _scale(g, 1.0 / (n * m))
    else:
        per_sample = e if len(shape) == 1 else xp.sum(e, axis=tuple(range(1, len(shape))), dtype=acc)
        denom = total * float(m)
        loss = xp.sum(w * per_sample, dtype=acc) / denom
        g = _scale(g, _weights_over(w, denom, g, (n,) + (1,) * (len(shape) - 1), xp))
    return _result(loss, outputs, xp), g


# ------------------------------------------------------------------------ kernels
def _mse_kernel(o, t, xp):
    d = o - t
    return d * d, 2.0 * d


def _mae_kernel(o, t, xp):
    d = o - t
    return xp.abs(d), xp.sign(d)


def _huber_kernel(o, t, xp, delta=HUBER_DELTA):
    d = o - t
    a = xp.abs(d)
    e = xp.where(a < delta, 0.5 * (d * d), delta * (a - 0.5 * delta))
    # minimum/maximum, not clip: array-api-compat's clip indexes with boolean masks,
    # which reads the mask back to the host on a GPU; the bounds as 0-d arrays
    # (constant_like: a number would be copied from the host at every call on torch)
    return e, xp.minimum(xp.maximum(d, constant_like(-delta, d, xp)), constant_like(delta, d, xp))


def _bce_kernel(x, t, xp):
    # z = exp(-|x|) never overflows; it serves both the softplus term and the sigmoid.
    z = xp.exp(-xp.abs(x))
    e = xp.maximum(x, constant_like(0.0, x, xp)) - x * t + xp.log1p(z)
    r = 1.0 / (1.0 + z)
    sig = xp.where(x >= 0, r, z * r)
    return e, sig - t


def _poisson_kernel(x, t, xp):
    ex = xp.exp(x)
    return ex - t * x, ex - t


# ------------------------------------------------------------------------- losses
def mse(outputs, targets, *, xp=None, sample_weight=None, check=True):
    """Mean squared error, ``L = mean((o - t)^2)``, ``dL/do = 2 (o - t) / N``.

    Parameters
    ----------
    outputs : array, shape (n, ...)
        Predictions (fused with the identity activation).
    targets : array, float, shape of ``outputs`` (``(n,)`` is accepted for ``(n, 1)``)
    xp : namespace, optional
        Taken from ``outputs`` when omitted.
    sample_weight : array, shape (n,), optional
        Non-negative weights; ``L = sum_i w_i l_i / sum_i w_i`` with ``l_i`` the mean
        over sample ``i``'s elements.
    check : bool, default True
        Validate the targets' values (see the module notes).

    Returns
    -------
    loss : array, shape ()
        In the outputs' dtype and on their device; torch ``MSELoss()``.
    d_outputs : array, shape of ``outputs``
        ``dL/d outputs``.
    """
    return _mean_elementwise("mse", _mse_kernel, outputs, targets, xp, sample_weight, check)


def mae(outputs, targets, *, xp=None, sample_weight=None, check=True):
    """Mean absolute error, ``L = mean(|o - t|)``, ``dL/do = sign(o - t) / N`` (0 at 0).

    Parameters
    ----------
    outputs : array, shape (n, ...)
        Predictions (fused with the identity activation).
    targets : array, float, shape of ``outputs`` (``(n,)`` is accepted for ``(n, 1)``)
    xp : namespace, optional
    sample_weight : array, shape (n,), optional
    check : bool, default True
        Validate the targets' values (see the module notes).

    Returns
    -------
    loss : array, shape ()
        Torch ``L1Loss()``.
    d_outputs : array, shape of ``outputs``
    """
    return _mean_elementwise("mae", _mae_kernel, outputs, targets, xp, sample_weight, check)


def huber(outputs, targets, *, xp=None, sample_weight=None, delta=HUBER_DELTA, check=True):
    """Huber loss, ``L = mean(d^2/2 if |d| < delta else delta (|d| - delta/2))`` with
    ``d = o - t``; ``dL/do = clip(d, -delta, delta) / N``.

    Parameters
    ----------
    outputs : array, shape (n, ...)
        Predictions (fused with the identity activation).
    targets : array, float, shape of ``outputs`` (``(n,)`` is accepted for ``(n, 1)``)
    xp : namespace, optional
    sample_weight : array, shape (n,), optional
    delta : float, default 1.0
        Where the quadratic turns linear.
    check : bool, default True
        Validate the targets' values (see the module notes).

    Returns
    -------
    loss : array, shape ()
        Torch ``HuberLoss(delta=delta)``.
    d_outputs : array, shape of ``outputs``
    """
    if not (isinstance(delta, numbers.Real) and not isinstance(delta, bool) and delta > 0 and math.isfinite(delta)):
        msg = f"huber: delta must be a positive finite number, got {delta!r}"
        raise ValueError(msg)
    delta = float(delta)

    def kernel(o, t, xp):
        return _huber_kernel(o, t, xp, delta)

    return _mean_elementwise("huber", kernel, outputs, targets, xp, sample_weight, check)


def binary_cross_entropy(outputs, targets, *, xp=None, sample_weight=None, check=True):
    """Binary cross-entropy from logits,
    ``L = mean(max(x, 0) - x t + log1p(exp(-|x|)))``, ``dL/dx = (sigmoid(x) - t) / N``.

    Stable for any finite logits: only ``exp(-|x|)`` is ever computed.

    Parameters
    ----------
    outputs : array, shape (n, ...)
        Logits ``x`` (the sigmoid is fused in).
    targets : array, shape of ``outputs`` (``(n,)`` is accepted for ``(n, 1)``)
        Probabilities of the positive class (float), or the labels 0 and 1 as
        integers, booleans or floats.
    xp : namespace, optional
    sample_weight : array, shape (n,), optional
    check : bool, default True
        Validate the targets' values (see the module notes).

    Returns
    -------
    loss : array, shape ()
        Torch ``BCEWithLogitsLoss()``.
    d_outputs : array, shape of ``outputs``
        Gradient with respect to the logits.
    """
    return _mean_elementwise(
        "binary_cross_entropy", _bce_kernel, outputs, targets, xp, sample_weight, check, binary=True
    )


def poisson_nll(outputs, targets, *, xp=None, sample_weight=None, check=True):
    """Poisson negative log-likelihood with log-rate input (Stirling term omitted),
    ``L = mean(exp(x) - t x)``, ``dL/dx = (exp(x) - t) / N``.

    ``exp(x)`` overflows (to infinity, with the namespace's usual warning) for
    log-rates beyond the dtype's range (about 709 in float64, 88 in float32).

    Parameters
    ----------
    outputs : array, shape (n, ...)
        Log-rates ``x``.
    targets : array, float, shape of ``outputs`` (``(n,)`` is accepted for ``(n, 1)``)
        Observed counts.
    xp : namespace, optional
    sample_weight : array, shape (n,), optional
    check : bool, default True
        Validate the targets' values (see the module notes).

    Returns
    -------
    loss : array, shape ()
        Torch ``PoissonNLLLoss(log_input=True, full=False)``.
    d_outputs : array, shape of ``outputs``
    """
    return _mean_elementwise("poisson_nll", _poisson_kernel, outputs, targets, xp, sample_weight, check)


def cross_entropy(outputs, targets, *, xp=None, sample_weight=None, check=True, hits=None):
    """Softmax cross-entropy from logits,
    ``L = -sum_ij t_ij log_softmax(z)_ij / n``, ``dL/dz = (softmax(z) sum_j t_ij - t) / n``
    (``(softmax(z) - onehot) / n`` for labels).

    Parameters
    ----------
    outputs : array, shape (n, k)
        Logits ``z`` (the softmax is fused in).
    targets : array
        Integer class labels of shape (n,) in ``[0, k)``, or float one-hot /
        probability targets of shape (n, k).
    xp : namespace, optional
    sample_weight : array, shape (n,), optional
        ``L = sum_i w_i l_i / sum_i w_i`` with ``l_i = -sum_j t_ij log_softmax(z)_ij``.
    check : bool, default True
        Validate the targets' values (see the module notes).
    hits : list holding one integer array of shape (1,), optional
        A training accuracy's count: the rows whose arg-max is their label are added to
        ``hits[0]`` (the item is replaced where the count cannot be written in place),
        by the loss's own pass where the kernel set fuses the two. Integer labels and no
        ``sample_weight`` only (``fit`` asks for it in that case).

    Returns
    -------
    loss : array, shape ()
        Torch ``CrossEntropyLoss()``.
    d_outputs : array, shape (n, k)
        Gradient with respect to the logits.
    """
    name = "cross_entropy"
    xp = _namespace(outputs, targets, sample_weight, xp)
    if check:
        n, k = _check_outputs(name, outputs, xp, two_d=True)
    else:
        n, k = map(int, outputs.shape)
    t, labels = _class_targets(name, outputs, targets, xp, check)
    w, total = _sample_weight(name, sample_weight, outputs, xp, check)
    if hits is not None and (labels is None or w is not None):
        msg = "cross_entropy: hits= counts against integer labels without sample_weight only"
        raise ValueError(msg)
    if labels is not None:
        return _cross_entropy_labels(outputs, labels, w, total, n, k, xp, hits)
    logp = log_softmax(outputs, xp=xp)
    p = xp.exp(logp)
    tlogp = t * logp
    g = p * xp.sum(t, axis=-1, keepdims=True) - t
    acc = _acc(tlogp.dtype, xp)
    if w is None:
        loss = -xp.sum(tlogp, dtype=acc) / float(n)
        g = _scale(g, 1.0 / n)
    else:
        per_sample = -xp.sum(tlogp, axis=-1, dtype=acc)
        loss = xp.sum(w * per_sample, dtype=acc) / total
        g = _scale(g, _weights_over(w, total, g, (n, 1), xp))
    return _result(loss, outputs, xp), g


def _cross_entropy_labels(outputs, labels, w, total, n, k, xp, hits=None):
    """The label case of :func:`cross_entropy`, by the kernel set's fused kernels
    (:func:`arraymlp.kernels.reference.cross_entropy_labels`): with ``z = x - max(x)``
    and ``s = sum(exp(z))`` per row, ``l_i = log(s_i) - z_i,y_i`` and
    ``dL/dx = (exp(z) / s - onehot) / n``; only the true class's ``z`` is read and
    ``log p`` is never formed. ``hits``: see :func:`cross_entropy`."""
    ks = kernels_for(xp)
    if hits is not None:
        loss_sum, g, hits[0] = ks.cross_entropy_labels_mean_hits(outputs, labels, hits[0], xp)
        return _result(loss_sum / n, outputs, xp), g
    if w is None:
        loss_sum, g = ks.cross_entropy_labels_mean(outputs, labels, xp)
        return _result(loss_sum / n, outputs, xp), g
    per_sample, g = ks.cross_entropy_labels(outputs, labels, xp)
    loss = xp.sum(w * per_sample, dtype=_acc(per_sample.dtype, xp)) / total
    return _result(loss, outputs, xp), _scale(g, _weights_over(w, total, g, (n, 1), xp))


# -------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class Loss:
    """One row of the loss table.

    Attributes
    ----------
    name : str
    fn : callable ``(outputs, targets, *, xp=None, sample_weight=None, check=True) -> (loss, d_outputs)``
    fused_activation : str or None
        The output activation the loss takes the logits of (``"softmax"``,
        ``"sigmoid"``, ``"identity"``), ``None`` when it has no row in the
        activation table (``poisson_nll``'s ``exp``).
    targets : ``"labels_or_probs"`` or ``"same_shape"``
        What ``targets`` must look like.
    task : ``"multiclass"``, ``"multilabel"`` or ``"regression"``
        What a model trained with the loss predicts: one class per sample
        (``cross_entropy``), independent 0/1 outputs (``binary_cross_entropy``), or
        values (the default). It decides the metric of ``fit`` (accuracy or R^2) and
        what ``predict`` returns.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> ce = am.LOSSES["cross_entropy"]
    >>> ce.fused_activation, ce.targets, ce.task
    ('softmax', 'labels_or_probs', 'multiclass')
    >>> loss, d_logits = ce(np.zeros((2, 2)), np.array([0, 1]))  # logits (n, k), labels (n,)
    >>> round(float(loss), 4), d_logits.tolist()
    (0.6931, [[-0.25, 0.25], [0.25, -0.25]])
    """

    name: str
    fn: Callable[..., Any]
    fused_activation: str | None
    targets: str
    task: str = "regression"

    def __post_init__(self):
        if self.task not in ("multiclass", "multilabel", "regression"):
            msg = f"task must be 'multiclass', 'multilabel' or 'regression', got {self.task!r}"
            raise ValueError(msg)

    def __call__(self, outputs, targets, *, xp=None, sample_weight=None, check=True):
        """``self.fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)``:
        the loss (a 0-d array) and its gradient with respect to ``outputs`` (n, k), same
        shape; ``targets`` as the row's function takes them, ``sample_weight`` of shape (n,)."""
        return self.fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)


#: The loss table: name to :class:`Loss` row.
#:
#: :meta hide-value:
LOSSES: dict[str, Loss] = {
    row.name: row
    for row in (
        Loss("mse", mse, "identity", "same_shape"),
        Loss("mae", mae, "identity", "same_shape"),
        Loss("huber", huber, "identity", "same_shape"),
        Loss("cross_entropy", cross_entropy, "softmax", "labels_or_probs", "multiclass"),
        Loss("binary_cross_entropy", binary_cross_entropy, "sigmoid", "same_shape", "multilabel"),
        Loss("poisson_nll", poisson_nll, None, "same_shape"),
    )
}


def check_targets(loss, n_outputs, targets, *, dtype, device=None, xp=None, sample_weight=None):
    """Validate a whole data set's targets (and sample weights) for ``loss``, before
    training, without a temporary the size of the data.

    What the loss would check on each batch (targets' kind, shape and dtype, finite
    values, the label range, weights that are finite, non-negative and not all zero)
    is checked once over all ``n`` rows: shapes against a broadcast ``(n, n_outputs)``
    view of one row, values block by block (about
    :data:`arraymlp.kernels.reference.CHECK_BLOCK` elements a block), the blocks'
    answers combined on the device and read back once per kind of check. A custom
    loss (not a row of :data:`LOSSES`) is called on each block with zero outputs.

    Parameters
    ----------
    loss : Loss or str
    n_outputs : int
        Width ``k`` of the model's outputs.
    targets : array, shape (n,), (n, k) or labels (n,)
    dtype, device
        The outputs' dtype and device.
    xp : namespace, optional
        Taken from ``targets`` when omitted.
    sample_weight : array, shape (n,), optional

    Raises
    ------
    ValueError
        With the message the loss itself gives for the same problem.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> am.losses.check_targets("cross_entropy", 3, np.array([0, 2, 1]), dtype=np.float64)
    >>> am.losses.check_targets("cross_entropy", 3, np.array([0, 3, 1]), dtype=np.float64)
    Traceback (most recent call last):
    ...
    ValueError: cross_entropy: labels must lie in [0, 3) for outputs with k=3 classes; found labels in [0, 3]
    """
    loss = get_loss(loss)
    xp = _namespace(targets, None, sample_weight, xp)
    n, name = _shape(targets)[0] if targets.ndim else 0, loss.name
    if LOSSES.get(name) is not loss:
        _check_custom(loss, n, n_outputs, targets, xp, dtype, device, sample_weight)
        return
    outputs = xp.broadcast_to(xp.zeros((1, n_outputs), dtype=dtype, device=device), (n, n_outputs))
    _check_outputs(name, outputs, xp)
    if loss.targets == "same_shape":
        if loss.fn is binary_cross_entropy and not xp.isdtype(targets.dtype, "real floating"):
            # integer or boolean 0/1 labels: the shape on one row, the values block by block
            # (a wrong shape is named with the whole data's shapes, not that one row's)
            shape = _shape(targets)
            if shape != (n, n_outputs) and not (n_outputs == 1 and shape == (n,)):
                msg = f"{name}: targets shape {shape} does not match outputs shape {(n, n_outputs)}"
                raise ValueError(msg)
            _same_shape_targets(name, outputs[:1, ...], targets[:1, ...], xp, check=False, binary=True)
            _check_binary_labels(name, targets, xp)
        else:
            _same_shape_targets(name, outputs, targets, xp, check=False)
            _check_finite(name, targets, xp)
    else:
        _class_targets(name, outputs, targets, xp, check=True, convert=False)
    _check_weights(name, sample_weight, outputs, xp)


def _check_weights(name, sample_weight, outputs, xp):
    """The checks of :func:`_sample_weight` over a whole data set's weights, block by
    block, with one read of the combined sum and minimum."""
    if sample_weight is None:
        return
    _weight_shape(name, sample_weight, outputs, xp)
    acc = _acc(outputs.dtype, xp) or outputs.dtype
    total = lo = None
    for i, j in row_blocks(_shape(sample_weight)[0], block_rows(sample_weight)):
        w = xp.astype(sample_weight[i:j], acc)
        b_total, b_lo = xp.sum(w), xp.min(w)
        total = b_total if total is None else total + b_total
        lo = b_lo if lo is None else xp.minimum(lo, b_lo)
    _weight_values(name, float(total), float(lo))


def _check_custom(loss, n, k, targets, xp, dtype, device, sample_weight):
    """A custom loss checks its own targets: it is called on each block of rows with
    zero outputs (one block's worth of memory). The weights are checked as a whole
    first, so that a block of zero weights is not mistaken for all-zero weights."""
    one_row = xp.zeros((1, k), dtype=dtype, device=device)
    _check_weights(loss.name, sample_weight, xp.broadcast_to(one_row, (n, k)), xp)
    for i, j in row_blocks(n, block_rows(one_row)):
        w = None if sample_weight is None else sample_weight[i:j]
        loss.fn(xp.zeros((j - i, k), dtype=dtype, device=device), targets[i:j, ...], xp=xp, sample_weight=w)


def get_loss(name: str | Loss) -> Loss:
    """Look up a row of :data:`LOSSES` (a :class:`Loss` is returned as is); unknown
    names raise a :class:`ValueError` listing the known ones.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> mse = am.get_loss("mse")
    >>> am.get_loss(mse) is mse, mse.fused_activation
    (True, 'identity')
    >>> loss, d_outputs = mse(np.array([[1.0], [3.0]]), np.array([[0.0], [1.0]]))
    >>> float(loss), d_outputs.tolist()
    (2.5, [[1.0], [2.0]])
    """
    if isinstance(name, Loss):
        return name
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        msg = f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}"
        raise ValueError(msg) from None
