"""scikit-learn estimators over arraymlp models: :class:`MLPClassifier`, :class:`MLPRegressor`.

They follow the parameters, fitted attributes and stopping rules of
:class:`sklearn.neural_network.MLPClassifier` / ``MLPRegressor``, and train on the
backend and device of the arrays they are given (or of ``backend=`` / ``device=``):
NumPy in gives NumPy out; torch, CuPy or array-api-strict in gives the same kind of
array out, on the same device. ``sklearn.config_context(array_api_dispatch=...)`` does
not change where the work runs (the inputs decide); it only makes ``predict`` on an
input of another namespace raise, as scikit-learn's array-API estimators do, instead of
converting.

The objective is scikit-learn's, term for term. For a mini-batch ``B`` with sample
weights ``w`` (all ones by default)::

    J_B = sum_{i in B} w_i l_i / sum_{i in B} w_i  +  alpha / (2 sum_{i in B} w_i) * sum ||W||^2

with ``l_i`` the per-sample loss summed over the outputs: half the squared error for
regression, the cross-entropy of the softmax for multiclass, the binary cross-entropy
of the sigmoid (summed over the labels) for binary and multilabel problems. The L2 term
therefore maps to the model's ``l2`` as ``l2 = alpha / sum_{i in B} w_i`` per batch.

Class labels of any kind are encoded on the host: when ``y`` is not a NumPy array it is
copied to the host once per ``fit`` (labels are small next to ``X``), encoded against
:attr:`classes_`, and the codes are moved to the model's device. ``sample_weight`` is
likewise copied to the host once (the per-batch weight sums feed the L2 scaling without
a device round trip) and once to the device.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import re
import types
import warnings
from numbers import Integral, Real
from typing import Any

import array_api_compat
import numpy as np
from sklearn import get_config
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_array, check_consistent_length, check_is_fitted, validate_data

from . import ensemble as _ensemble
from . import functional as F
from ._backend import (
    as_csr,
    backend_name,
    canonical_device,
    device_of,
    index_dtype,
    is_sparse,
    quiet_overflow,
    resolve_backend,
    slice_rows,
    sparse_device,
    sparse_namespace,
    sparse_values,
    take_rows,
    to_backend,
    to_numpy,
)
from .functional import ACTIVATIONS
from .kernels import kernels_for
from .layers import Dense
from .losses import Loss, binary_cross_entropy, cross_entropy, mse, poisson_nll
from .model import MLP
from .optim import LBFGS, SGD, Adagrad, Adam, AdamW, RMSprop, get_optimizer
from .training import DivergenceError, _l2_over_batch, _params_finite, _Run, _run_epoch

__all__ = ["MLPClassifier", "MLPRegressor"]

_SOLVERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lbfgs")
_LEARNING_RATES = ("constant", "invscaling", "adaptive")
_ACTIVATION_ALIASES = {"logistic": "sigmoid"}
_DTYPES = ("float16", "float32", "float64")
# the hidden activations: scikit-learn's four names and the rest of arraymlp's table
_HIDDEN_ACTIVATIONS = ("identity", "logistic", "tanh", "relu",
                       *(a for a in ACTIVATIONS if a not in ("identity", "tanh", "relu", "softmax", "log_softmax")))
_PREDICT_CHUNK = 65536  # rows per forward pass at inference, to bound the activations' memory
_MIN_ADAPTIVE_LR = 1e-6  # as scikit-learn's adaptive schedule: stop once the rate falls this low


# ------------------------------------------------------------------------------ losses
# scikit-learn's per-sample losses are sums over the outputs; arraymlp's table rows are
# means over them. These rows rescale value and gradient by the output count (and by
# 1/2 for the squared error) so that the optimised objective is scikit-learn's.
def _half_squared_error(outputs, targets, *, xp=None, sample_weight=None):
    """scikit-learn's pair for regression. The gradient is that of ``l_i = 1/2 sum_j
    (o_ij - t_ij)^2`` (weighted mean over the batch), ``(o - t) w_i / sum w``; the value
    is what scikit-learn reports as ``loss_``, half the squared error averaged over the
    samples *and* the outputs (the same number for one output, ``1/n_outputs`` of the
    objective for several). ``loss_``, ``loss_curve_`` and the ``tol`` test then match
    scikit-learn's. A line search needs the objective itself: multiply the value by
    the number of outputs."""
    value, grad = mse(outputs, targets, xp=xp, sample_weight=sample_weight)
    return value * 0.5, grad * (0.5 * int(outputs.shape[1]))


def _summed_binary_log_loss(outputs, targets, *, xp=None, sample_weight=None):
    """Binary cross-entropy from logits summed over the labels, weighted mean over the batch."""
    value, grad = binary_cross_entropy(outputs, targets, xp=xp, sample_weight=sample_weight)
    c = float(int(outputs.shape[1]))
    return value * c, grad * c


def _half_poisson_deviance(outputs, targets, *, xp=None, sample_weight=None):
    """scikit-learn's ``loss="poisson"`` on log-rates ``o`` (the rate is ``exp(o)``):
    ``l_i = sum_j (exp(o_ij) - t_ij o_ij + t_ij log t_ij - t_ij)``, weighted mean over the
    batch; gradient ``(exp(o) - t) w_i / sum w``. The ``t log t - t`` terms do not
    depend on the model; they make the value scikit-learn's half Poisson deviance."""
    value, grad = poisson_nll(outputs, targets, xp=xp, sample_weight=sample_weight)
    xp = array_api_compat.array_namespace(outputs) if xp is None else xp
    c = float(int(outputs.shape[1]))
    t = targets
    tlogt = xp.where(t > 0, t * xp.log(xp.where(t > 0, t, xp.ones_like(t))), xp.zeros_like(t))
    per_sample = xp.sum(tlogt - t, axis=1)
    if sample_weight is None:
        const = xp.sum(per_sample) / float(int(t.shape[0]))
    else:
        w = xp.astype(sample_weight, t.dtype)
        const = xp.sum(w * per_sample) / xp.sum(w)
    return value * c + const, grad * c


def _half_squared_error_sum(outputs, targets, *, xp=None, sample_weight=None):
    """:func:`_half_squared_error` with the value its gradient belongs to, half the squared
    error summed over the outputs (weighted mean over the batch): L-BFGS' line search needs
    the two to agree."""
    value, grad = _half_squared_error(outputs, targets, xp=xp, sample_weight=sample_weight)
    return value * int(outputs.shape[1]), grad


_HALF_SQUARED_ERROR_SUM = Loss("half_squared_error_sum", _half_squared_error_sum, "identity", "same_shape")
_POISSON = Loss("half_poisson_deviance", _half_poisson_deviance, None, "same_shape")
_REGRESSION_LOSSES = ("squared_error", "poisson")

_LOSSES = {
    "identity": Loss("half_squared_error", _half_squared_error, "identity", "same_shape"),
    "softmax": Loss("cross_entropy", cross_entropy, "softmax", "labels_or_probs"),
    "sigmoid": Loss("binary_log_loss", _summed_binary_log_loss, "sigmoid", "same_shape"),
}
# scikit-learn's names for the output activations (``out_activation_``)
_OUT_ACTIVATION_NAMES = {"identity": "identity", "softmax": "softmax", "sigmoid": "logistic"}


# ------------------------------------------------------------------------------ arrays
def _is_device_array(x: Any) -> bool:
    """True for an Array API array that is not a NumPy array (torch, CuPy, array-api-strict, ...)."""
    return (
        x is not None
        and not isinstance(x, np.ndarray)
        and not isinstance(x, np.generic)
        and array_api_compat.is_array_api_obj(x)
        and not _is_sparse(x)
    )


def _is_sparse(x: Any) -> bool:
    """A scipy.sparse (or cupyx.scipy.sparse) matrix or array, or a sparse torch tensor."""
    return is_sparse(x)


def _host(x: Any) -> Any:
    """``x`` as a host (NumPy) array when it is a device array; anything else unchanged."""
    return to_numpy(x) if _is_device_array(x) else x


def _move(x, xp, device):
    """``x`` on namespace ``xp`` and ``device`` (a no-op when it is there already)."""
    if array_api_compat.array_namespace(x) is xp and device_of(x) == device:
        return x
    return to_backend(x, xp, device=device)


def _float_dtype(xp, name: str):
    return getattr(xp, name)


def _check_device_X(X, xp, estimator_name: str) -> None:
    """Shape and dtype checks for a device array, with scikit-learn's wording."""
    shape = tuple(int(s) for s in X.shape)
    if X.ndim != 2:
        msg = (
            f"Expected 2D array, got {X.ndim}D array instead: shape={shape}. Reshape your data "
            "either using array.reshape(-1, 1) if your data has a single feature or "
            "array.reshape(1, -1) if it contains a single sample."
        )
        raise ValueError(msg)
    if shape[0] == 0:
        msg = f"Found array with 0 sample(s) (shape={shape}) while a minimum of 1 is required by {estimator_name}."
        raise ValueError(msg)
    if shape[1] == 0:
        msg = f"Found array with 0 feature(s) (shape={shape}) while a minimum of 1 is required by {estimator_name}."
        raise ValueError(msg)
    if xp.isdtype(X.dtype, "complex floating"):
        msg = "Complex data not supported"
        raise ValueError(msg)
    if not (xp.isdtype(X.dtype, "real floating") or xp.isdtype(X.dtype, "integral") or X.dtype == xp.bool):
        msg = f"X has dtype {X.dtype}; a real numeric array is required"
        raise TypeError(msg)


def _check_finite(a, xp, what: str) -> None:
    if kernels_for(xp).all_finite(a, xp):
        return
    if bool(xp.any(xp.isnan(a))):
        msg = f"Input {what} contains NaN."
    else:
        msg = f"Input {what} contains infinity or a value too large for dtype({str(a.dtype).rsplit('.', 1)[-1]!r})."
    raise ValueError(msg)


class _Input:
    """A validated ``X``: the array, its namespace and device, whether it came from the host
    (NumPy, lists, pandas, ...), and the floating dtype results are returned in."""

    __slots__ = ("x", "xp", "device", "host", "out_dtype")

    def __init__(self, x, xp, device, host, out_dtype):
        self.x, self.xp, self.device, self.host, self.out_dtype = x, xp, device, host, out_dtype


class _Diverged(Exception):
    """Internal: the parameters stopped being finite at ``epoch`` (0-based), ``step``
    (0-based batch, or None when found after the epoch's last step)."""

    def __init__(self, epoch: int, step: int | None):
        super().__init__(epoch, step)
        self.epoch, self.step = epoch, step


# ------------------------------------------------------------------------------ pickling
def _init_bounds(config: dict) -> list[tuple[int, int, float]]:
    """``(fan_in, fan_out, a)`` per layer of scikit-learn's initialisation:
    ``a = sqrt(f / (fan_in + fan_out))``, ``f = 2`` for a sigmoid hidden activation, else 6."""
    factor = 2.0 if config["activation"] == "sigmoid" else 6.0
    sizes = config["sizes"]
    return [(i, o, math.sqrt(factor / (i + o))) for i, o in zip(sizes[:-1], sizes[1:])]


def _draw_initial_weights(config: dict, rs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Host float64 ``(W, b)`` per layer, drawn from ``rs`` (a ``numpy.random.RandomState``)
    in scikit-learn's order and rule: ``W ~ U(-a, a)`` of shape ``(fan_in, fan_out)``, then
    ``b ~ U(-a, a)`` of shape ``(fan_out,)``, layer by layer."""
    return [(rs.uniform(-a, a, (i, o)), rs.uniform(-a, a, o)) for i, o, a in _init_bounds(config)]


def _build_model(config: dict, *, seed: int, backend: str, device: Any, init: list | None = None) -> MLP:
    """An MLP initialised as scikit-learn initialises its perceptrons (:func:`_init_bounds`):
    from ``init`` (host ``(W, b)`` per layer, :func:`_draw_initial_weights`) when given,
    else drawn by the same rule from the model's host stream.

    ``config`` holds ``sizes``, ``activation``, ``output_activation``, ``dropout`` and
    ``dtype``, and ``members`` (K) for an ensemble: member ``i`` is then the model of
    seed ``arraymlp.ensemble.member_seeds(seed, K)[i]``, and the K are stacked."""
    k = int(config.get("members", 1))
    if k > 1:
        plain = {key: v for key, v in config.items() if key != "members"}
        members = [_build_model(plain, seed=s, backend=backend, device=device) for s in _ensemble.member_seeds(seed, k)]
        return MLP.stack(members)
    # "zeros" skips drawing weights that are replaced below
    model = MLP(config["sizes"], activation=config["activation"], output_activation=config["output_activation"],
                dropout=config["dropout"], init="zeros", dtype=config["dtype"], backend=backend, device=device,
                seed=seed)
    dense = [p for layer, p in zip(model.layers, model.params) if isinstance(layer, Dense)]
    for j, (p, (n_in, n_out, bound)) in enumerate(zip(dense, _init_bounds(config))):
        if init is None:
            p["W"] = model.rng.uniform((n_in, n_out), bound, model.dtype)
            p["b"] = model.rng.uniform((n_out,), bound, model.dtype)
        else:
            p["W"], p["b"] = (model.xp.asarray(a, dtype=model.dtype, device=model.device) for a in init[j])
    return model


def _lbfgs_members(config: dict, seed: int, backend: str, device: Any) -> MLP:
    """The ensemble of ``solver="lbfgs", n_members=K``: member ``i`` is the model that the
    one-member estimator builds with ``random_state=member_seeds(seed, K)[i]`` (its weights
    drawn from that ``RandomState`` first, as scikit-learn draws them, then its own
    seed), so that member ``i`` trains as that estimator does."""
    plain = {key: v for key, v in config.items() if key != "members"}
    members = []
    for s in _ensemble.member_seeds(seed, int(config["members"])):
        rs = np.random.RandomState(s)
        init = _draw_initial_weights(plain, rs)
        members.append(_build_model(plain, seed=int(rs.randint(np.iinfo(np.int32).max)), backend=backend,
                                    device=device, init=init))
    return MLP.stack(members)


def _model_state(model: MLP, config: dict) -> dict:
    """A picklable snapshot of a model: its configuration, host copies of the parameters,
    and the generator's state. (arraymlp's own model files never use pickle; this serves
    scikit-learn's contract that estimators pickle.)"""
    return {
        "config": dict(config),
        "seed": model.seed,
        "backend": model.backend,
        "device": None if model.backend == "numpy" else model.device,
        "params": [{k: np.array(to_numpy(v), copy=True) for k, v in p.items()} for p in model.params],
        "rng": model.rng.get_state(),
    }


def _model_from_state(state: dict) -> MLP:
    model = _build_model(state["config"], seed=state["seed"], backend=state["backend"], device=state["device"])
    xp, dev = model.xp, model.device
    model.params = [
        {k: xp.asarray(np.array(v, copy=True), dtype=model.dtype, device=dev) for k, v in p.items()}
        for p in state["params"]
    ]
    model.rng.set_state(state["rng"])
    return model


def _optimizer_state(opt) -> dict:
    sd = opt.state_dict()
    if sd["state"] is not None:
        sd["state"] = [
            {key: {slot: to_numpy(a) if array_api_compat.is_array_api_obj(a) else a for slot, a in st.items()}
             for key, st in layer.items()}
            for layer in sd["state"]
        ]
    return sd


def _optimizer_from_state(sd: dict):
    opt = get_optimizer(sd["optimizer"], **sd["hyperparameters"])
    opt.load_state_dict(sd)
    return opt


# ------------------------------------------------------------------------------ docs
_PARAMETERS_DOC = """
    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default=(100,)
        Width of each hidden layer; ``()`` gives a model without hidden layers.
    activation : str, default="relu"
        Hidden activation: scikit-learn's ``"identity"``, ``"logistic"`` (the sigmoid),
        ``"tanh"``, ``"relu"``, or any key of :data:`arraymlp.ACTIVATIONS`.
    solver : {"adam", "sgd", "adamw", "rmsprop", "adagrad", "lbfgs"}, default="adam"
        Mini-batch optimiser, or ``"lbfgs"``: full-batch L-BFGS
        (:class:`arraymlp.optim.LBFGS`) on the whole objective, on the training
        backend and device, stopping as scikit-learn's does (``tol`` on the largest
        gradient entry, a relative decrease of the loss below ~2.2e-9, ``max_iter``,
        ``max_fun``). ``batch_size``, ``shuffle``, the learning-rate settings and
        ``early_stopping`` do not apply to it, nor ``partial_fit``.
    alpha : float, default=1e-4
        L2 penalty with scikit-learn's scaling, ``alpha / (2 sum w_B) * sum ||W||^2`` per
        batch (``sum w_B`` the batch's weight sum, its size without weights), on every
        weight matrix and no bias. With ``solver="adamw"`` it is the decoupled weight
        decay instead (``W <- W - lr * alpha * W`` each step, no term in the loss).
    batch_size : int or "auto", default="auto"
        Samples per mini-batch; ``"auto"`` is ``min(200, n_samples)``. Values above the
        sample count are clipped.
    learning_rate : {"constant", "invscaling", "adaptive"}, default="constant"
        Step-size schedule, used by ``solver="sgd"`` only, as in scikit-learn:
        ``"invscaling"`` sets ``learning_rate_init / (t_ + 1) ** power_t`` after each
        epoch; ``"adaptive"`` divides the rate by 5 whenever the stopping criterion is met
        and stops once it falls below 1e-6.
    learning_rate_init : float, default=1e-3
        Initial step size.
    power_t : float, default=0.5
        Exponent of the ``"invscaling"`` schedule.
    max_iter : int, default=200
        Maximum number of epochs (passes over the data); for ``solver="lbfgs"``, of
        iterations.
    shuffle : bool, default=True
        Draw a new sample order every epoch.
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, shuffling, dropout and the ``early_stopping`` split.
        An int gives identical results on every fit. With ``solver="lbfgs"`` the initial
        weights are the ones scikit-learn's MLP draws for the same ``random_state``.
    tol : float, default=1e-4
        Training stops when the training loss (or, with ``early_stopping``, the
        validation score) has not improved by at least ``tol`` for ``n_iter_no_change``
        consecutive epochs. With ``solver="lbfgs"``: when no gradient entry exceeds
        ``tol`` in absolute value.
    verbose : bool, default=False
        Print the loss of each epoch.
    warm_start : bool, default=False
        Continue from the current parameters on the next :meth:`fit`.
    momentum : float, default=0.9
        Momentum of ``solver="sgd"``, in [0, 1].
    nesterovs_momentum : bool, default=True
        Nesterov momentum for ``solver="sgd"`` (when ``momentum > 0``).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified for binary
        classifiers), stop when its score stops improving, and keep the parameters of
        the best epoch.
    validation_fraction : float, default=0.1
        Fraction held out by ``early_stopping``, in (0, 1); ignored without it. The
        split is stratified for binary classifiers, as in scikit-learn.
    beta_1, beta_2 : float, default=0.9, 0.999
        Moment decay rates of ``solver="adam"`` / ``"adamw"``, in [0, 1).
    epsilon : float, default=1e-8
        Denominator term of ``"adam"``, ``"adamw"``, ``"rmsprop"`` and ``"adagrad"``.
    n_iter_no_change : int or np.inf, default=10
        Epochs without improvement by ``tol`` before stopping; ``np.inf`` never stops
        before ``max_iter``.
    max_fun : int, default=15000
        Maximum number of loss evaluations of ``solver="lbfgs"`` (never exceeded);
        ignored by the other solvers.
    backend : str, module or None, default=None
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"`` or a namespace
        module to train on. ``None`` follows the namespace of ``X`` (NumPy for lists,
        pandas and other array-likes).
    device : optional, default=None
        Device to train on (``"cuda:1"``, a CuPy or array-api-strict device, ...).
        ``None``: the device of ``X`` when the backend is ``X``'s, else the backend's
        default.
    dtype : {"float32", "float64", "float16"} or None, default=None
        Dtype of the parameters and of all computation. ``None`` follows the data, as
        scikit-learn does: float32 ``X`` trains float32 parameters, float64 ``X``
        float64 ones, and any other ``X`` (integers, booleans, float16, lists) float64.
        On a GPU, pass float32 data (or ``dtype="float32"``): float64 runs many times
        slower there. Results are returned in the input's floating dtype (float64 for
        integer and non-float NumPy inputs, as in scikit-learn).
    dropout : float, default=0.0
        Dropout probability after each hidden activation, in [0, 1); training only.
    n_members : int, default=1
        Members of a deep ensemble trained at once (``arraymlp.MLP(..., ensemble=K)``):
        member ``i`` starts from seed ``arraymlp.ensemble.member_seeds(seed, K)[i]``
        (``seed`` drawn from ``random_state``), all members see the same batches, and the
        predictions combine them (probabilities or outputs averaged). Each member
        follows the stopping rules (``tol``, ``early_stopping``) on its own and is
        frozen once it stops; the fit ends when all have stopped. With ``solver="lbfgs"``
        the members are K L-BFGS runs side by side, member ``i`` exactly the one-member
        estimator of ``random_state=member_seeds(seed, K)[i]``. 1 is one perceptron,
        exactly as before; see docs/sklearn.md for what differs with more.
"""

_ATTRIBUTES_DOC = """
    loss_ : float
        Training loss of the last epoch (the objective above, L2 term included); with
        ``solver="lbfgs"``, the objective at the final parameters. With
        ``n_members > 1``, the mean of ``member_loss_``.
    loss_curve_ : list of float
        Training loss of each epoch (sample-count weighted mean of the batch losses);
        with ``solver="lbfgs"``, the objective after each iteration. With
        ``n_members > 1``, the mean over the members that trained in the epoch.
    best_loss_ : float, ndarray of shape (n_members,), or None
        Lowest training loss so far (each member's with ``n_members > 1``); ``None``
        with ``early_stopping``.
    validation_scores_ : list or None
        With ``early_stopping``, the score on the held-out data after each epoch: a
        float per epoch, or with ``n_members > 1`` an ndarray of shape (n_members,) per
        epoch (NaN for members that had stopped). ``None`` without ``early_stopping``.
    best_validation_score_ : float, ndarray of shape (n_members,), or None
        Best of ``validation_scores_`` (each member's with ``n_members > 1``); ``None``
        without ``early_stopping``.
    n_iter_ : int or ndarray of shape (n_members,)
        Epochs (``solver="lbfgs"``: iterations) run by the last call of ``fit`` (1 after
        each ``partial_fit``), as in scikit-learn; with ``n_members > 1``, each
        member's (members stop on their own).
    t_ : int
        Training samples seen, over all epochs.
    coefs_ : list of arrays
        Weight matrices, ``coefs_[i]`` of shape (n_units_i, n_units_i+1), on the model's
        backend and device; with ``n_members=K > 1``, the stacked (K, n_units_i,
        n_units_i+1) arrays of the members (``coefs_[i][k]`` is member k's).
    intercepts_ : list of arrays
        Bias vectors, ``intercepts_[i]`` of shape (n_units_i+1,); with ``n_members=K > 1``,
        the stacked (K, 1, n_units_i+1) arrays (``intercepts_[i][k, 0]`` is member k's).
    member_loss_ : ndarray of shape (n_members,)
        Only with ``n_members > 1``: each member's training loss in the last epoch it
        trained in (``loss_`` is their mean).
    member_loss_curve_ : list of ndarray of shape (n_members,)
        Only with ``n_members > 1``: each member's training loss per epoch, NaN after
        it stopped.
    n_features_in_ : int
        Number of features seen in :meth:`fit`.
    feature_names_in_ : ndarray of shape (n_features,)
        Column names, when ``X`` had string column names.
    n_layers_ : int
        Number of layers, input and output included.
    n_outputs_ : int
        Number of output units.
    out_activation_ : str
        Output activation in scikit-learn's names: ``"softmax"``, ``"logistic"`` or
        ``"identity"``.
    model_ : arraymlp.MLP
        The trained model: call it on arrays of its backend, save it with
        :mod:`arraymlp.io`, or check its gradients with :func:`arraymlp.gradcheck`.
"""


# ------------------------------------------------------------------------------ base
class _ParamList(list):
    """``coefs_`` / ``intercepts_``: a list of the model's arrays whose item assignment
    writes through to the model."""

    def __init__(self, est, name: str, key: str):
        super().__init__(p[key] for p in est.model_.params if "W" in p)
        self._est, self._name, self._key = est, name, key

    def __setitem__(self, i, value):
        if isinstance(i, slice):
            idx = range(len(self))[i]
            values = list(value)
            if len(values) != len(idx):
                msg = f"{self._name} has {len(idx)} arrays in that slice, got {len(values)}"
                raise ValueError(msg)
            for j, v in zip(idx, values):
                self[j] = v
            return
        j = range(len(self))[i]  # negative indices; IndexError when out of range
        super().__setitem__(j, self._est._set_param(self._name, self._key, j, value))


class _Interval(Interval):
    """scikit-learn's :class:`~sklearn.utils._param_validation.Interval` that refuses bools.

    ``True`` is an ``Integral`` and a ``Real`` to Python, but not a learning rate nor a
    layer width; the estimators have always refused it where a number is expected.
    """

    def is_satisfied_by(self, val):
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)


def _check_parameter_values(est) -> None:
    """The checks that one row of ``_parameter_constraints`` cannot state.

    Parameters
    ----------
    est : _BaseMLP
        An estimator whose parameters have passed the table.

    Raises
    ------
    ValueError
        When a hidden layer size is not a positive int, when ``validation_fraction`` is 0
        with ``early_stopping=True``, or when ``backend`` names no known backend.
    """
    est._hidden_sizes()
    if est.early_stopping and est.validation_fraction <= 0:  # as scikit-learn: 0 is fine without early stopping
        msg = ("validation_fraction must be a real number in (0, 1) when early_stopping=True, "
               f"got {est.validation_fraction!r}")
        raise ValueError(msg)
    if est.backend is not None:
        resolve_backend(est.backend)


def _stochastic(est) -> bool:
    """Whether the solver is a mini-batch one (``partial_fit`` exists only for those, as in scikit-learn)."""
    if est.solver == "lbfgs":
        msg = f"partial_fit is only available for stochastic optimizers. {est.solver} is not stochastic."
        raise AttributeError(msg)
    return True


class _BaseMLP(BaseEstimator):
    """Shared parameters, validation, training loop and pickling of the two estimators."""

    _estimator_type_name = "MLP"

    # one row per constructor argument, checked by ``_validate_params`` at the start of
    # ``fit`` / ``partial_fit``; ``_check_parameter_values`` adds what a row cannot say
    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like", _Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_HIDDEN_ACTIVATIONS))],
        "solver": [StrOptions(set(_SOLVERS))],
        "alpha": [_Interval(Real, 0, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), _Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions(set(_LEARNING_RATES))],
        "learning_rate_init": [_Interval(Real, 0, None, closed="neither")],
        "power_t": [_Interval(Real, 0, None, closed="left")],
        "max_iter": [_Interval(Integral, 1, None, closed="left")],
        "max_fun": [_Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "tol": [_Interval(Real, 0, None, closed="left")],
        "verbose": ["boolean", Integral],
        "warm_start": ["boolean"],
        "momentum": [_Interval(Real, 0, 1, closed="both")],
        "nesterovs_momentum": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [_Interval(Real, 0, 1, closed="left")],
        "beta_1": [_Interval(Real, 0, 1, closed="left")],
        "beta_2": [_Interval(Real, 0, 1, closed="left")],
        "epsilon": [_Interval(Real, 0, None, closed="neither")],
        "n_iter_no_change": [_Interval(Integral, 1, None, closed="left"), Options(Real, {math.inf})],
        "backend": [None, str, types.ModuleType],
        "device": "no_validation",  # a name or a device object of the backend, checked on use
        "dtype": [None, StrOptions(set(_DTYPES))],
        "dropout": [_Interval(Real, 0, 1, closed="left")],
        "n_members": [_Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        hidden_layer_sizes=(100,),
        activation="relu",
        *,
        solver="adam",
        alpha=1e-4,
        batch_size="auto",
        learning_rate="constant",
        learning_rate_init=1e-3,
        power_t=0.5,
        max_iter=200,
        shuffle=True,
        random_state=None,
        tol=1e-4,
        verbose=False,
        warm_start=False,
        momentum=0.9,
        nesterovs_momentum=True,
        early_stopping=False,
        validation_fraction=0.1,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        n_iter_no_change=10,
        max_fun=15000,
        backend=None,
        device=None,
        dtype=None,
        dropout=0.0,
        n_members=1,
    ):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.dropout = dropout
        self.n_members = n_members

    # ------------------------------------------------------------------ hyper-parameters
    def _hidden_sizes(self) -> list[int]:
        h = self.hidden_layer_sizes
        sizes = [h] if isinstance(h, numbers.Integral) else list(h) if hasattr(h, "__iter__") else None
        if sizes is None or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in sizes):
            msg = f"hidden_layer_sizes must be a positive int or a sequence of positive ints, got {h!r}"
            raise ValueError(msg)
        return [int(s) for s in sizes]

    def _activation_name(self) -> str:
        return _ACTIVATION_ALIASES.get(self.activation, self.activation)

    def _loss_row(self) -> Loss:
        """The objective's row: by the output activation."""
        return _LOSSES[self._output_activation]

    def _objective_row(self) -> Loss:
        """The row whose value and gradient belong to one objective (for L-BFGS): the
        squared error's value summed over the outputs, every other row as it is."""
        row = self._loss_row()
        return _HALF_SQUARED_ERROR_SUM if row is _LOSSES["identity"] else row

    def _out_activation_name(self) -> str:
        """``out_activation_``: scikit-learn's name of the output activation."""
        return _OUT_ACTIVATION_NAMES[self._output_activation]

    def _check_hyperparameters(self) -> None:
        """Validate the constructor arguments; raise a ValueError naming the first invalid one.

        The table :attr:`_parameter_constraints` covers each argument on its own
        (scikit-learn's ``InvalidParameterError``, a ValueError), then the checks that one
        table row cannot state (:func:`_check_parameter_values`).
        """
        self._validate_params()
        _check_parameter_values(self)

    def _make_optimizer(self):
        if self.solver == "lbfgs":
            return LBFGS(max_iter=int(self.max_iter), max_fun=int(self.max_fun), tol=float(self.tol))
        lr = float(self.learning_rate_init)
        if self.solver == "sgd":
            return SGD(lr, momentum=float(self.momentum),
                       nesterov=bool(self.nesterovs_momentum) and self.momentum > 0)
        if self.solver == "adam":
            return Adam(lr, betas=(float(self.beta_1), float(self.beta_2)), eps=float(self.epsilon))
        if self.solver == "adamw":
            return AdamW(lr, betas=(float(self.beta_1), float(self.beta_2)), eps=float(self.epsilon),
                         weight_decay=float(self.alpha))
        if self.solver == "rmsprop":
            return RMSprop(lr, eps=float(self.epsilon))
        return Adagrad(lr, eps=float(self.epsilon))

    # ------------------------------------------------------------------ inputs
    def _check_X(self, X, *, reset: bool) -> _Input:
        """Validate ``X`` (feature count and names included) without moving it."""
        device_sparse = _is_sparse(X) and sparse_namespace(X) is not resolve_backend("numpy")
        if _is_device_array(X) or device_sparse:  # cupyx.scipy.sparse: untested without a CUDA device
            xp = sparse_namespace(X) if device_sparse else array_api_compat.array_namespace(X)
            _check_device_X(X, xp, type(self).__name__)
            validate_data(self, X, reset=reset, skip_check_array=True)
            out = X.dtype if xp.isdtype(X.dtype, "real floating") else None
            return _Input(X, xp, sparse_device(X) if device_sparse else device_of(X), False, out)
        # scipy.sparse stays sparse (CSC and COO become CSR on the way to the model)
        X = validate_data(self, X, reset=reset, dtype=(np.float64, np.float32), accept_sparse=("csr", "csc", "coo"))
        xp = sparse_namespace(X) if _is_sparse(X) else array_api_compat.array_namespace(X)
        return _Input(X, xp, "cpu", True, X.dtype)

    def _to_model(self, inp: _Input, xp, device, dtype):
        """The validated input on the model's namespace, device and dtype, checked finite
        (a sparse ``X`` as a CSR matrix on its own library, which only ever computes the
        first layer's products)."""
        if _is_sparse(inp.x):
            if xp is not inp.xp:
                msg = (f"a sparse X computes on {backend_name(inp.xp)} (scipy.sparse on NumPy, "
                       f"cupyx.scipy.sparse on CuPy, a sparse tensor on torch), but the model is on "
                       f"{backend_name(xp)}; leave backend= unset, or densify X")
                raise TypeError(msg)
            with quiet_overflow(xp):  # values beyond the dtype's range are reported just below
                x = as_csr(inp.x, dtype)
            _check_finite(sparse_values(x), xp, "X")
            return x
        x = _move(inp.x, xp, device)
        if x.dtype != dtype:
            with quiet_overflow(xp):  # values beyond the dtype's range are reported just below
                x = xp.astype(x, dtype, copy=False)
        _check_finite(x, xp, "X")
        return x

    def _check_sample_weight(self, sample_weight, n: int):
        """Sample weights as a float64 host array of shape (n,), or None."""
        if sample_weight is None:
            return None
        if isinstance(sample_weight, numbers.Number):
            return np.full(n, float(sample_weight))
        sw = check_array(_host(sample_weight), ensure_2d=False, dtype=np.float64, input_name="sample_weight")
        if sw.ndim != 1:
            msg = f"Sample weights must be 1D array or scalar, got shape {sw.shape}"
            raise ValueError(msg)
        if sw.shape != (n,):
            msg = f"sample_weight.shape == {sw.shape}, expected {(n,)}!"
            raise ValueError(msg)
        if np.any(sw < 0):
            msg = "sample_weight must be non-negative"
            raise ValueError(msg)
        if not np.any(sw > 0):
            msg = "sample_weight is all zero; at least one sample needs a positive weight"
            raise ValueError(msg)
        return sw

    def _placement(self, inp: _Input, first: bool):
        """Namespace and device to train on."""
        if not first:
            return self.model_.xp, self.model_.device
        xp = resolve_backend(self.backend) if self.backend is not None else inp.xp
        if self.device is not None:
            return xp, canonical_device(xp, self.device)
        if xp is inp.xp:
            return xp, inp.device
        return xp, canonical_device(xp)

    def _training_dtype(self, inp: _Input, xp, first: bool) -> str:
        """The name of the dtype to train in: the fitted model's on a later fit, else
        ``dtype=`` when given, else the data's (float32 and float64 kept, anything else
        float64)."""
        if not first:
            return self.model_.dtype_name
        if self.dtype is not None:
            return self.dtype
        if inp.out_dtype is not None and inp.out_dtype == getattr(inp.xp, "float32", None):
            return "float32"
        return "float64"

    # ------------------------------------------------------------------ training
    def _fit(self, X, y, sample_weight=None, *, incremental: bool, classes=None):
        self._check_hyperparameters()
        if incremental and self.early_stopping:
            msg = "partial_fit does not support early_stopping=True"
            raise ValueError(msg)
        first = not hasattr(self, "model_") or (not self.warm_start and not incremental)
        if y is None:
            msg = f"{type(self).__name__} requires y to be passed, but the target y is None."
            raise ValueError(msg)
        inp = self._check_X(X, reset=first)
        n = int(inp.x.shape[0])
        xp, device = self._placement(inp, first)
        self._dtype_name = self._training_dtype(inp, xp, first)
        dtype = _float_dtype(xp, self._dtype_name)
        sw_host = self._check_sample_weight(sample_weight, n)
        y_dev, strata = self._prepare_targets(y, n, xp, device, dtype, first=first, incremental=incremental,
                                              classes=classes, sw_host=sw_host)
        x_dev = self._to_model(inp, xp, device, dtype)

        rs = check_random_state(self.random_state)
        if first:
            self._initialize(int(inp.x.shape[1]), xp, device, rs)
        elif (self.model_.ensemble or 1) != int(self.n_members):
            msg = (f"n_members={self.n_members!r} but the fitted model has {self.model_.ensemble or 1} members; "
                   "refit without warm_start to change n_members")
            raise ValueError(msg)
        elif int(self.model_.n_outputs) != self._n_output_units:
            msg = (f"y has {self._n_output_units} outputs but the fitted model has {self.model_.n_outputs}; "
                   "refit without warm_start to change the targets")
            raise ValueError(msg)
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._make_optimizer()
            self._lr = float(self.learning_rate_init)
            self._no_improvement_count = 0
        split_seed = int(rs.randint(np.iinfo(np.int32).max))
        self._train(x_dev, y_dev, sw_host, strata, xp, device, dtype, incremental=incremental, split_seed=split_seed)
        return self

    def _initialize(self, n_features: int, xp, device, rs) -> None:
        """The model, with the seed of its own stream (batches, dropout) drawn from ``rs``;
        with ``solver="lbfgs"`` its weights are drawn from ``rs`` before, as scikit-learn
        draws them."""
        out_act = self._output_activation
        sizes = [n_features, *self._hidden_sizes(), self._n_output_units]
        self._model_config = {
            "sizes": sizes,
            "activation": self._activation_name(),
            "output_activation": None if out_act == "identity" else out_act,
            "dropout": float(self.dropout),
            "dtype": self._dtype_name,
        }
        if int(self.n_members) > 1:
            self._model_config["members"] = int(self.n_members)
            self.member_loss_ = np.full(int(self.n_members), np.nan)
            self.member_loss_curve_ = []
        else:
            self.__dict__.pop("member_loss_", None)
            self.__dict__.pop("member_loss_curve_", None)
        # lbfgs (one model): the weights drawn first, as scikit-learn draws them, so that the same
        # random_state gives scikit-learn's fit; the mini-batch solvers draw from the model's stream
        same_as_sklearn = self.solver == "lbfgs" and int(self.n_members) == 1
        start = {"init": _draw_initial_weights(self._model_config, rs)} if same_as_sklearn else {}
        seed = int(rs.randint(np.iinfo(np.int32).max))
        if self.solver == "lbfgs" and int(self.n_members) > 1:  # member i: the one-member fit of its seed
            self.model_ = _lbfgs_members(self._model_config, seed, backend_name(xp), device)
        else:
            self.model_ = _build_model(self._model_config, seed=seed, backend=backend_name(xp), device=device,
                                       **start)
        self.n_outputs_ = self._n_output_units
        self.n_layers_ = len(sizes)
        self.out_activation_ = self._out_activation_name()
        self.n_iter_ = 0
        self.t_ = 0
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
            self.best_loss_ = np.inf

    def _train(self, x, y, sw_host, strata, xp, device, dtype, *, incremental: bool, split_seed: int) -> None:
        if self.solver == "lbfgs":
            self._train_lbfgs(x, y, sw_host, xp, device, dtype)
            return
        if self.model_.ensemble is not None:
            self._train_members(x, y, sw_host, strata, xp, device, dtype, incremental=incremental,
                                split_seed=split_seed)
            return
        model = self.model_
        lossfn = self._loss_row()
        n_all = int(x.shape[0])
        x_val = y_val = w_val = None
        early = bool(self.early_stopping)
        self._best_params = None
        if early:
            x, y, sw_host, x_val, y_val, w_val = self._split_validation(
                x, y, sw_host, strata, xp, device, dtype, n_all=n_all, split_seed=split_seed)
        n = int(x.shape[0])
        w_dev = None if sw_host is None else xp.asarray(sw_host, dtype=dtype, device=device)
        batch = min(200, n) if self.batch_size == "auto" else max(1, min(int(self.batch_size), n))
        epochs = 1 if incremental else int(self.max_iter)
        self.n_iter_ = 0  # as scikit-learn: the epochs of this call (1 for partial_fit)
        run = self._batch_run(x, y, w_dev, sw_host, lossfn, xp, batch=batch)
        # NumPy would warn on overflows that the divergence checks report
        with quiet_overflow(xp), self._on_divergence(early, n):
            for _ in range(epochs):
                total, _ = _run_epoch(run, self.n_iter_, self._lr)
                self.n_iter_ += 1
                if self._end_iteration(n, total / n, incremental, early, (x_val, y_val, w_val), xp):
                    break
            if not _params_finite(model.params, xp):  # the last step's update overflowed
                raise _Diverged(self.n_iter_ - 1, None)
        if early and self._best_params is not None:
            model.params = self._best_params
        self._best_params = None

    def _train_members(self, x, y, sw_host, strata, xp, device, dtype, *, incremental: bool,
                       split_seed: int) -> None:
        """The epochs of an ensemble (``n_members > 1``), one :func:`arraymlp.ensemble.partial_fit`
        each, so that scikit-learn's rules run between epochs as for one member, member by
        member: each member's ``tol`` test (on its training loss, or with
        ``early_stopping`` on its validation score), its adaptive rate, its stop. A
        stopped member is frozen (its parameters no longer change) while the others train
        on; the fit ends when every member has stopped, or after ``max_iter`` epochs.
        Every batch's L2 coefficient is ``alpha`` over that batch's size or weight sum,
        and a batch of zero weights takes no step, as for one member. With
        ``early_stopping`` each member ends with the parameters of its best validation
        score."""
        k = int(self.model_.ensemble)
        early = bool(self.early_stopping)
        val = (None, None, None)
        if early:
            x, y, sw_host, *val = self._split_validation(x, y, sw_host, strata, xp, device, dtype,
                                                         n_all=int(x.shape[0]), split_seed=split_seed)
        n = int(x.shape[0])
        w_dev = None if sw_host is None else xp.asarray(sw_host, dtype=dtype, device=device)
        batch = min(200, n) if self.batch_size == "auto" else max(1, min(int(self.batch_size), n))
        alpha = float(self.alpha)
        coupled = alpha > 0 and self.solver != "adamw"  # adamw decays the weights itself
        epochs = 1 if incremental else int(self.max_iter)
        self._member_bookkeeping(k, early)
        self.n_iter_ = np.zeros(k, dtype=np.int64)  # as scikit-learn: the epochs of this call, per member
        active = np.ones(k, dtype=bool)
        self._best_params = None
        self._best_kept = np.zeros(k, dtype=bool)  # the members whose best parameters this fit has kept
        # NumPy would warn on overflows that the divergence error reports
        with quiet_overflow(xp), self._members_diverging():
            for epoch in range(epochs):
                history = _ensemble.partial_fit(
                    self.model_, x, y, loss=self._loss_row(), optimizer=self._optimizer, lr=self._member_lr(),
                    batch_size=batch, shuffle=bool(self.shuffle), l2=alpha if coupled else 0.0,
                    sample_weight=w_dev, metrics=[], _active=active, _l2_per_batch=coupled, _host_weight=sw_host)
                self.n_iter_ += active
                stop = self._end_member_iteration(n, np.asarray(history.loss[-1], dtype=np.float64), active,
                                                  early, val, xp)
                if incremental:
                    break
                active = active & ~stop
                if not active.any():
                    break
                if epoch + 1 == epochs:
                    warnings.warn(
                        f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                        f"optimization hasn't converged yet (members {np.flatnonzero(active).tolist()}).",
                        ConvergenceWarning,
                        stacklevel=4,
                    )
        if early and self._best_params is not None:  # each member back to its best epoch of this fit
            self.model_.params = _ensemble._keep_best(self.model_.params, self._best_params, ~self._best_kept, xp,
                                                      self.model_.params[0]["W"])
        self._best_params = None

    def _member_bookkeeping(self, k: int, early: bool) -> None:
        """The per-member state, shape (K,), from what the last fit (or ``_initialize``)
        left: the no-improvement counts, best loss or validation score, each member's rate
        of the adaptive schedule."""
        def per_member(v, fill, dtype):
            v = fill if v is None else v
            return np.array(np.broadcast_to(np.asarray(v, dtype=dtype), (k,)))

        self._no_improvement_count = per_member(self._no_improvement_count, 0, np.int64)
        if early:
            self.best_validation_score_ = per_member(self.best_validation_score_, -np.inf, np.float64)
            if self.validation_scores_ is None:
                self.validation_scores_ = []
        else:
            self.best_loss_ = per_member(self.best_loss_, np.inf, np.float64)
        if self.solver == "sgd" and self.learning_rate == "adaptive":
            self._lr = per_member(self._lr, float(self.learning_rate_init), np.float64)
        if getattr(self, "member_loss_", None) is None:
            self.member_loss_ = np.full(k, np.nan)
        if getattr(self, "member_loss_curve_", None) is None:
            self.member_loss_curve_ = []

    def _member_lr(self):
        """The rate of this epoch: one float, or K (the adaptive schedule's, per member)."""
        return float(self._lr) if np.ndim(self._lr) == 0 else [float(v) for v in self._lr]

    @contextlib.contextmanager
    def _members_diverging(self):
        """A member whose loss stops being finite ends the fit with a DivergenceError in
        scikit-learn's words, naming the estimator's epoch and the members."""
        try:
            yield
        except DivergenceError as exc:
            found = re.search(r"members (\[[^\]]*\])", str(exc))
            who = f"members {found.group(1)}" if found else "some members"
            first = ("The training loss became non-finite" if exc.params_finite else
                     "Solver produced non-finite parameter weights")
            epoch = int(np.max(self.n_iter_)) + 1
            msg = (f"{first}. The input data may contain large values and need to be preprocessed. (Training "
                   f"diverged at epoch {epoch}, step {exc.step + 1}: the loss of {who} is not "
                   "finite. Standardise the inputs with sklearn.preprocessing.StandardScaler or lower "
                   "learning_rate_init.)")
            raise DivergenceError(msg, epoch=epoch - 1, step=exc.step, params_finite=exc.params_finite) from exc

    def _end_member_iteration(self, n: int, losses, trained, early: bool, val: tuple, xp):
        """:meth:`_end_iteration` of an ensemble, member by member: ``losses`` (K,) are the
        members' training losses of the epoch, ``trained`` (K bools) says which members
        trained in it (a frozen member's entries are NaN). Returns which members stop here
        (their ``tol`` test failed ``n_iter_no_change`` times and no adaptive rate is left
        to lower)."""
        self.t_ += n
        row = np.where(trained, losses, np.nan)
        self.member_loss_ = np.where(trained, losses, self.member_loss_)
        self.member_loss_curve_.append(row)
        self.loss_ = float(np.mean(self.member_loss_))
        self.loss_curve_.append(float(np.mean(row[trained])))
        if self.verbose:
            print(f"Iteration {int(np.max(self.n_iter_))}, loss = {self.loss_curve_[-1]:.8f} "
                  f"(members: {np.array2string(row, precision=8)})", flush=True)
        if early:
            x_val, y_val, w_val = val
            out = self._forward_chunks(x_val, xp, None)  # (K, n_val, m): each member's outputs
            scores = np.array([self._device_score(out[i, ...], y_val, w_val, xp) if trained[i] else np.nan
                               for i in range(int(out.shape[0]))])
            self.validation_scores_.append(scores)
            if self.verbose:
                print(f"Validation score: {np.array2string(scores, precision=6)}", flush=True)
            best = self.best_validation_score_
            with np.errstate(invalid="ignore"):
                better = trained & (scores >= best + self.tol)  # NaN counts as no improvement
                improved = trained & (scores > best)
            self._no_improvement_count = np.where(better, 0, self._no_improvement_count + (trained & ~better))
            if improved.any():
                self.best_validation_score_ = np.where(improved, scores, best)
                self._best_params = _ensemble._keep_best(self.model_.params, self._best_params, improved, xp,
                                                         self.model_.params[0]["W"])
                self._best_kept |= improved
        else:
            with np.errstate(invalid="ignore"):
                worse = trained & (losses > self.best_loss_ - self.tol)  # scikit-learn's test
                lower = trained & (losses < self.best_loss_)
            self._no_improvement_count = np.where(trained, np.where(worse, self._no_improvement_count + 1, 0),
                                                  self._no_improvement_count)
            self.best_loss_ = np.where(lower, losses, self.best_loss_)
        if self.solver == "sgd" and self.learning_rate == "invscaling":
            self._lr = float(self.learning_rate_init) / (self.t_ + 1) ** float(self.power_t)
        stop = np.zeros(trained.shape[0], dtype=bool)
        for i in np.flatnonzero(trained & (self._no_improvement_count > self.n_iter_no_change)):
            if self._should_stop(early, member=int(i)):
                stop[i] = True
            else:
                self._no_improvement_count[i] = 0
        return stop

    def _end_iteration(self, n: int, loss: float, incremental: bool, early: bool, val: tuple, xp) -> bool:
        """scikit-learn's bookkeeping after an epoch of ``n`` samples with training loss
        ``loss``: the curve, verbose line, no-improvement count, invscaling rate and the
        max_iter warning; whether the epochs end here."""
        self.t_ += n
        self.loss_ = loss
        self.loss_curve_.append(loss)
        if self.verbose:
            print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}", flush=True)
        self._update_no_improvement(early, *val, xp)
        if self.solver == "sgd" and self.learning_rate == "invscaling":
            self._lr = float(self.learning_rate_init) / (self.t_ + 1) ** float(self.power_t)
        if self._no_improvement_count > self.n_iter_no_change:
            if self._should_stop(early):
                return True
            self._no_improvement_count = 0
        if incremental:
            return True
        if self.n_iter_ == self.max_iter:
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                "optimization hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return False

    @contextlib.contextmanager
    def _on_divergence(self, early: bool, n: int):
        """Around the epochs: parameters that stopped being finite end the run as
        :meth:`_diverged` says."""
        try:
            yield
        except _Diverged as diverged:
            self._diverged(diverged, early, n)

    def _diverged(self, diverged: "_Diverged", early: bool, n: int) -> None:
        """The parameters stopped being finite: with early stopping, keep the best epoch's
        parameters and warn (scikit-learn finishes such a run); otherwise raise a
        ValueError with scikit-learn's message."""
        where = f"epoch {diverged.epoch + 1}" + ("" if diverged.step is None else f", step {diverged.step + 1}")
        if diverged.step is not None:  # the epoch it broke off is recorded, non-finite
            self.n_iter_ += 1
            self.t_ += n
            self.loss_ = math.nan
            self.loss_curve_.append(self.loss_)
            if early:
                self.validation_scores_.append(math.nan)
        if early and self._best_params is not None:
            best = int(np.nanargmax(self.validation_scores_)) + 1
            warnings.warn(
                f"Training diverged at {where}: the parameters stopped being finite. The estimator keeps "
                f"the parameters of epoch {best}, the best validation score. Standardise the inputs "
                "(sklearn.preprocessing.StandardScaler) or lower learning_rate_init.",
                ConvergenceWarning,
                stacklevel=5,
            )
            return
        msg = (
            "Solver produced non-finite parameter weights. The input data may contain large values and "
            f"need to be preprocessed. (Training diverged at {where}; the parameters are not finite. "
            "Standardise the inputs with sklearn.preprocessing.StandardScaler or lower learning_rate_init.)"
        )
        raise DivergenceError(msg, epoch=diverged.epoch, step=diverged.step or 0, params_finite=False)

    def _train_lbfgs(self, x, y, sw_host, xp, device, dtype) -> None:
        """Full-batch L-BFGS on the objective over all of ``(x, y)``: ``l2 = alpha / sum w``.

        As scikit-learn's, ``early_stopping`` does not apply, and reaching ``max_iter`` or
        ``max_fun`` (or a line search that finds no lower point) gives a ConvergenceWarning.
        """
        if float(self.dropout) > 0:
            msg = (f"solver='lbfgs' needs a deterministic objective, but dropout={self.dropout!r} draws a new "
                   "mask at each evaluation; set dropout=0.0 or use a stochastic solver")
            raise ValueError(msg)
        model, opt, lossfn = self.model_, self._optimizer, self._objective_row()
        w_dev = None if sw_host is None else xp.asarray(sw_host, dtype=dtype, device=device)
        l2 = float(self.alpha) / (int(x.shape[0]) if sw_host is None else float(sw_host.sum()))
        if model.ensemble is not None:
            self._train_lbfgs_members(x, y, w_dev, l2, xp)
            return

        def fun(params):
            return model._loss_and_grads(x, y, lossfn, xp=xp, sample_weight=w_dev, l2=l2)

        self.n_iter_ = 0
        with quiet_overflow(xp):
            try:
                for it in opt.iterate(fun, model.params):
                    self.n_iter_ += 1
                    self.loss_curve_.append(it.loss)
                    if self.verbose:
                        print(f"Iteration {self.n_iter_}, loss = {it.loss:.8f}", flush=True)
            except FloatingPointError as exc:
                msg = (f"{exc}. Standardise the inputs (sklearn.preprocessing.StandardScaler) or check the "
                       "initial parameters.")
                raise DivergenceError(msg, epoch=0, step=0) from exc
        self.loss_ = opt.loss
        if self.best_loss_ is not None:
            self.best_loss_ = min(self.best_loss_, opt.loss)
        if self.verbose:
            print(f"L-BFGS stopped: {opt.message}", flush=True)
        if opt.status in ("max_iter", "max_fun", "line_search"):
            warnings.warn(
                f"lbfgs failed to converge after {self.n_iter_} iteration(s): {opt.message}. Increase max_iter "
                "(or max_fun), or scale the data (sklearn.preprocessing.StandardScaler).",
                ConvergenceWarning,
                stacklevel=4,
            )

    def _train_lbfgs_members(self, x, y, w_dev, l2: float, xp) -> None:
        """:meth:`_train_lbfgs` of ``n_members=K``: K L-BFGS runs side by side
        (:meth:`arraymlp.optim.LBFGS.iterate_members`), member ``i`` the run of the
        one-member estimator from its start, each stopping on its own rule; one batched
        evaluation of all members per round. ``n_iter_``, ``member_loss_``, ``best_loss_``
        have one entry per member, ``member_loss_curve_`` one row (K,) per iteration (NaN
        for the members that had stopped)."""
        model, opt, lossfn, k = self.model_, self._optimizer, self._objective_row(), int(self.model_.ensemble)
        w = None if w_dev is None else xp.broadcast_to(xp.reshape(w_dev, (1, -1)), (k, int(w_dev.shape[0])))
        fun = _ensemble._lbfgs_objective(model, x, y, lossfn, w, l2, xp)
        self._member_bookkeeping(k, False)
        curve: list = []
        with quiet_overflow(xp):
            try:
                for done in opt.iterate_members(fun, model.params):
                    for i, it in done:
                        while len(curve) < it.n_iter:
                            curve.append(np.full(k, np.nan))
                        curve[it.n_iter - 1][i] = it.loss
            except FloatingPointError as exc:
                msg = (f"{exc}. Standardise the inputs (sklearn.preprocessing.StandardScaler) or check the "
                       "initial parameters.")
                raise DivergenceError(msg, epoch=0, step=0) from exc
        self.n_iter_ = opt.n_iter.copy()
        self.member_loss_curve_.extend(curve)
        self.loss_curve_.extend(float(np.nanmean(row)) for row in curve)
        self.member_loss_ = opt.loss.copy()
        self.loss_ = float(np.mean(self.member_loss_))
        self.best_loss_ = np.minimum(self.best_loss_, opt.loss)
        if self.verbose:
            for i, message in enumerate(opt.message):
                print(f"L-BFGS member {i} stopped after {opt.n_iter[i]} iteration(s): {message}", flush=True)
        failed = [i for i, status in enumerate(opt.status) if status in ("max_iter", "max_fun", "line_search")]
        if failed:
            warnings.warn(
                f"lbfgs failed to converge (members {failed}): {opt.message[failed[0]]}. Increase max_iter "
                "(or max_fun), or scale the data (sklearn.preprocessing.StandardScaler).",
                ConvergenceWarning,
                stacklevel=5,
            )

    def _split_validation(self, x, y, sw_host, strata, xp, device, dtype, *, n_all: int, split_seed: int):
        """Split off early stopping's validation set; return the training and validation parts."""
        idx = np.arange(n_all)
        try:
            train_idx, val_idx = train_test_split(idx, test_size=self.validation_fraction,
                                                  random_state=split_seed, stratify=strata)
        except ValueError as exc:
            msg = f"early_stopping could not split off a validation set: {exc}"
            raise ValueError(msg) from exc
        if val_idx.shape[0] < 2:
            msg = ("The validation set is too small. Increase 'validation_fraction' "
                   "or the size of your dataset.")
            raise ValueError(msg)
        w_val = None
        tr = xp.asarray(train_idx, dtype=index_dtype(xp), device=device)
        va = xp.asarray(val_idx, dtype=index_dtype(xp), device=device)
        x_val, y_val = take_rows(x, va, xp), xp.take(y, va, axis=0)
        x, y = take_rows(x, tr, xp), xp.take(y, tr, axis=0)
        if sw_host is not None:
            w_val = xp.asarray(sw_host[val_idx], dtype=dtype, device=device)
            sw_host = sw_host[train_idx]
        return x, y, sw_host, x_val, y_val, w_val

    def _batch_run(self, x, y, w_dev, sw_host, lossfn, xp, *, batch: int) -> _Run:
        """The epochs' settings for the mini-batch loop of :mod:`arraymlp.training`, in
        scikit-learn's terms: the L2 coefficient is ``alpha`` over each batch's size (or
        weight sum), coupled into the gradient for every solver but AdamW (which decays
        the weights itself); a batch whose weights are all zero is skipped; the update is
        always ``opt.step`` on the gathered gradients."""
        alpha = float(self.alpha)
        coupled_l2 = alpha > 0 and self.solver != "adamw"
        return _Run(model=self.model_, x=x, y=y, sample_weight=w_dev, val=None, lossfn=lossfn, xp=xp,
                    opt=self._optimizer, schedule=None, callbacks=[], batch_size=batch, shuffle=bool(self.shuffle),
                    l2=alpha if coupled_l2 else 0.0, l2_rule=_l2_over_batch if coupled_l2 else None,
                    host_weight=sw_host, skip_zero_weight=True, fuse=False, on_divergence=self._divergence)

    def _divergence(self, run, value: float, epoch: int, batch: int) -> Exception | None:
        """A non-finite loss at ``batch`` of ``epoch``: as scikit-learn, training goes on
        (its gradient may well be finite) until the parameters themselves stop being
        finite, which :meth:`_on_divergence` then handles."""
        if _params_finite(run.model.params, run.xp):
            return None
        return _Diverged(epoch, batch)

    def _should_stop(self, early: bool, member: int | None = None) -> bool:
        """scikit-learn's reaction to ``n_iter_no_change`` epochs without improvement: the
        adaptive schedule divides the rate by 5 (and goes on) until it falls to 1e-6;
        anything else stops. ``member``: that member of an ensemble, with its own rate."""
        what = "Validation score" if early else "Training loss"
        who = "" if member is None else f"Member {member}: "
        message = (f"{who}{what} did not improve more than tol={self.tol:f} for "
                   f"{self.n_iter_no_change} consecutive epochs.")
        if self.solver == "sgd" and self.learning_rate == "adaptive":
            lr = self._lr if member is None else self._lr[member]
            if lr > _MIN_ADAPTIVE_LR:
                lr /= 5.0
                if member is None:
                    self._lr = lr
                else:
                    self._lr[member] = lr
                if self.verbose:
                    print(f"{message} Setting learning rate to {lr:f}", flush=True)
                return False
            message += " Learning rate too small. Stopping."
        if self.verbose:
            print(message, flush=True)
        return True

    def _update_no_improvement(self, early, x_val, y_val, w_val, xp) -> None:
        if early:
            score = self._device_score(self._forward_all(x_val, xp), y_val, w_val, xp)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}", flush=True)
            if not score >= self.best_validation_score_ + self.tol:  # NaN counts as no improvement
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_params = [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in self.model_.params]
            return
        if self.loss_curve_[-1] > self.best_loss_ - self.tol:
            self._no_improvement_count += 1
        else:
            self._no_improvement_count = 0
        if self.loss_curve_[-1] < self.best_loss_:
            self.best_loss_ = self.loss_curve_[-1]

    # ------------------------------------------------------------------ inference
    def _forward_all(self, x, xp, *, logits: bool = False):
        """Outputs (probabilities for classifiers, or logits) of a validated batch, in chunks."""
        model = self.model_
        if model.ensemble is not None:  # the members' outputs, combined
            return self._combine_members(self._forward_chunks(x, xp, None), xp, logits=logits)
        upto = len(model.layers) - 1 if logits and model.output_activation is not None else None
        return self._forward_chunks(x, xp, upto)

    def _forward_chunks(self, x, xp, upto):
        model = self.model_
        axis = 0 if model.ensemble is None else 1
        n = int(x.shape[0])
        if n <= _PREDICT_CHUNK:
            return model.forward(x, training=False, xp=xp, upto=upto, keep=False)[0]
        outs = []
        for i in range(0, n, _PREDICT_CHUNK):
            chunk = slice_rows(x, i, min(i + _PREDICT_CHUNK, n))
            outs.append(model.forward(chunk, training=False, xp=xp, upto=upto, keep=False)[0])
        return outs[0] if len(outs) == 1 else xp.concat(outs, axis=axis)

    def _combine_members(self, out, xp, *, logits: bool):
        """The members' outputs (K, n, m) as one model's: their mean (the regressor's)."""
        return xp.mean(out, axis=0)

    def _infer(self, X, method: str, *, logits: bool = False):
        """Validate ``X``, run the model, and return ``(outputs, input)``; outputs stay on the
        model's backend."""
        check_is_fitted(self, "model_")
        inp = self._check_X(X, reset=False)
        model = self.model_
        if (inp.xp is not model.xp or inp.device != model.device) and self.backend is None \
                and self.device is None and get_config()["array_api_dispatch"]:
            fit_name = backend_name(model.xp)
            got = backend_name(inp.xp)
            detail = (f"Array namespaces used during fit ({fit_name}) and {method} ({got}) differ."
                      if inp.xp is not model.xp else
                      f"Devices used during fit ({model.device}) and {method} ({inp.device}) differ.")
            msg = (
                f"Inputs passed to {type(self).__name__}.{method}() must use the same namespace and the "
                f"same device as those passed to fit(). {detail} Move X with "
                f"arraymlp.to_backend(X, {fit_name!r}, device=...) or refit on X's namespace."
            )
            raise ValueError(msg)
        x = self._to_model(inp, model.xp, model.device, model.dtype)
        return self._forward_all(x, model.xp, logits=logits), inp

    def _deliver(self, a, inp: _Input, *, floating: bool):
        """Move a result from the model's backend to the caller's namespace and device, in the
        input's floating dtype when ``floating``."""
        if inp.host:
            out = np.asarray(to_numpy(a))
            if floating:
                out = out.astype(inp.out_dtype, copy=False)
            return out
        out = _move(a, inp.xp, inp.device)
        if floating:
            target = inp.out_dtype if inp.out_dtype is not None else _float_dtype(inp.xp, self.model_.dtype_name)
            if out.dtype != target:
                out = inp.xp.astype(out, target)
        return out

    # ------------------------------------------------------------------ fitted views
    def _param_view(self, name: str, key: str) -> "_ParamList":
        if "model_" not in self.__dict__:
            msg = f"{type(self).__name__} has no attribute {name!r} before fit"
            raise AttributeError(msg)
        return _ParamList(self, name, key)

    def _set_param(self, name: str, key: str, i: int, value: Any) -> Any:
        """Write ``value`` into the ``i``-th dense layer's ``key`` parameter, converted
        to the model's namespace, device and dtype; return the stored array."""
        model = self.model_
        dense = [p for p in model.params if "W" in p]
        target = dense[i][key]
        xp = model.xp
        try:
            arr = to_backend(value, xp, device=model.device)
        except TypeError:
            arr = xp.asarray(np.asarray(value), device=model.device)
        if tuple(arr.shape) != tuple(target.shape):
            msg = f"{name}[{i}] must have shape {tuple(target.shape)}, got {tuple(arr.shape)}"
            raise ValueError(msg)
        dense[i][key] = xp.astype(arr, model.dtype, copy=True)
        return dense[i][key]

    @property
    def coefs_(self) -> list:
        """Weight matrices, ``coefs_[i]`` of shape (n_units_i, n_units_i+1).

        The arrays are the model's own: in-place edits (``coefs_[0] *= 0``), item
        assignment (``coefs_[-1] = W``) and assigning a whole list change the model, as
        in scikit-learn; assigned arrays are converted to its namespace, device and dtype.
        """
        return self._param_view("coefs_", "W")

    @coefs_.setter
    def coefs_(self, values) -> None:
        self._param_view("coefs_", "W")[:] = values

    @property
    def intercepts_(self) -> list:
        """Bias vectors, ``intercepts_[i]`` of shape (n_units_i+1,); assignable like
        :attr:`coefs_`."""
        return self._param_view("intercepts_", "b")

    @intercepts_.setter
    def intercepts_(self, values) -> None:
        self._param_view("intercepts_", "b")[:] = values

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        if state.get("model_") is not None:
            rule = getattr(state["model_"], "ensemble_optimizer_", None)
            if rule is not None and rule.state is not None:  # the members' optimiser state
                state["_members_optimizer"] = {"t": rule.t, "state": [
                    {key: {slot: to_numpy(a) for slot, a in st.items()} for key, st in layer.items()}
                    for layer in rule.state]}
            state["model_"] = _model_state(state["model_"], state["_model_config"])
        if state.get("_optimizer") is not None:
            state["_optimizer"] = _optimizer_state(state["_optimizer"])
        state.pop("_best_params", None)
        state.pop("_best_kept", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        if isinstance(state.get("model_"), dict):
            state["model_"] = _model_from_state(state["model_"])
        if isinstance(state.get("_optimizer"), dict):
            state["_optimizer"] = _optimizer_from_state(state["_optimizer"])
        members = state.pop("_members_optimizer", None)
        if members is not None:  # the members' optimiser state, so that partial_fit goes on from it
            model = state["model_"]
            xp, like = model.xp, model.params[0]["W"]
            rule = _ensemble._MemberUpdate(state["_optimizer"], model.ensemble, xp, like, lr=None, momentum=None,
                                           weight_decay=None, betas=None)
            rule.t = members["t"]
            rule.state = [{key: {slot: xp.asarray(np.array(a, copy=True), device=model.device)
                                 for slot, a in st.items()} for key, st in layer.items()}
                          for layer in members["state"]]
            model.ensemble_optimizer_ = rule
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.array_api_support = True
        tags.input_tags.sparse = True
        return tags


# ------------------------------------------------------------------------------ classifier
class MLPClassifier(ClassifierMixin, _BaseMLP):
    __doc__ = (
        """Multilayer-perceptron classifier with scikit-learn's interface, on any array backend.

    Minimises the cross-entropy of a softmax output (multiclass), of one sigmoid unit
    (binary, as scikit-learn does), or of one sigmoid per label (multilabel ``y``: a 2-D
    0/1 indicator matrix), plus scikit-learn's scaled L2 term. Labels may be of any
    kind (ints, strings, ...); they are encoded on the host against :attr:`classes_`.
"""
        + _PARAMETERS_DOC
        + """
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels (a NumPy array on the host), in the order of ``predict_proba``'s
        columns; ``arange(n_labels)`` for multilabel ``y``.
"""
        + _ATTRIBUTES_DOC
        + """
    See Also
    --------
    MLPRegressor
    sklearn.neural_network.MLPClassifier

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from arraymlp.sklearn import MLPClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=300,
    ...                     random_state=0).fit(X, y)
    >>> clf.predict(X[:3])
    array([0, 0, 0])
"""
    )

    _output_activation = "softmax"
    _n_output_units = 0

    def fit(self, X, y, sample_weight=None):
        """Train on ``(X, y)`` from fresh parameters (or from the current ones with ``warm_start``).

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
            NumPy / array-like (trains with NumPy unless ``backend=`` says otherwise) or a
            torch, CuPy or array-api-strict array (trains there, on its device).
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels of any kind, or a 0/1 indicator matrix for multilabel problems.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights.

        Returns
        -------
        self : MLPClassifier
        """
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(_stochastic)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch over ``(X, y)``, keeping the parameters and optimiser state.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
        classes : array-like of shape (n_classes,), optional
            All labels that will ever appear; required on the first call (except for a
            multilabel ``y``). Later calls may omit it; if they pass it, it must hold
            the same labels.
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : MLPClassifier
        """
        if not hasattr(self, "model_") and classes is None and not _is_indicator(_host(y)):
            msg = "classes must be passed on the first call to partial_fit."
            raise ValueError(msg)
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    # ------------------------------------------------------------------ targets
    def _prepare_targets(self, y, n, xp, device, dtype, *, first, incremental, classes, sw_host):
        y = check_array(_host(y), ensure_2d=False, dtype=None, input_name="y", ensure_all_finite=True)
        check_consistent_length(np.empty((n, 0)), y)
        if y.ndim == 2 and y.shape[1] == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected. Please change the shape "
                "of y to (n_samples,), for example using ravel().",
                DataConversionWarning,
                stacklevel=4,
            )
            y = y[:, 0]
        if y.ndim > 2:
            msg = f"y must be 1-D labels or a 2-D indicator matrix, got shape {y.shape}"
            raise ValueError(msg)
        check_classification_targets(y)
        kind = type_of_target(y, input_name="y")
        if kind == "multiclass-multioutput":
            msg = ("multiclass-multioutput targets are not supported; y must be 1-D labels or a 2-D "
                   "0/1 indicator matrix (multilabel)")
            raise ValueError(msg)
        multilabel = kind == "multilabel-indicator"

        if first:
            self._set_classes(y, multilabel, incremental=incremental, classes=classes)
        else:
            self._check_classes(y, multilabel, incremental=incremental, classes=classes)

        if multilabel:
            self._output_activation = "sigmoid"
            self._n_output_units = int(y.shape[1])
            codes = None
            target = y.astype(np.dtype(self._dtype_name))
        else:
            codes = np.searchsorted(self.classes_, y)
            # one class is fitted as scikit-learn fits it: one sigmoid unit whose target
            # is 0 throughout (the probability of "a second class")
            if self.classes_.shape[0] <= 2:
                self._output_activation = "sigmoid"
                self._n_output_units = 1
                target = (codes == 1).astype(np.dtype(self._dtype_name))[:, None]
            else:
                self._output_activation = "softmax"
                self._n_output_units = int(self.classes_.shape[0])
                target = codes.astype(np.int64)
        t_dtype = index_dtype(xp) if target.dtype == np.int64 else dtype
        # as scikit-learn: the early-stopping split is stratified for binary targets only
        strata = codes if codes is not None and self.classes_.shape[0] == 2 else None
        return xp.asarray(target, dtype=t_dtype, device=device), strata

    def _set_classes(self, y, multilabel: bool, *, incremental: bool, classes) -> None:
        """On the first fit: find the classes (or take ``classes``) and record the target's form."""
        if multilabel:
            found = np.arange(y.shape[1])
        elif incremental:
            found = unique_labels(np.asarray(classes))
            missing = np.setdiff1d(unique_labels(y), found)
            if missing.size:
                msg = f"`y` has classes not in `classes`: {missing}; `classes` is {found}."
                raise ValueError(msg)
        else:
            found = unique_labels(y)
        self.classes_ = found
        self._multilabel = multilabel
        self._y_dtype = y.dtype if multilabel else None

    def _check_classes(self, y, multilabel: bool, *, incremental: bool, classes) -> None:
        """On a later fit: check that ``y`` has the form and the classes of the first fit's."""
        if multilabel != self._multilabel or (multilabel and y.shape[1] != self.classes_.shape[0]):
            msg = "y does not have the form (labels or indicator matrix, and size) of the y of the first fit"
            raise ValueError(msg)
        if multilabel:
            return
        labels = unique_labels(y)
        if self.warm_start and not incremental:
            if set(labels.tolist()) != set(self.classes_.tolist()):
                msg = ("warm_start can only be used where `y` has the same classes as in the "
                       f"previous call to fit. Previously got {self.classes_}, `y` has {labels}")
                raise ValueError(msg)
            return
        if incremental and classes is not None and not np.array_equal(
                unique_labels(np.asarray(classes)), self.classes_):
            msg = (f"`classes={unique_labels(np.asarray(classes))!r}` is not the same as on the "
                   f"first call to partial_fit, `{self.classes_!r}`.")
            raise ValueError(msg)
        missing = np.setdiff1d(labels, self.classes_)
        if missing.size:
            msg = (f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                   f"'y' has {labels}.")
            raise ValueError(msg)

    def _device_score(self, out, y, w, xp) -> float:
        """Accuracy (subset accuracy for multilabel) of probabilities ``out`` against
        encoded targets ``y``, on the device."""
        if self._output_activation == "softmax":
            correct = xp.argmax(out, axis=1) == y
        elif self._n_output_units == 1 and not self._multilabel:
            correct = (out[:, 0] > 0.5) == (y[:, 0] > 0.5)
        else:
            correct = xp.all((out > 0.5) == (y > 0.5), axis=1)
        correct = xp.astype(correct, out.dtype)
        if w is None:
            return float(xp.mean(correct))
        return float(xp.sum(w * correct) / xp.sum(w))

    def _combine_members(self, out, xp, *, logits: bool):
        """The members' probabilities (K, n, m) averaged; with ``logits``, the logits of
        that average (``log p`` for softmax, ``log p - log(1 - p)`` for sigmoid units), so
        that every prediction method reads the same averaged probabilities."""
        p = xp.mean(out, axis=0)
        if not logits:
            return p
        with quiet_overflow(xp):  # a probability of exactly 0 or 1 gives an infinite logit
            if self._output_activation == "softmax":
                return xp.log(p)
            return xp.log(p) - xp.log1p(-p)

    # ------------------------------------------------------------------ prediction
    def _one_class(self) -> bool:
        return not self._multilabel and self.classes_.shape[0] == 1

    def _proba_on_model(self, X, method):
        if self._n_output_units == 1 and not self._multilabel:
            # both columns from the logit, so that neither loses precision to 1 - p
            z, inp = self._infer(X, method, logits=True)
            xp = self.model_.xp
            if self._one_class():  # the one class's column only: the unit's "no second class"
                return F.sigmoid(-z, xp=xp), inp
            return xp.concat([F.sigmoid(-z, xp=xp), F.sigmoid(z, xp=xp)], axis=1), inp
        return self._infer(X, method)

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)

        Returns
        -------
        proba : array of shape (n_samples, n_classes)
            Columns in the order of :attr:`classes_` (one probability per label for a
            multilabel model); same namespace and device as ``X`` (NumPy for
            array-likes), in ``X``'s floating dtype. A model fitted on one class has
            one column (scikit-learn gives two there; see docs/sklearn.md).
        """
        p, inp = self._proba_on_model(X, "predict_proba")
        return self._deliver(p, inp, floating=True)

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed from the logits (finite however
        confident the model is).

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)

        Returns
        -------
        log_proba : array of shape (n_samples, n_classes)
        """
        z, inp = self._infer(X, "predict_log_proba", logits=True)
        xp = self.model_.xp
        if self._output_activation == "softmax":
            out = F.log_softmax(z, xp=xp)
        elif self._one_class():
            out = -F.softplus(z, xp=xp)
        elif self._n_output_units == 1 and not self._multilabel:
            out = xp.concat([-F.softplus(z, xp=xp), -F.softplus(-z, xp=xp)], axis=1)
        else:
            out = -F.softplus(-z, xp=xp)
        return self._deliver(out, inp, floating=True)

    def predict(self, X):
        """Predicted labels.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)

        Returns
        -------
        y : array of shape (n_samples,) or (n_samples, n_labels)
            Labels from :attr:`classes_` (a 0/1 indicator matrix in the dtype of the
            training ``y`` for multilabel models). Same namespace and device as ``X``
            for numeric labels; string or object labels come back as a NumPy array.
        """
        p, inp = self._infer(X, "predict")
        xp = self.model_.xp
        if self._multilabel:
            pred = xp.astype(p > 0.5, index_dtype(xp))
            if inp.host:
                return np.asarray(to_numpy(pred)).astype(self._y_dtype, copy=False)
            out = _move(pred, inp.xp, inp.device)
            target = getattr(inp.xp, np.dtype(self._y_dtype).name, None)
            return inp.xp.astype(out, target) if target is not None and out.dtype != target else out
        if self._output_activation == "softmax":
            codes = xp.argmax(p, axis=1)
        elif self._one_class():
            codes = xp.zeros((int(p.shape[0]),), dtype=index_dtype(xp), device=self.model_.device)
        else:
            codes = xp.astype(p[:, 0] > 0.5, index_dtype(xp))
        if inp.host or self.classes_.dtype.kind not in "biuf":
            return self.classes_[np.asarray(to_numpy(codes))]
        codes = _move(codes, inp.xp, inp.device)
        labels = inp.xp.asarray(self.classes_, device=inp.device)
        return inp.xp.take(labels, codes, axis=0)

    def score(self, X, y, sample_weight=None):
        """Mean accuracy (subset accuracy for multilabel) of :meth:`predict` on ``(X, y)``.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
        y : array-like or array of shape (n_samples,) or (n_samples, n_labels)
        sample_weight : array-like or array of shape (n_samples,), optional

        Returns
        -------
        score : float
        """
        from sklearn import config_context

        pred = _host(self.predict(X))
        with config_context(array_api_dispatch=False):
            return float(accuracy_score(_host(y), pred, sample_weight=_host(sample_weight)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


def _is_indicator(y) -> bool:
    try:
        return type_of_target(y) == "multilabel-indicator"
    except ValueError:
        return False


# ------------------------------------------------------------------------------ regressor
class MLPRegressor(RegressorMixin, _BaseMLP):
    __doc__ = (
        """Multilayer-perceptron regressor with scikit-learn's interface, on any array backend.

    Minimises half the squared error (summed over the outputs, averaged over the
    samples) plus scikit-learn's scaled L2 term, with an identity output; or, with
    ``loss="poisson"``, half the Poisson deviance of ``exp`` of the outputs. ``y`` may
    have several columns (multi-output regression).
"""
        + _PARAMETERS_DOC.replace("    hidden_layer_sizes :", """\
    loss : {"squared_error", "poisson"}, default="squared_error"
        The objective, as scikit-learn's: half the squared error, or half the Poisson
        deviance with a log link (the model's outputs are log-rates, ``predict``
        returns ``exp`` of them, ``out_activation_`` is ``"exp"``); ``"poisson"``
        needs non-negative targets.
    hidden_layer_sizes :""", 1)
        + """
    Attributes
    ----------
"""
        + _ATTRIBUTES_DOC
        + """
    See Also
    --------
    MLPClassifier
    sklearn.neural_network.MLPRegressor

    Examples
    --------
    >>> import numpy as np
    >>> from arraymlp.sklearn import MLPRegressor
    >>> X = np.linspace(-1, 1, 200).reshape(-1, 1)
    >>> reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=500,
    ...                    n_iter_no_change=50, random_state=0).fit(X, X[:, 0] ** 2)
    >>> bool(reg.score(X, X[:, 0] ** 2) > 0.9)
    True
"""
    )

    _output_activation = "identity"
    _n_output_units = 0

    _parameter_constraints: dict = {
        **_BaseMLP._parameter_constraints,
        "loss": [StrOptions(set(_REGRESSION_LOSSES))],
    }

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", **kwargs):
        self.loss = loss
        super().__init__(hidden_layer_sizes, activation, **kwargs)

    # scikit-learn reads the parameters from the signature: ``loss`` and the shared ones
    __init__.__signature__ = inspect.signature(_BaseMLP.__init__).replace(parameters=[
        *list(inspect.signature(_BaseMLP.__init__).parameters.values())[:1],
        inspect.Parameter("loss", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="squared_error"),
        *list(inspect.signature(_BaseMLP.__init__).parameters.values())[1:],
    ])

    def _loss_row(self) -> Loss:
        return _POISSON if self.loss == "poisson" else super()._loss_row()

    def _out_activation_name(self) -> str:
        return "exp" if self.loss == "poisson" else super()._out_activation_name()

    def _combine_members(self, out, xp, *, logits: bool):
        """The members' outputs (K, n, m) averaged; with ``loss="poisson"`` their rates are
        averaged (the log of the mean rate is returned, as the outputs are log-rates)."""
        if self.loss == "poisson":
            return xp.log(xp.mean(xp.exp(out), axis=0))
        return xp.mean(out, axis=0)

    def _rates(self, out):
        """Predictions from the model's outputs: the outputs, or ``exp`` of them (the
        log-rates) with ``loss="poisson"``."""
        return self.model_.xp.exp(out) if self.loss == "poisson" else out

    def fit(self, X, y, sample_weight=None):
        """Train on ``(X, y)`` from fresh parameters (or from the current ones with ``warm_start``).

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
            NumPy / array-like (trains with NumPy unless ``backend=`` says otherwise) or a
            torch, CuPy or array-api-strict array (trains there, on its device).
        y : array-like or array of shape (n_samples,) or (n_samples, n_outputs)
            Targets; a device array is moved to the model's device, never to the host.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights.

        Returns
        -------
        self : MLPRegressor
        """
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(_stochastic)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over ``(X, y)``, keeping the parameters and optimiser state.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
        y : array-like or array of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : MLPRegressor
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def _prepare_targets(self, y, n, xp, device, dtype, *, first, incremental, classes, sw_host):
        if _is_device_array(y):
            yxp = array_api_compat.array_namespace(y)
            if y.ndim not in (1, 2):
                msg = f"y must be 1-D or 2-D, got shape {tuple(y.shape)}"
                raise ValueError(msg)
            if not (yxp.isdtype(y.dtype, "real floating") or yxp.isdtype(y.dtype, "integral")
                    or y.dtype == yxp.bool):
                msg = f"y must be real numeric, got dtype {y.dtype}"
                raise ValueError(msg)
        else:
            y = check_array(y, ensure_2d=False, dtype="numeric", input_name="y", ensure_all_finite=True)
            if y.ndim not in (1, 2):
                msg = f"y must be 1-D or 2-D, got shape {y.shape}"
                raise ValueError(msg)
        if int(y.shape[0]) != n:
            msg = f"Found input variables with inconsistent numbers of samples: [{n}, {int(y.shape[0])}]"
            raise ValueError(msg)
        if y.ndim == 2 and int(y.shape[1]) == 1:
            warnings.warn(
                "A column-vector y was passed when a 1d array was expected. Please change the shape "
                "of y to (n_samples,), for example using ravel().",
                DataConversionWarning,
                stacklevel=4,
            )
        y = _move(y, xp, device)
        y = xp.astype(y, dtype) if y.dtype != dtype else y
        _check_finite(y, xp, "y")
        if self.loss == "poisson" and bool(xp.any(y < 0)):
            msg = "loss='poisson' needs non-negative targets (counts or rates); y has negative values"
            raise ValueError(msg)
        y = xp.reshape(y, (n, -1))
        self._n_output_units = int(y.shape[1])
        return y, None

    def _device_score(self, out, y, w, xp) -> float:
        """R^2 (uniform average over the outputs) of ``out`` against ``y``, on the device,
        with scikit-learn's conventions for constant targets."""
        out = self._rates(out)
        if not bool(xp.all(xp.isfinite(out))):
            return float("nan")
        if w is None:
            w = xp.ones((int(y.shape[0]),), dtype=y.dtype, device=device_of(y))
        w2 = xp.reshape(w, (-1, 1))
        mean = xp.sum(w2 * y, axis=0) / xp.sum(w)
        ss_res = to_numpy(xp.sum(w2 * (y - out) ** 2, axis=0)).astype(np.float64)
        ss_tot = to_numpy(xp.sum(w2 * (y - mean) ** 2, axis=0)).astype(np.float64)
        scores = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0),
                          np.where(ss_res == 0, 1.0, 0.0))
        return float(np.mean(scores))

    def predict(self, X):
        """Predicted targets.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)

        Returns
        -------
        y : array of shape (n_samples,) or (n_samples, n_outputs)
            Same namespace and device as ``X`` (NumPy for array-likes), in ``X``'s
            floating dtype.
        """
        out, inp = self._infer(X, "predict")
        out = self._rates(out)
        if self._n_output_units == 1:
            out = self.model_.xp.reshape(out, (-1,))
        return self._deliver(out, inp, floating=True)

    def score(self, X, y, sample_weight=None):
        """Coefficient of determination R^2 of :meth:`predict` on ``(X, y)``.

        Parameters
        ----------
        X : array-like or array of shape (n_samples, n_features)
        y : array-like or array of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like or array of shape (n_samples,), optional

        Returns
        -------
        score : float
        """
        from sklearn import config_context

        pred = _host(self.predict(X))
        with config_context(array_api_dispatch=False):
            return float(r2_score(_host(y), pred, sample_weight=_host(sample_weight)))
