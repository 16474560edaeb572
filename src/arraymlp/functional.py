"""The public pure functions: forward beside backward, over plain arrays.

For people running their own training loops on their own arrays. Every function takes
the array namespace as the keyword ``xp`` (taken from the arrays when omitted; resolve
it once per call of your own and pass it down), uses only functions of the Array API
standard, and never mutates its inputs. The one exception says so in its name:
:func:`dense_sgd_update` updates the parameters it is given, as an optimiser's step
does.

Each function runs the kernel set of its namespace (:func:`arraymlp.kernels.kernels_for`):
the reference kernels of :mod:`arraymlp.kernels.reference`, which define the maths, or
a backend's faster overrides of them, which give the same values.

The activation table :data:`ACTIVATIONS` holds one row per activation: its forward,
its backward, and whether the backward reads the activation's input or its output
(whichever is cheaper), so that forward and derivative cannot drift apart.
"""

from __future__ import annotations

from ._docs import fill
from .kernels import kernels_for
from .kernels.reference import (
    ACTIVATIONS,
    ELU_ALPHA,
    LEAKY_SLOPE,
    Activation,
    _ns,
    dropout_backward,
    dropout_forward,
    elu,
    gelu,
    get_activation,
    identity,
    layer_norm_backward,
    layer_norm_forward,
    leaky_relu,
    log_softmax,
    logsumexp,
    relu,
    sigmoid,
    silu,
    softplus,
    tanh,
)

__all__ = [
    "ACTIVATIONS",
    "ELU_ALPHA",
    "LEAKY_SLOPE",
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

# ----------------------------------------------------------------------------- dense
@fill
def dense_forward(x, W, b=None, *, xp=None):
    """Affine map ``y = x @ W + b``.

    Parameters
    ----------
    x : array, shape (n, n_in)
    W : array, shape (n_in, n_out)
    b : array, shape (n_out,), optional
        Omitted for a layer without bias.
    {xp}

    Returns
    -------
    y : array, shape (n, n_out)
    """
    xp = _ns(x, xp)
    return kernels_for(xp).dense_forward(x, W, b, xp)


@fill
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
    {xp}

    Returns
    -------
    dx : array of shape (n, n_in), or None when ``need_dx`` is false
    dW : array, shape (n_in, n_out)
    db : array of shape (n_out,), or None when ``has_bias`` is false
    """
    xp = _ns(dy, xp)
    return kernels_for(xp).dense_backward(x, W, dy, has_bias, need_dx, xp)


@fill
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
    return kernels_for(xp).dense_sgd_update(x, dy, W, b, lr, l2, xp)


# ------------------------------------------------------------------------ activations
@fill
def softmax(x, *, xp=None):
    """Softmax over the last axis, ``y_ij = exp(x_ij) / sum_k exp(x_ik)``.

    Shifted by the row maximum, so it is finite for any finite logits.

    Parameters
    ----------
    x : array, shape (..., k)
        Logits.
    {xp}

    Returns
    -------
    y : array, shape of ``x``
        Non-negative, each row summing to 1.
    """
    xp = _ns(x, xp)
    return kernels_for(xp).softmax(x, xp=xp)


@fill
def activation_forward(name, x, *, xp=None, inplace=False):
    """Apply activation ``name`` to ``x``, keeping what the backward pass needs.

    Parameters
    ----------
    name : str or Activation
        A key of :data:`ACTIVATIONS` (or a row of it).
    x : array, shape (n, d)
        Any shape for the elementwise activations; softmax and log_softmax act on the
        last axis.
    {xp}
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
    act = kernels_for(xp).activation(get_activation(name))
    if inplace and act.forward_inplace is not None:
        y = act.forward_inplace(x, xp)
    else:
        y = act.forward(x, xp=xp)
    return y, (y if act.saves == "output" else x)


@fill
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
    {xp}
    inplace : bool, default False
        Hand ``dy`` over; ``dx`` is then computed into it where possible. With
        ``False``, ``dy`` is never modified.

    Returns
    -------
    dx : array, shape of ``dy``
        Gradient with respect to the activation's input.
    """
    xp = _ns(dy, xp)
    act = kernels_for(xp).activation(get_activation(name))
    if inplace and act.backward_inplace is not None:
        return act.backward_inplace(dy, saved, xp)
    return act.backward(dy, saved, xp)
