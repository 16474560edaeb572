"""The fit loop: mini-batches, validation, early stopping, callbacks, history, progress.

``fit(model, x, y, ...)`` (also ``model.fit``) trains on the arrays' own namespace and
device: batches are index-gathered from the data where it lives, one batch at a time,
so an epoch never copies the whole data set. Host data (NumPy) for a model already on
another device (a GPU) is checked on the host and staged: each batch is gathered on the
host and copied one batch ahead (:mod:`arraymlp._staging`). A scipy.sparse ``x`` (or cupyx.scipy.sparse
on CuPy) is taken in compressed-row form: a batch is a row slice of it, and only the first
dense layer sees it, through its kernels' sparse products. Each step is ``loss_and_grads`` followed by
the optimiser's update, and reads nothing back to the host: the steps' losses stay on
the device and are read together, in one transfer, at the end of the epoch (and every
1000 steps of a longer one). A non-finite loss found then stops training with
:class:`DivergenceError`, leaving the parameters of the last finite step: the steps
since the last read are replayed from a copy of the parameters, optimiser state and
random stream taken there, up to the step before the first non-finite loss (that copy
is the cost: one copy of the parameters and optimiser state per read, on the device,
and the replay only when training diverges). A callback that overrides ``on_batch_end``, and data-parallel training,
need each step's loss as it comes: then every step reads its loss (one host read) and
checks it before its update. With plain SGD (no momentum, weight decay or clipping)
the update is made during backpropagation instead, each dense layer's weight gradient
accumulating straight into its weights (:func:`arraymlp.functional.dense_sgd_update`);
an exception raised inside backpropagation (a custom layer's, or Ctrl-C) can leave that
step applied to the layers above the failing one only.

Without ``loss=`` the loss is inferred from the output activation and the targets
(:func:`infer_loss`). Metrics (:mod:`arraymlp.metrics`) are summed on the device during
the epoch and read when it ends; :func:`evaluate` measures a fitted model the same way.
:func:`predict` answers in the form (rank, dtype family) of the ``y`` of the last fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import sys
import time
from typing import Any, Callable, Sequence

from ._backend import (
    Generator,
    StepValues,
    device_of,
    dtype_name,
    get_namespace,
    host_array,
    index_dtype,
    is_sparse,
    quiet_overflow,
    resolve_dtype,
    slice_rows,
    take_rows,
    to_backend,
    to_numpy,
)
from ._staging import DeviceBatches, StagedEpochs
from .callbacks import Callback, DivergenceError, EarlyStopping, History
from .fusion import plan_for
from .losses import LOSSES, Loss, check_targets, count_not_binary, get_loss
from .metrics import Metric, _Accumulator, _AccuracyMetric, _Pair, get_metrics, read_results
from .optim import LBFGS, OPTIMIZERS, Optimizer, get_optimizer
from .precision import resolve_precision

__all__ = [
    "Callback",
    "DivergenceError",
    "EarlyStopping",
    "History",
    "evaluate",
    "fit",
    "infer_loss",
    "partial_fit",
    "predict",
    "predict_proba",
]


def _params_finite(params, xp) -> bool:
    """Whether every array of ``params`` (a list of dicts) is finite: one host read."""
    arrays = [a for p in params for a in p.values() if xp.isdtype(a.dtype, ("real floating", "complex floating"))]
    if not arrays:
        return True
    return bool(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays])))


class _Progress:
    """A tqdm bar over epochs when stderr is a terminal (and tqdm is installed), or
    plain per-epoch lines when ``verbose``; silent otherwise."""

    def __init__(self, epochs: int, enabled: bool, verbose: bool):
        self.bar = None
        self.verbose = verbose
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=epochs, unit="epoch", leave=True)

    def update(self, logs: dict[str, Any], names: Sequence[str]) -> None:
        """Show the epoch's ``loss`` and the entries of ``logs`` named in ``names``
        (the metrics, ``val_loss`` and the validation metrics) that it has."""
        parts = {"loss": f"{logs['loss']:.4g}"}
        for name in names:
            if logs.get(name) is not None:
                parts[name] = f"{logs[name]:.4g}" if name == "val_loss" else f"{logs[name]:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(parts)
            self.bar.update(1)
        elif self.verbose:
            text = "  ".join(f"{k} {v}" for k, v in parts.items())
            print(f"epoch {logs['epoch'] + 1:>4}  {text}  ({logs['time']:.2f}s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loss_then_update(model, opt, lossfn, xb, yb, wb, *, xp, l2=0.0, dp=None, amp=None, fuse=True,
                      on_outputs=None, hits=None):
    """First half of a training step: the batch's loss, and a function taking the update.

    Returns ``(value, update)``: ``value`` is the loss (an array), ``update(lr)`` makes
    the optimiser's step. A caller that reads ``value`` and checks it in between leaves
    the parameters untouched by a non-finite loss; one that keeps ``value`` on the
    device updates at once and checks later (:func:`_run_epoch_on_device`). With a plain SGD optimiser (no data
    parallelism, no parameter array shared by two layers) the gradients are never
    gathered: :meth:`Sequential._sgd_update` applies each as backpropagation produces
    it, so an exception raised inside backpropagation (a custom layer's, or Ctrl-C)
    can leave the layers above it stepped and the others not. With ``amp`` (a
    :class:`arraymlp.MixedPrecision`) the step runs in its compute dtype. ``fuse=False``
    always gathers the gradients and calls ``opt.step``. ``on_outputs(out)`` is called
    with the batch's output before backpropagation (this rank's shard's, under data
    parallelism); ``hits`` (the training accuracy's count, see :func:`_loss_counts_hits`)
    goes to the loss.
    """
    if amp is not None:
        return amp.loss_then_update(model, opt, lossfn, xb, yb, wb, xp=xp, l2=l2, on_outputs=on_outputs)
    plan = plan_for(model, xp, opt if dp is None and fuse else None)
    if plan.sgd:
        value, dout, caches, owned = model._loss_and_dout(xb, yb, lossfn, xp=xp, sample_weight=wb, l2=l2, plan=plan,
                                                          on_outputs=on_outputs, hits=hits)

        def update(lr):
            lr = opt._begin_fused_step(model.params, xp, lr)
            model._sgd_update(caches, dout, lr=lr, l2=l2, xp=xp, owned=owned, plan=plan)

        return value, update
    if dp is None:
        value, grads = model._loss_and_grads(xb, yb, lossfn, xp=xp, sample_weight=wb, l2=l2, plan=plan,
                                             on_outputs=on_outputs, hits=hits)
    else:
        value, grads = dp.loss_and_grads(model, xb, yb, lossfn, xp=xp, sample_weight=wb, l2=l2,
                                         on_outputs=on_outputs, hits=hits)

    def update(lr):
        model.params = opt.step(model.params, grads, lr=lr)

    return value, update


def _n(x) -> int:
    return int(x.shape[0])


def _take(a, idx, xp):
    """Rows ``idx`` of ``a`` (a dense array or a CSR matrix), or None."""
    return None if a is None else take_rows(a, idx, xp)


def _pair_maker(model, lossfn, fused: bool):
    """``make(y, out)``: the :class:`arraymlp.metrics._Pair` of a batch's targets and
    outputs (``fused``: the outputs are the logits before the output activation)."""
    threshold = 0.5 if model.output_activation == "sigmoid" and not fused else 0.0
    rates = lossfn.name == "poisson_nll"  # the outputs are log-rates; metrics read the rates
    task = lossfn.task

    def make(y, out, xp):
        return _Pair(y, out, task, xp, threshold=threshold, rates=rates)

    return make


class _MeanOf(Metric):
    """The running mean of per-batch values given with their batch sizes (the loss)."""

    name = "loss"

    def _finish(self, acc, host):
        return host[0] / acc.count


def _mean_accumulator(model, xp) -> _Accumulator:
    return _MeanOf().start(xp, model.dtype, model.device)


def _add_mean(acc: _Accumulator, value, n: int) -> None:
    acc.add([acc.xp.astype(value, acc.acc) * float(n)])
    acc.count += n


def _evaluate(model, x, y, lossfn, task, xp, batch_size=4096, metrics=(), host=False):
    """Loss and metrics of ``(x, y)`` in inference mode, in batches: ``(loss, {name: value})``.

    The sums stay on the device until the end, read in one go. ``host``: ``(x, y)`` are
    NumPy arrays, staged to the model's device batch by batch."""
    n = _n(x)
    if host:
        blocks = DeviceBatches([x, y], model.xp, model.device, batch_size).epoch()
    else:
        # (slice ends within the axis: the standard leaves those past it unspecified)
        blocks = ((slice_rows(x, i, min(i + batch_size, n)), y[i:min(i + batch_size, n), ...])
                  for i in range(0, n, batch_size))
    fused = model._fused(lossfn)
    upto = len(model.layers) - 1 if fused else None
    make = _pair_maker(model, lossfn, fused)
    builtin = LOSSES.get(lossfn.name) is lossfn
    total = _mean_accumulator(model, xp)
    accs = [m.start(xp, model.dtype, model.device) for m in metrics]
    for xb, yb in blocks:
        out, _ = model.forward(xb, training=False, xp=xp, upto=upto, keep=False)
        # the targets were checked up front: the table's losses need not read them again
        value, _ = lossfn.fn(out, yb, xp=xp, check=False) if builtin else lossfn.fn(out, yb, xp=xp)
        _add_mean(total, value, _n(xb))
        pair = make(yb, out, xp)
        for acc in accs:
            acc.update(pair)
        del out, pair
    values = read_results([total, *accs], xp)  # the loss and the metrics, read together
    return values[0], {m.name: v for m, v in zip(metrics, values[1:])}


def _names_kind_of(optimizer, existing) -> bool:
    """Whether ``optimizer`` is a name (any case) of ``existing``'s own kind."""
    return isinstance(optimizer, str) and OPTIMIZERS.get(optimizer.lower()) is type(existing)


def _resolve_optimizer(model, optimizer, lr, reuse: bool) -> Optimizer:
    """The run's optimiser. ``reuse`` (partial_fit): the model's last one, its state kept,
    when ``optimizer`` is None, that instance, or a name of its kind."""
    existing = getattr(model, "optimizer_", None)
    if reuse and existing is not None and (optimizer is None or optimizer is existing
                                           or _names_kind_of(optimizer, existing)):
        if lr is not None:  # partial_fit(lr=...): the new base rate, the state kept
            existing.lr = lr
        return existing
    kwargs = {} if lr is None else {"lr": lr}
    return get_optimizer(optimizer if optimizer is not None else "adam", **kwargs)


def _l2_over_batch(l2: float, size: float) -> float:
    """scikit-learn's L2 rule: the coefficient ``l2`` divided by the batch's size (or,
    with sample weights, by the batch's weight sum), so that the penalty weighs as much
    against a batch's mean loss as ``l2 / n`` does against the data set's."""
    return l2 / size


@dataclasses.dataclass
class _Run:
    """What one call of :func:`fit` trains on, and the state its epochs carry along.

    The options after ``stop`` are for the scikit-learn estimators, which run their
    epochs through :func:`_run_epoch` too; :func:`fit` leaves them at their defaults:

    - ``l2_rule(l2, size)``: the L2 coefficient of a batch from ``l2`` and the batch's
      size, or its weight sum when ``host_weight`` is given (None: ``l2`` for every batch);
    - ``host_weight``: the sample weights as a float64 host array, for the weight sums;
    - ``skip_zero_weight``: skip (take no step on) a batch whose weights are all zero;
    - ``fuse``: whether plain SGD may be fused into backpropagation;
    - ``on_divergence(run, value, epoch, batch)``: the error for a non-finite loss, or
      None to take the step all the same (the estimators, as scikit-learn, stop only
      once the parameters are no longer finite).
    """

    model: Any
    x: Any
    y: Any
    sample_weight: Any
    val: tuple | None  # (x_val, y_val), checked
    lossfn: Any
    xp: Any
    opt: Optimizer
    schedule: Any
    callbacks: list
    batch_size: int
    shuffle: bool
    l2: float
    metrics: list = dataclasses.field(default_factory=list)  # recorded on the training batches
    val_metrics: list = dataclasses.field(default_factory=list)  # and on the validation data
    history: History | None = None
    start_epoch: int = 0
    dp: Any = None
    bar: Any = None
    base_lr: float = 0.0
    step: int = 0
    stop: bool = False
    accs: list = dataclasses.field(default_factory=list)  # the epoch's metric accumulators
    hits_acc: Any = None  # the accumulator among accs that the loss counts into (_loss_counts_hits)
    pair: Any = None  # makes a batch's metrics input from its targets and outputs (_pair_maker)
    amp: Any = None  # MixedPrecision, or None
    l2_rule: Callable[[float, float], float] | None = None
    host_weight: Any = None
    skip_zero_weight: bool = False
    fuse: bool = True
    on_divergence: Callable[..., Exception] | None = None
    staged: StagedEpochs | None = None  # host data: its batches, staged to the model's device
    val_host: bool = False  # the validation data is host data, staged as it is evaluated


def _check_l2(l2) -> float:
    """``l2`` as a float: finite and non-negative (a negative coefficient would reward
    large weights, and NaN would only show as a diverging loss)."""
    ok = isinstance(l2, numbers.Real) and not isinstance(l2, bool) and math.isfinite(l2) and l2 >= 0
    if not ok:
        msg = f"l2 must be a finite non-negative number, got {l2!r}"
        raise (ValueError if isinstance(l2, numbers.Real) and not isinstance(l2, bool) else TypeError)(msg)
    return float(l2)


def _check_validation(validation_data, validation_split) -> None:
    """``validation_split`` a number in [0, 1); ``validation_data`` None or a pair."""
    if not isinstance(validation_split, numbers.Real) or isinstance(validation_split, bool):
        msg = f"validation_split must be a number in [0, 1), got {validation_split!r}"
        raise TypeError(msg)
    if validation_data is not None and not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        what = (f"a {type(validation_data).__name__} of {len(validation_data)}"
                if isinstance(validation_data, (tuple, list)) else type(validation_data).__name__)
        msg = (f"validation_data must be a pair (x_val, y_val), got {what}; validation is unweighted, "
               "so there are no validation sample weights to pass")
        raise ValueError(msg)
    if validation_data is not None and validation_split > 0:  # one would be ignored
        msg = (f"validation_data and validation_split={validation_split!r} were both given; pass one: "
               "validation_data is used as it is, validation_split holds out the last rows of (x, y)")
        raise ValueError(msg)


def _check_arguments(epochs, batch_size, validation_split):
    """The run's sizes checked: ``(epochs, batch_size)``."""
    if not isinstance(epochs, numbers.Integral) or isinstance(epochs, bool) or epochs < 1:
        msg = f"epochs must be a positive int, got {epochs!r}"
        raise ValueError(msg)
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)
    epochs, batch_size = int(epochs), int(batch_size)
    if not 0.0 <= validation_split < 1.0:
        msg = f"validation_split must be in [0, 1), got {validation_split!r}"
        raise ValueError(msg)
    return epochs, batch_size


def _kind(y, xp) -> str:
    """``"bool"``, ``"int"`` or ``"float"``: the dtype family of targets."""
    if y.dtype == xp.bool:
        return "bool"
    return "int" if xp.isdtype(y.dtype, "integral") else "float"


def infer_loss(model, y, *, xp=None) -> tuple[str, str]:
    """The loss to use for ``model`` and targets ``y`` when ``fit`` is given none:
    ``(name, reason)``.

    A softmax output takes ``"cross_entropy"``, a sigmoid output
    ``"binary_cross_entropy"``; an identity output (or none) takes ``"cross_entropy"``
    for integer labels of shape (n,) with several outputs (the outputs are then the
    logits), and ``"mse"`` for floating targets. Anything else is ambiguous and raises
    a :class:`ValueError` that asks for ``loss=``.
    """
    from ._backend import get_namespace

    xp = get_namespace(y) if xp is None else xp
    act = model.output_activation
    kind = _kind(y, xp)
    if act == "softmax":
        return "cross_entropy", "the output activation is softmax"
    if act == "sigmoid":
        return "binary_cross_entropy", "the output activation is sigmoid"
    if act in (None, "identity"):
        if kind == "float":
            return "mse", "the output activation is the identity and the targets are floating-point"
        if kind == "int" and y.ndim == 1 and model.n_outputs > 1:
            return "cross_entropy", (f"integer labels of shape (n,) and {model.n_outputs} outputs "
                                     "without an output activation (read as logits)")
    shape = tuple(int(s) for s in y.shape)
    msg = (
        f"cannot tell which loss to use: the model's output activation is {act or 'the identity'!r} "
        f"with {model.n_outputs} output(s), and y has {kind} values of shape {shape}; pass loss= , one of "
        f"{', '.join(LOSSES)} (or an arraymlp.Loss)"
    )
    raise ValueError(msg)


def _binary_targets(y, xp, lossfn, dtype, what: str):
    """The 0/1 targets of a binary (or multilabel) classification loss: values other
    than 0 and 1 raise (counted block by block, one read). Integer and boolean labels
    stay as they are for the table's binary cross-entropy (each batch is cast as it
    comes) and are cast to the model's dtype for a custom loss."""
    if int(count_not_binary(y, xp)):
        values = to_numpy(xp.unique_values(y))  # the error's message only
        bad = [v for v in values.tolist() if v not in (0, 1)][:5]
        msg = (
            f"{what} must hold the labels 0 and 1 for a binary classification loss "
            f"(binary_cross_entropy: int, bool or float, shape (n,) or (n, n_outputs)); found {bad}"
            f"{' ...' if len(values) > 7 else ''}. For other class labels use cross_entropy with a "
            "softmax output; for probability targets call arraymlp.binary_cross_entropy in your own loop"
        )
        raise ValueError(msg)
    if not xp.isdtype(y.dtype, "real floating") and LOSSES.get(lossfn.name) is not lossfn:
        y = xp.astype(y, dtype)
    return y


def _resolve_loss(model, loss, y, xp, verbose: bool) -> Loss:
    if loss is not None:
        return get_loss(loss)
    name, reason = infer_loss(model, y, xp=xp)
    if verbose:
        print(f"loss: {name} ({reason}; pass loss= to choose another)", flush=True)
    return get_loss(name)


def _is_host_data(model, x) -> bool:
    """Whether ``x`` is host data (dense, in host memory) for a built model that lives
    in another namespace or on another device: training then stages its batches."""
    if model.params is None or is_sparse(x) or host_array(x) is None:
        return False
    try:
        return not (get_namespace(x) is model.xp and device_of(x) == model.device)
    except TypeError:
        return False


def _on_host(a, what: str):
    """``a`` (None, or host data) as a NumPy array; an array elsewhere is refused."""
    if a is None:
        return None
    h = host_array(a)
    if h is None:
        msg = (f"{what} is on {device_of(a)!r} but x is host data (staged to the model's device batch by batch); "
               f"pass {what} on the host as well, or move x to the model's device")
        raise ValueError(msg)
    return h


def _prepare_data(model, x, y, sample_weight, loss, validation_data, validation_split, verbose=False):
    """Check the data, settle the loss and split off the validation set:
    ``(x, y, sample_weight, val, xp, lossfn, form, host)``, ``val`` the checked ``(x_val, y_val)`` or ``None``,
    ``form`` the rank and dtype family (``"bool"``, ``"int"``, ``"float"``) of ``y``, ``xp`` the
    model's namespace, ``host`` whether ``(x, y, sample_weight)`` are host data for a model on
    another device (:func:`_is_host_data`): they are then checked on the host and returned as
    NumPy arrays, and ``val`` is a ``(x_val, y_val, host)`` triple."""
    host = _is_host_data(model, x)
    if host:
        x, y, sample_weight = _on_host(x, "x"), _on_host(y, "y"), _on_host(sample_weight, "sample_weight")
    x, dxp = model._check_x(x, host=host)  # dxp: where the data is checked (the host for host data)
    y = model._check_target(y, dxp, host=host)
    dtype, device = (model.dtype, model.device) if not host else (resolve_dtype(dxp, model.dtype_name), device_of(x))
    if _n(y) != _n(x):
        msg = f"x has {_n(x)} samples but y has {_n(y)}"
        raise ValueError(msg)
    lossfn = _resolve_loss(model, loss, y, dxp, verbose)
    form = (y.ndim, _kind(y, dxp))  # the shape rank and dtype family predict returns
    if lossfn.task == "multilabel":
        y = _binary_targets(y, dxp, lossfn, dtype, "y")
    if sample_weight is not None:
        sample_weight = model._check_target(sample_weight, dxp, "sample_weight", host=host)
    # Validate the targets (kind, shape, label range) and weights once, up front, block by
    # block (never a temporary the size of the data); the steps then skip those checks.
    check_targets(lossfn, model.n_outputs, y, dtype=dtype, device=device, xp=dxp, sample_weight=sample_weight)

    if validation_data is None and validation_split > 0.0:
        n_val = max(1, int(round(_n(x) * validation_split)))
        if n_val >= _n(x):
            msg = (f"validation_split={validation_split} of {_n(x)} samples leaves none to train on; "
                   "use a smaller fraction or pass validation_data")
            raise ValueError(msg)
        n_fit = _n(x) - n_val
        x, x_val = slice_rows(x, 0, n_fit), slice_rows(x, n_fit, _n(x))
        y, y_val = y[:-n_val, ...], y[-n_val:, ...]
        if sample_weight is not None:
            sample_weight = sample_weight[:-n_val]
        validation_data = (x_val, y_val)
    val = None
    if validation_data is not None:
        x_val, y_val = validation_data
        vhost = _is_host_data(model, x_val)  # staged on its own account: host or on the device
        if vhost:
            x_val, y_val = _on_host(x_val, "validation x"), _on_host(y_val, "validation y")
        x_val, vxp = model._check_x(x_val, what="validation x", host=vhost)
        y_val = model._check_target(y_val, vxp, "validation y", host=vhost)
        vdtype, vdevice = (model.dtype, model.device)
        if vhost:
            vdtype, vdevice = resolve_dtype(vxp, model.dtype_name), device_of(x_val)
        if _n(y_val) != _n(x_val):
            msg = f"validation x has {_n(x_val)} samples but validation y has {_n(y_val)}"
            raise ValueError(msg)
        if lossfn.task == "multilabel":
            y_val = _binary_targets(y_val, vxp, lossfn, vdtype, "validation y")
        # the validation targets' kind, shape and labels, up front like y's
        check_targets(lossfn, model.n_outputs, y_val, dtype=vdtype, device=vdevice, xp=vxp)
        val = (x_val, y_val, vhost)
    return x, y, sample_weight, val, model.xp, lossfn, form, host


def _set_up_model(model, lossfn, form, optimizer, lr, schedule, seed, xp, reuse: bool) -> Optimizer:
    """Record the loss, the targets' form, optimiser and schedule on the model, reseed it;
    return the optimiser."""
    model.task_ = lossfn.task
    model.target_ndim_, model.target_kind_ = form
    # the table's name when the loss is the table's (files store it); a custom Loss itself
    model.loss_ = lossfn.name if LOSSES.get(lossfn.name) is lossfn else lossfn
    opt = _resolve_optimizer(model, optimizer, lr, reuse)
    model.optimizer_ = opt
    model.schedule_ = schedule
    if seed is not None:
        model.rng = Generator(seed, xp, model.device)
    return opt


def _arrange_callbacks(callbacks, early_stopping, *, validation: bool) -> list:
    """The run's callbacks: the given ones, early stopping, then the checkpoints."""
    callbacks = list(callbacks)
    if isinstance(early_stopping, bool) or not (early_stopping is None or isinstance(early_stopping, (int, Callback))):
        msg = (f"early_stopping must be an EarlyStopping, an int patience or None, got {early_stopping!r} "
               "(for example early_stopping=10 or EarlyStopping('val_loss', patience=10))")
        raise TypeError(msg)
    if isinstance(early_stopping, int):
        early_stopping = EarlyStopping("val_loss" if validation else "loss", patience=early_stopping)
    if early_stopping is not None:
        callbacks.append(early_stopping)
    # checkpoints run after the other callbacks of an epoch, so they save its final state
    callbacks = [cb for cb in callbacks if not getattr(cb, "saves_callbacks", False)] + \
        [cb for cb in callbacks if getattr(cb, "saves_callbacks", False)]
    for cb in callbacks:
        if getattr(cb, "saves_callbacks", False):
            cb.run_callbacks = callbacks
    return callbacks


def _resume(run: _Run, resume_from, lr, given: Optimizer | None) -> None:
    """Restore the checkpoint ``resume_from`` into the run. ``lr`` (fit's ``lr=``) is
    the new base rate of the restored optimiser; ``given``, an optimiser instance passed
    to fit, must have the saved settings (the checkpoint's would silently replace them)."""
    from .io.checkpoints import restore_checkpoint

    # a given instance is compared with the saved settings before it takes the saved state
    target = run.opt if given is None else type(given)(**given.hyperparameters())
    run.start_epoch = restore_checkpoint(resume_from, run.model, optimizer=target, schedule=run.schedule,
                                         history=run.history, callbacks=run.callbacks, precision=run.amp)
    if given is not None:
        saved, mine = target.hyperparameters(), given.hyperparameters()
        if saved != mine:
            diff = ", ".join(f"{k}: {v!r} saved, {mine.get(k)!r} given" for k, v in saved.items() if v != mine.get(k))
            msg = (f"the checkpoint was saved with {target!r} but training was given {given!r} ({diff}); pass an "
                   f"optimiser with the saved settings, or its name (optimizer={target.name!r}) to take them, and "
                   "lr= for a new learning rate")
            raise ValueError(msg)
        given.load_state_dict(target.state_dict())
    if lr is not None:  # the new base rate, the saved moments and step count kept
        run.opt.lr = lr


def _described(a):
    """An array's shape and dtype (None for None), to compare across ranks."""
    return None if a is None else (tuple(int(s) for s in a.shape), dtype_name(a.dtype))


def _call(run: _Run, epochs: int) -> dict:
    """What every rank must pass alike to train data-parallel, beside ``x``'s shape
    (:meth:`arraymlp.distributed.DataParallel.begin` compares it across the ranks)."""
    return {"x dtype": dtype_name(run.x.dtype), "y": _described(run.y), "sample_weight": _described(run.sample_weight),
            "validation data": None if run.val is None else tuple(_described(a) for a in run.val),
            "epochs": epochs, "batch_size": run.batch_size, "shuffle": run.shuffle, "l2": run.l2,
            "loss": run.lossfn.name, "metrics": [m.name for m in run.metrics],
            "optimizer": type(run.opt).__name__, "lr": getattr(run.opt, "lr", None),
            "optimizer steps": getattr(run.opt, "step_count", None)}


def _start_run(run: _Run, epochs: int, resume_from, comm, progress: bool, verbose: bool,
               what: str = "fit", *, lr=None, given: Optimizer | None = None) -> None:
    """History, resumption, data parallelism, ``on_train_begin`` and the progress bar."""
    model, callbacks = run.model, run.callbacks
    run.history = History(metric_name="accuracy" if run.lossfn.task != "regression" else "r2")
    run.pair = _pair_maker(model, run.lossfn, model._fused(run.lossfn))
    for m in run.metrics:
        run.history.metrics[m.name] = []
    if run.val is not None:
        for m in run.val_metrics:
            run.history.metrics["val_" + m.name] = []
    if resume_from is not None:
        _resume(run, resume_from, lr, given)
    if comm is not None:
        from .distributed import DataParallel

        run.dp = comm if isinstance(comm, DataParallel) else DataParallel(comm)
        run.dp.begin(model, run.x, callbacks, call=_call(run, epochs), what=what)
        progress, verbose = progress and run.dp.is_root, verbose and run.dp.is_root
    for cb in callbacks:
        cb.on_train_begin(model, run.history)
    run.bar = _Progress(max(epochs - run.start_epoch, 0), progress, verbose)
    run.base_lr = run.opt.lr
    run.step = getattr(model, "steps_", 0)


def _begin_epoch(run: _Run, epoch: int) -> bool:
    """``on_epoch_begin``; whether a callback (on any rank) asked to stop before the epoch."""
    for cb in run.callbacks:
        run.stop = bool(cb.on_epoch_begin(run.model, epoch)) or run.stop
    if run.dp is not None:
        run.stop = run.dp.agree(run.stop)
    if run.stop:
        run.history.stopped_early = True
    return run.stop


def _divergence(run: _Run, value: float, epoch: int, batch: int) -> DivergenceError:
    """The error for a non-finite loss at ``batch`` of ``epoch`` (before that step's update)."""
    finite = _params_finite(run.model.params, run.xp)
    where = f"at epoch {epoch + 1}, step {run.step + 1} (batch {batch + 1})"
    if finite:
        kept = "the parameters are those of the last finite step"
    else:
        kept = (f"the update of step {run.step} (the last with a finite loss) already made some "
                "parameters non-finite: its gradient overflowed; restore them from a checkpoint")
    msg = (
        f"the training loss became {value} {where}; {kept}. "
        "Lower the learning rate, scale the inputs, or clip gradients (clip_norm=...)."
    )
    return DivergenceError(msg, epoch=epoch, step=run.step, params_finite=finite)


def _batch(run: _Run, order, start: int):
    """The batch of rows ``[start, start + batch_size)`` of the epoch's order (this
    rank's shard of it under data parallelism): ``(xb, yb, wb, rows)``."""
    x, y, sample_weight, xp, dp = run.x, run.y, run.sample_weight, run.xp, run.dp
    end = min(start + run.batch_size, _n(x))
    if run.staged is not None:  # host data: the batch staged while the one before computed
        xb, yb, wb = run.staged.batch(start)
        return xb, yb, wb, end - start
    lo, hi = (start, end) if dp is None else dp.shard(start, end)
    if order is None:
        sl = slice(lo, hi)
        wb = None if sample_weight is None else sample_weight[sl]
        return slice_rows(x, lo, hi), y[sl, ...], wb, end - start
    idx = order[lo:hi]
    return _take(x, idx, xp), _take(y, idx, xp), _take(sample_weight, idx, xp), end - start


def _loss_counts_hits(run: _Run):
    """The epoch's accuracy accumulator that the loss itself counts into, or None.

    Where the loss is the table's cross-entropy against integer labels (n,) without
    sample weights or mixed precision, the default accuracy's count
    of right answers (the arg-max of the logits against the labels) is added by the
    cross-entropy's own kernel, which scans each row for its maximum anyway
    (:func:`arraymlp.kernels.reference.cross_entropy_labels_mean_hits`): the same count
    as the metric's own kernel, without a pass and a hook of its own."""
    if (run.amp is not None or run.sample_weight is not None
            or run.lossfn is not LOSSES["cross_entropy"] or run.y.ndim != 1):
        return None
    for acc in run.accs:
        if type(acc.metric) is _AccuracyMetric:
            return acc
    return None


def _metrics_hook(run: _Run, yb, skip=None):
    """``on_outputs(out)`` adding a batch (targets ``yb``) to the epoch's metric sums
    (all but ``skip``), on the device (nothing read), or None without such metrics."""
    accs = run.accs if skip is None else [acc for acc in run.accs if acc is not skip]
    if not accs:
        return None
    make, xp = run.pair, run.xp

    def on_outputs(out):
        pair = make(yb, out, xp)
        for acc in accs:
            acc.update(pair)

    return on_outputs


def _step_metrics(run: _Run, yb):
    """``(on_outputs, hits)`` for a training step on targets ``yb``: the hook of the
    metrics the loss does not count (:func:`_metrics_hook`), and the count the loss
    adds the batch's right answers to (:func:`_loss_counts_hits`), or None."""
    acc = run.hits_acc
    if acc is None:
        return _metrics_hook(run, yb), None
    return _metrics_hook(run, yb, skip=acc), acc.metric.counted_by_loss(acc, int(yb.shape[0]))


def _per_batch_options(run: _Run) -> bool:
    """Whether the run uses an option of the estimators' (each step then reads its loss)."""
    return (run.l2_rule is not None or run.host_weight is not None or run.skip_zero_weight or not run.fuse
            or run.on_divergence is not None)


def _batch_l2(run: _Run, host_order, start: int) -> float | None:
    """The L2 coefficient of the batch at ``start``: ``run.l2``, or ``run.l2_rule`` of it
    and the batch's size (its weight sum, with host weights); None for a batch to skip
    (all its weights zero, with ``skip_zero_weight``)."""
    if run.l2_rule is None and run.host_weight is None:
        return run.l2
    end = min(start + run.batch_size, _n(run.x))
    lo, hi = (start, end) if run.dp is None else run.dp.shard(start, end)
    size = float(end - start)
    w = run.host_weight
    if w is not None:
        size = float(w[lo:hi].sum() if host_order is None else w[host_order[lo:hi]].sum())
        if run.skip_zero_weight and size <= 0.0:
            return None
    return run.l2 if run.l2_rule is None else run.l2_rule(run.l2, size)


def _step(run: _Run, order, start: int, epoch_lr: float, *, metrics: bool = True):
    """One training step on the batch at ``start``: its loss (an array, not read) and
    rows; the batch joins the epoch's metrics unless ``metrics`` is false (a replay)."""
    xb, yb, wb, rows = _batch(run, order, start)
    hook, hits = _step_metrics(run, yb) if metrics else (None, None)
    value, update = _loss_then_update(run.model, run.opt, run.lossfn, xb, yb, wb, xp=run.xp, l2=run.l2,
                                      dp=run.dp, amp=run.amp, on_outputs=hook, hits=hits)
    update(epoch_lr)
    run.step += 1
    if getattr(value, "ndim", None) != 0:  # a custom loss's Python float, or a one-element array
        model = run.model
        value = run.xp.reshape(run.xp.asarray(value, dtype=model.dtype, device=model.device), ())
    return value, rows


def _overrides_batch_end(cb) -> bool:
    """Whether a callback has an ``on_batch_end`` of its own (it then gets every
    step's loss as a float)."""
    hook = getattr(cb, "on_batch_end", None)
    return hook is not None and getattr(hook, "__func__", None) is not Callback.on_batch_end


#: Per-step losses are kept as 0-d device arrays and stacked into one vector every
#: this many steps (one small kernel), so that a long epoch holds few arrays.
_STACK_EVERY = 256

#: A long epoch reads its losses every this many steps (one transfer), checks them, and
#: copies the parameters again: a divergence is then found, and replayed, within this
#: many steps. A read drains the device's queue once, and the copy costs about one
#: optimiser step: together well below 1 % of 1000 steps.
_CHECK_EVERY = 1000


def _run_epoch(run: _Run, epoch: int, epoch_lr: float) -> tuple[float, int]:
    """The epoch's batches, one step each, until a callback asks to stop: ``(summed loss, rows seen)``.

    Without data parallelism, without a callback that watches batches and without the
    estimators' per-batch options (:class:`_Run`), no step reads anything back to the
    host: the losses stay on the device and are read together at the end of the epoch
    (:func:`_run_epoch_on_device`).
    """
    model, dp, xp = run.model, run.dp, run.xp
    run.accs = [m.start(xp, model.dtype, model.device) for m in run.metrics]
    run.hits_acc = _loss_counts_hits(run)
    host_order = None
    if run.staged is not None:  # host data: the host gathers the batches, in the order drawn there
        host_order = model.rng.host.permutation(_n(run.x)) if run.shuffle else None  # rng.permutation's draw
        run.staged.begin(host_order)
        order = None
    elif run.shuffle and run.host_weight is not None:  # the weight sums need the order on the host
        host_order = model.rng.host.permutation(_n(run.x))  # the draw of rng.permutation
        order = xp.asarray(host_order, dtype=index_dtype(xp), device=model.device)
    else:
        order = model.rng.permutation(_n(run.x)) if run.shuffle else None
    if dp is not None and run.accs:  # every rank's sums about the epoch's first row: they add up
        first = run.y[0:1, ...] if order is None else _take(run.y, order[0:1], xp)
        for acc in run.accs:
            acc.metric._anchor(acc, first)
    if (dp is None and not _per_batch_options(run)
            and not any(_overrides_batch_end(cb) for cb in run.callbacks)):
        return _run_epoch_on_device(run, epoch, epoch_lr, order)
    total, seen = 0.0, 0
    for start in range(0, _n(run.x), run.batch_size):
        l2 = _batch_l2(run, host_order, start)
        if l2 is None:
            continue  # a batch of zero-weight samples carries no gradient: no step
        xb, yb, wb, nb = _batch(run, order, start)
        hook, hits = _step_metrics(run, yb)
        value, update = _loss_then_update(model, run.opt, run.lossfn, xb, yb, wb, xp=xp, l2=l2, dp=dp,
                                          amp=run.amp, fuse=run.fuse, on_outputs=hook, hits=hits)
        value = float(value)
        if not math.isfinite(value):
            error = (run.on_divergence or _divergence)(run, value, epoch, start // run.batch_size)
            if error is not None:  # on_divergence may let the step go ahead
                raise error
        update(epoch_lr)
        del update  # frees the batch's caches before the next forward
        run.step += 1
        total += value * nb
        seen += nb
        logs = {"epoch": epoch, "step": run.step, "loss": value}
        for cb in run.callbacks:
            run.stop = bool(cb.on_batch_end(model, logs)) or run.stop
        if dp is not None:
            run.stop = dp.agree_batch(run.stop)
        if run.stop:
            break
    return total, seen


def _snapshot(run: _Run) -> tuple:
    """Copies of what an epoch's steps change (parameters, optimiser state, step
    counter, generator state, a mixed-precision loss scale), taken on the device at the
    epoch's start."""
    model = run.model
    params = [{k: run.xp.asarray(a, copy=True) for k, a in p.items()} for p in model.params]
    rng = None if model.rng is None else model.rng.get_state()
    amp = None if run.amp is None else run.amp.get_state()
    return params, run.opt.state_dict(), run.step, rng, amp


def _restore(run: _Run, snapshot: tuple) -> None:
    params, opt_state, step, rng_state, amp_state = snapshot
    run.model.params = [dict(p) for p in params]
    run.opt.load_state_dict(opt_state)
    run.step = step
    if rng_state is not None:
        run.model.rng.set_state(rng_state)
    if amp_state is not None:
        run.amp.set_state(amp_state)


def _run_epoch_on_device(run: _Run, epoch: int, epoch_lr: float, order) -> tuple[float, int]:
    """The epoch's steps with no host read: each step's loss is kept on the device and
    all are read in one transfer at the end (every :data:`_CHECK_EVERY` steps in a long
    epoch). A non-finite loss is found then; the steps since the last read are replayed
    from a snapshot taken there, up to the step before it (same batches, same dropout
    masks), so that :class:`DivergenceError` leaves the parameters of the last finite
    step, as a check after every step would."""
    xp = run.xp
    n_steps = -(-_n(run.x) // run.batch_size)
    snapshot, first = _snapshot(run), 0  # the state before step ``first`` of the epoch
    total, values = 0.0, StepValues(xp, _STACK_EVERY)
    for k in range(n_steps):
        value, _ = _step(run, order, k * run.batch_size, epoch_lr)
        values.append(value)
        if k + 1 - first < _CHECK_EVERY and k + 1 < n_steps:
            continue
        losses = values.read()  # the read
        for i, value in enumerate(losses.tolist()):
            if not math.isfinite(value):
                _replay(run, snapshot, order, first, first + i, epoch_lr)
                raise _divergence(run, value, epoch, first + i)
            total += value * (min((first + i + 1) * run.batch_size, _n(run.x)) - (first + i) * run.batch_size)
        first = k + 1
        if first < n_steps:
            snapshot = _snapshot(run)
    return total, _n(run.x)


def _replay(run: _Run, snapshot: tuple, order, first: int, stop: int, epoch_lr: float) -> None:
    """Back to the snapshot taken before step ``first`` of the epoch, then steps
    ``first`` to ``stop - 1`` again."""
    _restore(run, snapshot)
    for k in range(first, stop):
        _step(run, order, k * run.batch_size, epoch_lr, metrics=False)


def _finish_epoch(run: _Run, epoch: int, epoch_lr: float, t0: float, total: float, seen: int) -> bool:
    """Validation, history, the schedule's step, progress and ``on_epoch_end``; whether to stop."""
    model, history, schedule, dp = run.model, run.history, run.schedule, run.dp
    logs = {"epoch": epoch, "step": run.step, "loss": total / max(seen, 1), "lr": epoch_lr,
            "val_loss": None, "val_metric": None}
    if run.accs:  # the training metrics' sums, read once, now (and added over the ranks: one collective)
        values = read_results(run.accs, run.xp) if dp is None else read_results(run.accs, run.xp,
                                                                                gather=dp.comm.allgather)
        for acc, value in zip(run.accs, values):
            logs[acc.metric.name] = value
    if run.val is not None:
        x_val, y_val = run.val
        task = run.lossfn.task
        args = (model, x_val, y_val, run.lossfn, task, run.xp)
        if dp is None:
            val_loss, val = _evaluate(*args, metrics=run.val_metrics, host=run.val_host)
        else:
            val_loss, val = dp.on_root(_evaluate, *args, metrics=run.val_metrics)
        logs["val_loss"], logs["val_metric"] = val_loss, val[history.metric_name]
        for name, value in val.items():
            logs["val_" + name] = value
    logs["time"] = time.perf_counter() - t0
    history.loss.append(logs["loss"])
    history.lr.append(epoch_lr)
    history.time.append(logs["time"])
    if logs["val_loss"] is not None:
        history.val_loss.append(logs["val_loss"])
        history.val_metric.append(logs["val_metric"])
    for name, series in history.metrics.items():
        if name in logs:
            series.append(logs[name])
    if schedule is not None and callable(getattr(schedule, "step", None)):
        # the next epoch's rate comes from schedule(epoch); step only records the metric
        schedule.step(logs["val_loss"] if logs["val_loss"] is not None else logs["loss"])
    run.bar.update(logs, [m.name for m in run.metrics] + ["val_loss"] + ["val_" + m.name for m in run.val_metrics])
    for cb in run.callbacks:
        run.stop = bool(cb.on_epoch_end(model, logs)) or run.stop
    if dp is not None:
        run.stop = dp.agree(run.stop)
    if run.stop:
        history.stopped_early = True
    return run.stop


def _finish(run: _Run, quiet: contextlib.ExitStack) -> None:
    """However the run ends: the step counter, the bar, and ``on_train_end``."""
    quiet.close()
    run.model.steps_ = run.step
    run.bar.close()
    for cb in run.callbacks:
        cb.on_train_end(run.model, run.history)


def _stage(run: _Run, comm, full_batch: bool) -> None:
    """Host data for a model on another device: the batches are gathered on the host and
    copied one batch ahead (:class:`arraymlp._staging.StagedEpochs`: pinned buffers and a
    side stream on a GPU), never the whole data at once; a full-batch optimiser, which
    needs all of it every iteration, has it copied to the device once instead."""
    model = run.model
    if comm is not None:
        msg = ("comm= (data parallelism) needs x on the model's device; host data is staged batch by batch only "
               "without comm. Move x, y (and sample_weight) to the model's device first")
        raise ValueError(msg)
    if full_batch:
        run.x, run.y, run.sample_weight = (None if a is None else to_backend(a, model.xp, device=model.device)
                                           for a in (run.x, run.y, run.sample_weight))
        return
    run.staged = StagedEpochs([run.x, run.y, run.sample_weight], model.xp, model.device, run.batch_size)


def _check_full_batch(run: _Run, comm, resume_from) -> None:
    """What a full-batch optimiser cannot combine with, refused by name."""
    if run.schedule is not None:
        msg = "schedule= does not apply to optimizer='lbfgs': its line search chooses each step length"
        raise ValueError(msg)
    if comm is not None:
        msg = "comm= (data parallelism) is not supported with optimizer='lbfgs'; use a mini-batch optimiser"
        raise ValueError(msg)
    if resume_from is not None:
        msg = "resume_from= is not supported with optimizer='lbfgs'; L-BFGS's history is not checkpointed"
        raise ValueError(msg)
    if run.amp is not None:
        msg = ("precision= (mixed precision) is not supported with optimizer='lbfgs': its line search needs the "
               "objective in the parameters' own dtype; train in float32 or float64")
        raise ValueError(msg)
    # by class name, so that training does not import the layers (the module graph keeps it above them)
    rates = [float(layer.p) for layer in run.model.layers
             if any(c.__name__ == "Dropout" and c.__module__ == "arraymlp.layers" for c in type(layer).__mro__)]
    if any(rates):
        msg = (f"optimizer='lbfgs' needs a deterministic objective, but the model has dropout (p={max(rates)}), "
               "which draws a new mask at each evaluation; remove the dropout or use a mini-batch optimiser")
        raise ValueError(msg)


def _run_full_batch(run: _Run, epochs: int) -> None:
    """The optimiser owns the iteration: one "epoch" per L-BFGS iteration over the whole data set.

    Each iteration records its loss (at the new point, L2 term included) and the training
    metrics (on all of ``(x, y)`` at the new point: from the outputs of the evaluation that
    reached it, or one more forward pass when the line search settled on an earlier trial)
    in the history, and runs the callbacks' epoch hooks (and ``on_batch_end`` once);
    training ends after ``epochs`` iterations, when a callback asks, or when the
    optimiser's own stopping rules hold (``model.optimizer_.status`` says which).
    """
    model, xp, opt = run.model, run.xp, run.opt
    # for the metrics: evaluations so far, and the outputs kept with the evaluation they came from
    last = {"count": 0, "n": 0, "out": None}

    def keep(out):
        last["count"] += 1
        last["n"], last["out"] = last["count"], out

    hook = keep if run.metrics else None

    def fun(params):
        return model._loss_and_grads(run.x, run.y, run.lossfn, xp=xp, sample_weight=run.sample_weight, l2=run.l2,
                                     on_outputs=hook)

    def add_metrics(info) -> None:
        run.accs = [m.start(xp, model.dtype, model.device) for m in run.metrics]
        if last["n"] != info.evaluation:  # the point reached is not the latest evaluation's

            def replace(out):
                last["n"], last["out"] = -1, out

            model._loss_and_dout(run.x, run.y, run.lossfn, xp=xp, on_outputs=replace)
        pair = run.pair(run.y, last["out"], xp)
        for acc in run.accs:
            acc.update(pair)

    iterations = opt.iterate(fun, model.params)
    try:
        for epoch in range(run.start_epoch, epochs):
            t0 = time.perf_counter()
            if _begin_epoch(run, epoch):
                break
            try:
                info = next(iterations)
            except StopIteration:
                break
            except FloatingPointError as exc:
                msg = (f"the training loss is not finite at the starting parameters ({exc}). "
                       "Scale the inputs, or check the initial parameters.")
                raise DivergenceError(msg, epoch=epoch, step=run.step,
                                      params_finite=_params_finite(model.params, xp)) from exc
            run.step += 1
            if run.metrics:
                add_metrics(info)
            logs = {"epoch": epoch, "step": run.step, "loss": info.loss}
            for cb in run.callbacks:
                run.stop = bool(cb.on_batch_end(model, logs)) or run.stop
            if _finish_epoch(run, epoch, opt.lr, t0, info.loss, 1):
                break
    finally:
        iterations.close()


def _is_ensemble(model) -> bool:
    """Whether ``model`` holds K stacked members (``ensemble=K``): its training and
    prediction are :mod:`arraymlp.ensemble`'s, which these functions hand it to."""
    return getattr(model, "ensemble", None) is not None


def fit(model, x, y, *, loss: str | Loss | None = None, optimizer: str | Optimizer = "adam",
        lr: float | None = None, schedule: Any = None, epochs: int = 10, batch_size: int = 32,
        shuffle: bool = True, validation_data: tuple | None = None, validation_split: float = 0.0,
        metrics: Sequence[Any] | None = None, early_stopping: EarlyStopping | int | None = None,
        callbacks: Sequence[Callback] = (), progress: bool = True, verbose: bool = False, seed: int | None = None,
        l2: float = 0.0, sample_weight: Any = None, comm: Any = None, resume_from: Any = None,
        precision: Any = None) -> History:
    """Train ``model`` on ``(x, y)`` with mini-batch gradient descent, or full-batch L-BFGS.

    With ``optimizer="lbfgs"`` (or an :class:`arraymlp.optim.LBFGS`) each "epoch" is one
    L-BFGS iteration over the whole data set (``batch_size`` and ``shuffle`` do not
    apply; ``epochs`` caps the iterations, and the optimiser's ``tol``, ``max_iter`` and
    ``max_fun`` may stop it earlier: ``model.optimizer_.status`` says why it stopped).

    ``model.fit(x, y, ...)`` is this function with the model as its first argument. A
    model built with ``ensemble=K`` is trained by :func:`arraymlp.ensemble.fit`, which
    this function hands it to (as :func:`partial_fit`, :func:`predict`,
    :func:`predict_proba` and :func:`evaluate` do).

    Parameters
    ----------
    model : Sequential
    x : array, shape (n, n_features)
        Or a sparse matrix of that shape whose first layer is Dense: scipy.sparse (CSR,
        CSC, COO) for a model on NumPy, a sparse torch tensor (CSR, CSC, COO) for one on
        torch, cupyx.scipy.sparse for one on CuPy; it is never densified. Host data (a
        NumPy array, or an array on a CPU device) for a model already on another device (a
        GPU) is checked on the host and staged batch by batch: each batch is gathered
        on the host and copied one batch ahead (pinned memory and a side stream on a
        GPU), never the whole data at once; ``y``, ``sample_weight`` then come on the
        host too. The result equals training on the data moved to the device first.
    y : array
        Targets: shape (n, n_outputs) or (n,) for one output; integer class labels (n,)
        (or one-hot floats (n, k)) for ``cross_entropy``; labels 0/1 (int, bool or
        float, shape (n,) or (n, n_outputs)) for ``binary_cross_entropy``. The shape
        rank and dtype family of ``y`` are recorded (``target_ndim_``,
        ``target_kind_``) so that :func:`predict` answers in the same form.
    loss : str or Loss, optional
        A key of :data:`arraymlp.losses.LOSSES`. When omitted it is inferred from the
        output activation (:func:`infer_loss`): softmax takes ``"cross_entropy"``,
        sigmoid ``"binary_cross_entropy"``, the identity ``"mse"`` (or
        ``"cross_entropy"`` for integer labels (n,) and several outputs, read as
        logits); an ambiguous case raises and asks for ``loss=``.
    optimizer : str or Optimizer
        ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, ``"lbfgs"`` or an instance.
    lr : float, optional
        Base learning rate (overrides the optimiser's default).
    schedule : Schedule or callable, optional
        ``schedule(epoch) -> lr``; a ``ReduceOnPlateau`` is stepped with the monitored loss.
    epochs : int
    batch_size : int
    shuffle : bool
        Draw a new permutation every epoch (from the model's generator).
    validation_data : (x_val, y_val), optional
        Not together with ``validation_split``.
    validation_split : float
        Fraction of the last rows of ``(x, y)`` held out for validation. The validation
        loss and metrics are unweighted: ``sample_weight`` weighs the training rows only.
    metrics : sequence of str, Metric or callable, optional
        Recorded per epoch in ``History.metrics`` on the training batches (``"accuracy"``)
        and on the validation data (``"val_accuracy"``): names of
        :data:`arraymlp.metrics.METRICS` (``"accuracy"``, ``"top_k_accuracy"`` (k=5),
        ``"mae"``, ``"r2"``), :func:`arraymlp.metrics.top_k_accuracy` ``(k)``, or
        callables ``fn(y_true, y_pred, *, xp) -> 0-d array``. Default: ``["accuracy"]``
        for a classification loss, none for a regression one; ``[]`` records none.
        Accumulated on the device and read once per epoch (see :mod:`arraymlp.metrics`);
        under ``comm`` each rank sums its shards' rows and the sums are added over the
        ranks once per epoch, so every rank records the single-process values. With
        ``optimizer="lbfgs"`` they are taken once per iteration, on the whole training set
        at the point the iteration reached.
    early_stopping : EarlyStopping or int, optional
        An int is the patience of ``EarlyStopping("val_loss")`` (``"loss"`` without validation).
    callbacks : sequence of Callback
    progress : bool
        Show a tqdm bar when stderr is a terminal.
    verbose : bool
        Print one line per epoch when there is no bar, and the loss when it was inferred.
    seed : int, optional
        Reseed the model's generator (shuffling and dropout) for this run: the same seed
        and data give bit-identical parameters on NumPy.
    l2 : float
        L2 penalty ``l2/2 * sum(W**2)`` on the weight matrices (finite, non-negative),
        added to each batch's mean loss.
    sample_weight : array of shape (n,), optional
    comm : mpi4py communicator or arraymlp.distributed.DataParallel, optional
        Train data-parallel over MPI: every rank calls ``fit`` with the same arguments
        and data, and computes its shard of each global batch of ``batch_size`` rows;
        see :mod:`arraymlp.distributed`.
    resume_from : str or path-like, optional
        A checkpoint file written by :class:`arraymlp.Checkpoint` (or a directory of
        them: the latest is used). Training continues after the checkpoint's last
        epoch up to ``epochs`` in total, with its parameters, optimiser state and
        settings, step counter, schedule state, random-generator state, loss scale and
        history, so an interrupted run ends bit-identical (on NumPy) to an
        uninterrupted one. ``lr=`` sets a new base rate for the restored optimiser; an
        optimiser instance must have the saved settings (its name takes them), and a
        checkpoint of a mixed-precision run needs ``precision=`` of its dtype.
    precision : {None, "float16", "bfloat16"} or MixedPrecision, optional
        Mixed precision: each step computes in float16 (with dynamic loss scaling) or
        bfloat16 over the model's float32 master weights, which the optimiser updates;
        see :class:`arraymlp.MixedPrecision`. None (or the model's dtype): the model's
        dtype throughout.

    Returns
    -------
    History

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> x = np.random.default_rng(0).normal(size=(64, 2))
    >>> y = (x[:, 0] > 0).astype(np.int64)  # 0/1 labels of shape (n,)
    >>> model = am.MLP([2, 8, 1], output_activation="sigmoid", backend="numpy", seed=0)
    >>> history = model.fit(x, y, lr=0.05, epochs=20, progress=False)  # binary_cross_entropy
    >>> model.loss_, history.metric_name, len(history["accuracy"])
    ('binary_cross_entropy', 'accuracy', 20)
    >>> model.predict(x).shape, model.predict(x).dtype
    ((64,), dtype('int64'))
    >>> float((model.predict(x) == y).mean()) > 0.9
    True
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "x", "y")}
    if _is_ensemble(model):  # K members at once: the ensemble's loop (its loss defaults to "mse")
        from . import ensemble

        if options["loss"] is None:
            del options["loss"]
        return ensemble.fit(model, x, y, **options)
    return _train(model, x, y, reuse_optimizer=False, **options)


def _train(model, x, y, *, reuse_optimizer, loss, optimizer, lr, schedule, epochs, batch_size, shuffle,
           validation_data, validation_split, metrics, early_stopping, callbacks, progress, verbose, seed, l2,
           sample_weight, comm, resume_from, precision) -> History:
    """:func:`fit`, with ``reuse_optimizer`` for :func:`partial_fit` (every option
    required: a parameter of ``fit`` this does not take fails at once)."""
    _check_validation(validation_data, validation_split)
    epochs, batch_size = _check_arguments(epochs, batch_size, validation_split)
    l2 = _check_l2(l2)
    x, y, sample_weight, val, xp, lossfn, form, host = _prepare_data(model, x, y, sample_weight, loss,
                                                                     validation_data, validation_split, verbose)
    val_host = val is not None and val[2]
    val = None if val is None else val[:2]
    if metrics is None:
        metrics = ["accuracy"] if lossfn.task != "regression" else []
    metrics = get_metrics(metrics, lossfn.task, model.n_outputs)
    val_metrics = list(metrics)
    main = get_metrics(["accuracy" if lossfn.task != "regression" else "r2"], lossfn.task, model.n_outputs)[0]
    if all(m.name != main.name for m in val_metrics):  # History.val_metric's
        val_metrics.append(main)
    amp = resolve_precision(precision, model, xp, data_parallel=comm is not None,
                            previous=getattr(model, "precision_", None) if reuse_optimizer else None)
    model.precision_ = amp  # checkpoints save its loss scale; copy() and to() carry it on
    opt = _set_up_model(model, lossfn, form, optimizer, lr, schedule, seed, xp, reuse_optimizer)
    callbacks = _arrange_callbacks(callbacks, early_stopping, validation=val is not None)
    full_batch = isinstance(opt, LBFGS)  # the optimiser owns the iteration
    run = _Run(model=model, x=x, y=y, sample_weight=sample_weight, val=val, lossfn=lossfn, xp=xp, opt=opt,
               schedule=schedule, callbacks=callbacks, batch_size=batch_size, shuffle=shuffle, l2=l2,
               metrics=metrics, val_metrics=val_metrics, amp=amp,
               val_host=val_host)
    if host:
        _stage(run, comm, full_batch)
    if full_batch:
        _check_full_batch(run, comm, resume_from)
    _start_run(run, epochs, resume_from, comm, progress, verbose, "partial_fit" if reuse_optimizer else "fit",
               lr=lr, given=optimizer if isinstance(optimizer, Optimizer) else None)
    quiet = contextlib.ExitStack()
    quiet.enter_context(quiet_overflow(xp))
    try:
        if full_batch:
            _run_full_batch(run, epochs)
            return run.history
        for epoch in range(run.start_epoch, epochs):
            t0 = time.perf_counter()
            epoch_lr = run.base_lr if schedule is None else float(schedule(epoch))
            if _begin_epoch(run, epoch):  # asked for at the start of the epoch: none of its batches runs
                break
            total, seen = _run_epoch(run, epoch, epoch_lr)
            if _finish_epoch(run, epoch, epoch_lr, t0, total, seen):
                break
    except DivergenceError:
        # the error leaves the last finite step's parameters: early stopping does not put others back
        run.history._diverged = True
        raise
    finally:
        _finish(run, quiet)
    return run.history


def partial_fit(model, x, y, *, loss: str | Loss | None = None, optimizer: str | Optimizer | None = None,
                lr: float | None = None, batch_size: int = 32, shuffle: bool = True, l2: float = 0.0,
                sample_weight: Any = None, metrics: Sequence[Any] | None = None,
                precision: Any = None, comm: Any = None) -> History:
    """One pass over ``(x, y)``, keeping the optimiser state of earlier calls.

    ``model.partial_fit(x, y, ...)`` is this function with the model as its first argument.

    Parameters
    ----------
    model : Sequential
    x : array, shape (n, n_features)
    y : array, shape (n, n_outputs), (n,), or labels (n,)
        As for :func:`fit`.
    loss : str or Loss, optional
        Default: the loss of the last fit, else inferred as :func:`fit` does.
    optimizer : str or Optimizer, optional
        Default: the optimiser of the last fit, with its state (Adam otherwise). A name
        of that optimiser's kind (``"adam"`` for an Adam) keeps it too, state and
        hyper-parameters; another name or instance starts that one afresh.
    lr : float, optional
        A new base learning rate for the kept optimiser.
    batch_size : int
    shuffle : bool
    l2 : float
    sample_weight : array of shape (n,), optional
    metrics : sequence of str, Metric or callable, optional
        As for :func:`fit`.
    precision : {None, "float16", "bfloat16"} or MixedPrecision, optional
        As for :func:`fit`. The loss scale carries over from call to call: a dtype
        name continues the model's ``precision_`` (that of its last call) when it
        computes in that dtype; passing one :class:`arraymlp.MixedPrecision` to every
        call does the same.
    comm : mpi4py communicator or arraymlp.distributed.DataParallel, optional
        The pass data-parallel over MPI, as :func:`fit`'s ``comm``: every rank makes the
        same calls in the same order with the same arguments and data (each call's may
        differ from the last), and each call checks that (one small ``allgather``:
        shapes, dtypes, options, the optimiser's step count), then broadcasts the root's
        parameters and generator state. The ranks' optimiser states stay equal because
        every rank applies the same updates; a sequence of calls gives the parameters,
        optimiser state and generator counters of the same calls in one process.

    Returns
    -------
    History
        Of the one epoch.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> x = np.linspace(-1, 1, 32).reshape(-1, 1)
    >>> model = am.MLP([1, 8, 1], backend="numpy", seed=0)
    >>> losses = [model.partial_fit(x, 2 * x, lr=0.01).loss[0] for _ in range(3)]
    >>> model.loss_, model.optimizer_.step_count, losses[2] < losses[0]
    ('mse', 3, True)
    """
    if _is_ensemble(model):
        from . import ensemble

        return ensemble.partial_fit(model, x, y, loss=loss, optimizer=optimizer, lr=lr, batch_size=batch_size,
                                    shuffle=shuffle, l2=l2, sample_weight=sample_weight, metrics=metrics,
                                    precision=precision, comm=comm)
    if loss is None:
        loss = getattr(model, "loss_", None)
    defaults = {k: p.default for k, p in inspect.signature(fit).parameters.items()
                if p.default is not inspect.Parameter.empty}
    options = {**defaults, "loss": loss, "optimizer": optimizer, "lr": lr, "epochs": 1, "batch_size": batch_size,
               "shuffle": shuffle, "progress": False, "l2": l2, "sample_weight": sample_weight, "metrics": metrics,
               "precision": precision, "comm": comm}
    return _train(model, x, y, reuse_optimizer=True, **options)


def evaluate(model, x, y, *, loss: str | Loss | None = None, metrics: Sequence[Any] | None = None,
             batch_size: int = 4096) -> dict[str, float]:
    """The loss and metrics of ``model`` on ``(x, y)``, in inference mode.

    ``model.evaluate(x, y, ...)`` is this function with the model as its first argument.

    Parameters
    ----------
    model : Sequential
    x : array, shape (n, n_features)
        On the model's device, or host data (as for :func:`fit`), staged to the device
        block by block.
    y : array, shape (n, n_outputs), (n,), or labels (n,)
        Targets as for :func:`fit`.
    loss : str or Loss, optional
        Default: the loss of the last fit, else inferred as :func:`fit` does.
    metrics : sequence of str, Metric or callable, optional
        As for :func:`fit`. Default: ``["accuracy"]`` for a classification loss,
        ``["r2"]`` for a regression one.
    batch_size : int
        Rows per forward pass (memory only: the result does not depend on it).

    Returns
    -------
    dict
        ``{"loss": float, name: float, ...}``, one entry per metric. The sums are
        kept on the device and read once.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([2, 3], output_activation="softmax", backend="numpy", seed=0)
    >>> x, y = np.eye(2)[[0, 1, 1]], np.array([0, 2, 1])
    >>> scores = model.evaluate(x, y, metrics=["accuracy", am.metrics.top_k_accuracy(2)])
    >>> sorted(scores)
    ['accuracy', 'loss', 'top_2_accuracy']
    >>> proba = model.predict_proba(x)
    >>> bool(np.isclose(scores["loss"], -np.mean(np.log(proba[[0, 1, 2], y]))))
    True
    """
    if _is_ensemble(model):  # each member's values (K,), and the averaged prediction's under "ensemble_..."
        from . import ensemble

        return ensemble.evaluate(model, x, y, loss=loss, metrics=metrics, batch_size=batch_size)
    host = _is_host_data(model, x)  # staged to the model's device block by block, as fit does
    if host:
        x, y = _on_host(x, "x"), _on_host(y, "y")
    x, dxp = model._check_x(x, host=host)
    y = model._check_target(y, dxp, host=host)
    dtype, device = (model.dtype, model.device) if not host else (resolve_dtype(dxp, model.dtype_name), device_of(x))
    if _n(y) != _n(x):
        msg = f"x has {_n(x)} samples but y has {_n(y)}"
        raise ValueError(msg)
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)
    if loss is None:
        loss = getattr(model, "loss_", None)
    lossfn = _resolve_loss(model, loss, y, dxp, False)
    if lossfn.task == "multilabel":
        y = _binary_targets(y, dxp, lossfn, dtype, "y")
    check_targets(lossfn, model.n_outputs, y, dtype=dtype, device=device, xp=dxp)
    if metrics is None:
        metrics = ["accuracy" if lossfn.task != "regression" else "r2"]
    metrics = get_metrics(metrics, lossfn.task, model.n_outputs)
    xp = model.xp
    with quiet_overflow(xp):
        value, values = _evaluate(model, x, y, lossfn, lossfn.task, xp, batch_size=int(batch_size), metrics=metrics,
                                  host=host)
    return {"loss": value, **values}


def predict_proba(model, x):
    """Class probabilities: shape (n, n_classes) for a multiclass model, (n, n_outputs)
    for 0/1 outputs (so (n, 1) for a binary classifier: the probability of 1).

    Uses the model's own softmax/sigmoid output when it has one, and applies it to the
    logits of a model trained with a classification loss otherwise. For an ensemble,
    the members' averaged probabilities (:func:`arraymlp.ensemble.predict_proba`).
    """
    from .functional import sigmoid, softmax

    if _is_ensemble(model):
        from . import ensemble

        return ensemble.predict_proba(model, x)
    out = model(x)
    xp = model.xp
    task = getattr(model, "task_", None)
    act = model.output_activation
    if act in ("softmax", "sigmoid"):
        return out
    if task == "multiclass":
        return softmax(out, xp=xp)
    if task == "multilabel":
        return sigmoid(out, xp=xp)
    msg = "predict_proba needs a classifier: a softmax/sigmoid output, or a model fitted with a classification loss"
    raise ValueError(msg)


def _prediction_form(model) -> tuple[str, bool, str]:
    """What :func:`predict` returns: ``(task, one_d, dtype name)``; ``one_d`` when a
    one-output model was fitted on targets of shape (n,) (multiclass labels are (n,)
    always)."""
    task = getattr(model, "task_", None)
    if task is None:
        task = {"softmax": "multiclass", "sigmoid": "multilabel"}.get(model.output_activation, "regression")
    if task == "multiclass":
        return task, True, "int64"
    one_d = getattr(model, "target_ndim_", None) == 1 and model.n_outputs == 1
    if task == "regression":
        return task, one_d, model.dtype_name
    kind = getattr(model, "target_kind_", None)
    return task, one_d, {"bool": "bool", "float": model.dtype_name}.get(kind, "int64")


def predict(model, x):
    """Predictions, in the form of the ``y`` the model was fitted on.

    - one class per sample (``cross_entropy``): class indices, int64 of shape (n,);
    - 0/1 outputs (``binary_cross_entropy``): ``predict_proba(x) > 0.5`` as labels of
      ``y``'s dtype family (bool, int64 or the model's float dtype) and shape: (n,)
      when ``y`` was (n,), (n, n_outputs) otherwise;
    - regression: the outputs, (n,) when ``y`` was (n,) for one output, else
      (n, n_outputs).

    So ``(model.predict(x) == y).mean()`` is the accuracy, never a broadcast of (n, 1)
    against (n,). A model that was not fitted (or read from an older file) answers
    by its output activation, in shape (n, n_outputs) (int64 labels). For an ensemble,
    the prediction of the members' averaged probabilities or outputs
    (:func:`arraymlp.ensemble.predict`).
    """
    if _is_ensemble(model):
        from . import ensemble

        return ensemble.predict(model, x)
    task, one_d, dtype = _prediction_form(model)
    xp = model.xp
    if task == "multiclass":
        return xp.argmax(predict_proba(model, x), axis=1)
    out = predict_proba(model, x) if task == "multilabel" else model(x)
    if one_d:
        out = xp.reshape(out, (out.shape[0],))
    if task == "regression":
        return out
    labels = out > 0.5
    if dtype == "bool":
        return labels
    # integer labels in the namespace's index dtype (int64; int32 on JAX's 32-bit mode)
    return xp.astype(labels, index_dtype(xp) if dtype == "int64" else getattr(xp, dtype))
