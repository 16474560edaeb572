"""Metrics: accuracy, top-k accuracy, mean absolute error, R^2, or your own.

A :class:`Metric` is accumulated over the batches of an epoch (or of
:meth:`arraymlp.Sequential.evaluate`) as sums and counts that stay on the arrays'
device; nothing is read to the host until the epoch ends, when every metric's sums
are read together (:func:`read_results`). So the values are exact over the whole
epoch, not a mean of per-batch values: R^2 keeps per-output sums of ``y``, ``y^2``
(about a shift, for accuracy in float32) and of the squared residuals, and divides
once.

Each metric is also a plain function of a whole set of targets and predictions::

    am.metrics.accuracy(y_true, y_pred)         # labels, same shape (no broadcasting)
    am.metrics.top_k_accuracy(3)(y_true, scores)  # labels (n,), scores (n, k)
    am.metrics.mae(y_true, y_pred)
    am.metrics.r2(y_true, y_pred)

What a metric reads in ``fit`` and ``evaluate``
-----------------------------------------------
``accuracy``: the predicted labels (what ``predict`` returns) against the targets.
For one class per sample (``cross_entropy``) the fraction of samples whose arg-max
is the true class (targets: labels ``(n,)``, or one-hot / probabilities ``(n, k)``,
whose arg-max is the class). For 0/1 outputs (``binary_cross_entropy``) the fraction
of correct 0/1 values: the accuracy for one output, one minus the Hamming loss for
several. ``top_k_accuracy``: whether the true class is among the ``k`` highest
scores. ``mae`` and ``r2``: the model's predictions (the rates, ``exp`` of the
outputs, for ``poisson_nll``) against the targets, R^2 averaged uniformly over the
outputs as scikit-learn's ``r2_score`` does (1 for a constant target predicted
exactly, 0 for one predicted otherwise). A callable ``fn(y_true, y_pred, *, xp)``
gets the batch's targets and the predictions in ``predict``'s form and returns a 0-d
array; it is averaged over the batches weighted by their sizes, which is exact for a
metric that is a mean over samples.

Training metrics are computed on each training batch's forward pass, before that
step's update (with dropout active), as Keras does; validation and ``evaluate`` use
inference mode.

In data-parallel training (``fit(..., comm=)``) each rank accumulates the rows of its
shards, and when the epoch ends the ranks' sums and counts are added (one collective),
so every rank gets the values a single process gets over the whole batches: the
library's metrics keep sums that add up (R^2's are taken about the epoch's first
target row on every rank); a callable's per-shard values are weighted by the shards'
row counts, which is exact for a mean over samples.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy

from ._backend import device_of, dtype_mode, get_namespace, has_float64, index_dtype, is_float16, memo, to_numpy
from .kernels import kernels_for

__all__ = [
    "METRICS",
    "Metric",
    "accuracy",
    "get_metric",
    "mae",
    "r2",
    "top_k_accuracy",
]

_CLASSIFICATION = ("multiclass", "multilabel")


def _shape(a) -> tuple:
    return tuple(int(s) for s in a.shape)


_ACC: dict[Any, Any] = {}


def _sum_dtype(xp, dtype, device):
    """The dtype sums accumulate in: float64 where the namespace offers it on the
    device, else float32 (float16 sums of squares overflow at 65504)."""

    def pick():
        try:
            info = xp.__array_namespace_info__()
            if "float64" in info.dtypes(device=device, kind="real floating") and has_float64(xp, device):
                return xp.float64  # (JAX's 32-bit mode lists float64 but makes float32)
        except (AttributeError, TypeError, ValueError):
            pass
        return xp.float32 if is_float16(dtype, xp) else dtype

    return memo(_ACC, (xp, dtype, str(device), dtype_mode(xp)), pick)


class _Pair:
    """One batch's targets and what the model made of them, in the forms metrics read.

    ``out`` is the last layer's output as the forward pass gives it (the logits when
    the output activation is fused into the loss); ``threshold`` splits 0/1 outputs
    (0 for logits, 0.5 for probabilities); ``rates`` marks log-rate outputs (Poisson).
    """

    __slots__ = ("y", "out", "task", "xp", "threshold", "rates")  # one a step: cheap to make

    def __init__(self, y, out, task: str, xp, *, threshold: float = 0.0, rates: bool = False):
        self.y, self.out, self.task, self.xp = y, out, task, xp
        self.threshold, self.rates = threshold, rates

    def scores(self):
        return self.out

    def true_labels(self):
        """Class indices (n,) for one class per sample; the 0/1 targets as given otherwise."""
        y, xp = self.y, self.xp
        if self.task == "multiclass" and y.ndim == 2:
            return xp.argmax(y, axis=1)
        return y

    def predictions(self):
        """What ``predict`` returns for the batch, shaped like :meth:`true_labels`
        (class indices, 0/1 values in the targets' dtype and shape, or the outputs in
        the targets' shape)."""
        xp, out, y = self.xp, self.out, self.y
        if self.task == "multiclass":
            return xp.argmax(out, axis=1)
        if self.task == "multilabel":
            pred = out > self.threshold
            if pred.shape != y.shape:
                pred = xp.reshape(pred, tuple(y.shape))
            return pred if y.dtype == xp.bool else xp.astype(pred, y.dtype)
        values = xp.exp(out) if self.rates else out
        return xp.reshape(values, _shape(y))


class _Accumulator:
    """The running sums of one metric: device arrays, plus counts known on the host."""

    def __init__(self, metric: "Metric", xp, dtype, device):
        self.metric, self.xp, self.dtype, self.device = metric, xp, dtype, device
        self.acc = _sum_dtype(xp, dtype, device)
        self.kernels = kernels_for(xp)  # looked up once per epoch, not per batch
        self.sums: list[Any] | None = None
        self.count = 0
        self.extra: Any = None

    def update(self, pair: _Pair) -> None:
        self.metric._update(self, pair)

    def arrays(self) -> list[Any]:
        return [] if self.sums is None else list(self.sums)

    def result(self, host: list[numpy.ndarray]) -> float:
        if self.count == 0:
            return math.nan
        return float(self.metric._finish(self, host))

    def add(self, values: list[Any]) -> None:
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values)]


class _MembersPair(_Pair):
    """A :class:`_Pair` of an ensemble's batch: ``out`` of shape (K, n, m), one output per
    member, against the members' shared targets ``y``; :meth:`predictions` has a leading
    member axis, (K,) + the shape of :meth:`true_labels`."""

    __slots__ = ()

    def predictions(self):
        xp, out, y = self.xp, self.out, self.y
        k = int(out.shape[0])
        if self.task == "multiclass":
            return xp.argmax(out, axis=-1)
        if self.task == "multilabel":
            pred = xp.reshape(out > self.threshold, (k, *_shape(y)))
            return pred if y.dtype == xp.bool else xp.astype(pred, y.dtype)
        values = xp.exp(out) if self.rates else out
        return xp.reshape(values, (k, *_shape(y)))

    def member(self, i: int) -> _Pair:
        """Member ``i``'s own pair (its outputs (n, m))."""
        return _Pair(self.y, self.out[i, ...], self.task, self.xp, threshold=self.threshold, rates=self.rates)


class _MembersAccumulator(_Accumulator):
    """The running sums of one metric for each of an ensemble's K members: arrays with a
    leading member axis, read once; the result is a NumPy array (K,)."""

    def __init__(self, metric: "Metric", xp, dtype, device, k: int):
        super().__init__(metric, xp, dtype, device)
        self.k = k
        self.members: list[_Accumulator] | None = None  # one plain accumulator per member, where used

    def update(self, pair: _MembersPair) -> None:
        self.metric._update_members(self, pair)

    def arrays(self) -> list[Any]:
        if self.members is None:
            return super().arrays()
        # the members' sums, stacked when read (a leading member axis)
        return [self.xp.stack(parts) for parts in zip(*(m.arrays() for m in self.members))]

    def result(self, host: list[numpy.ndarray]) -> numpy.ndarray:
        if self.count == 0:
            return numpy.full(self.k, math.nan)
        return numpy.asarray(self.metric._finish_members(self, host), dtype=numpy.float64).reshape(self.k)


def _other_axes(a) -> tuple[int, ...]:
    """Every axis of ``a`` but the first (the member axis)."""
    return tuple(range(1, a.ndim))


class Metric:
    """A named metric accumulated over batches (see the module notes).

    Parameters
    ----------
    name : str
        The key in :class:`arraymlp.History` (``"accuracy"``, ``"val_accuracy"``)
        and in the dict of :meth:`arraymlp.Sequential.evaluate`.

    Calling the metric, ``metric(y_true, y_pred, *, xp=None)``, gives its value over
    those arrays as a 0-d array of ``y_pred``'s namespace (float64 where available).
    Shapes must match exactly: a ``(n, 1)`` array is never broadcast against ``(n,)``.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> float(am.metrics.accuracy(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])))
    0.75
    >>> am.metrics.accuracy(np.array([0, 1]), np.array([[0], [1]]))
    Traceback (most recent call last):
    ...
    ValueError: accuracy: y_pred has shape (2, 1) but y_true has shape (2,); reshape one of them ...
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    reads: str = "predictions"  # or "scores"

    def check(self, task: str, n_outputs: int) -> None:
        """Raise unless the metric applies to a model of ``task`` with ``n_outputs`` outputs."""
        if self.tasks and task not in self.tasks:
            kind = "classification" if self.tasks == _CLASSIFICATION else "regression"
            msg = (f"metric {self.name!r} is for {kind} losses, but the loss is a {task} one; "
                   f"known metrics: {', '.join(METRICS)} or a callable (y_true, y_pred, *, xp)")
            raise ValueError(msg)

    def start(self, xp, dtype, device) -> _Accumulator:
        return _Accumulator(self, xp, dtype, device)

    def start_members(self, xp, dtype, device, k: int) -> _MembersAccumulator:
        """The accumulator of an ensemble's K members: each member's value, (K,)."""
        return _MembersAccumulator(self, xp, dtype, device, k)

    def __call__(self, y_true, y_pred, *, xp=None):
        """The metric over whole arrays, as a 0-d array.

        Parameters
        ----------
        y_true : array, shape (n,) or (n, n_outputs)
            Targets: class labels (n,) or 0/1 labels for the accuracies, values for
            ``mae`` and ``r2``.
        y_pred : array, shape of ``y_true``
            Predictions in the form of ``y_true``; for ``top_k_accuracy`` the scores
            (n, n_classes) (probabilities or logits).
        xp : namespace, optional
            Taken from ``y_pred`` when omitted.

        Returns
        -------
        array, shape ()
            Float64 where the namespace has it on ``y_pred``'s device.
        """
        xp = get_namespace(y_pred) if xp is None else xp
        y_true = xp.asarray(y_true)
        self._check_pair(y_true, y_pred)
        device = device_of(y_pred)
        acc = self.start(xp, y_pred.dtype if xp.isdtype(y_pred.dtype, "real floating") else xp.float32, device)
        acc.update(_Direct(y_true, y_pred, xp))
        values = read_results([acc], xp)
        return xp.asarray(values[0], dtype=acc.acc, device=device)

    def _check_pair(self, y_true, y_pred) -> None:
        if _shape(y_true) != _shape(y_pred):
            msg = (f"{self.name}: y_pred has shape {_shape(y_pred)} but y_true has shape {_shape(y_true)}; "
                   "reshape one of them (comparing them would broadcast to (n, n))")
            raise ValueError(msg)

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"

    # the subclasses': add to acc.sums and acc.count; the value from the host sums
    def _update(self, acc: _Accumulator, pair) -> None:
        raise NotImplementedError

    def _anchor(self, acc: _Accumulator, y) -> None:
        """Fix, before the first batch, any reference point the sums are taken about,
        from ``y`` (the targets' first row of the data the metric will see, shape (1,
        ...)): under data parallelism every rank then accumulates sums that add up over
        the ranks. A no-op for metrics whose sums need no reference point."""
        return None

    def _finish(self, acc: _Accumulator, host: list[numpy.ndarray]) -> float:
        raise NotImplementedError

    # an ensemble's: the same sums with a leading member axis (K, ...). The default runs
    # the metric once per member (a metric of one's own); the library's metrics do all
    # members in one pass.
    def _update_members(self, acc: _MembersAccumulator, pair: _MembersPair) -> None:
        if acc.members is None:
            acc.members = [_Accumulator(self, acc.xp, acc.dtype, acc.device) for _ in range(acc.k)]
        for i, member in enumerate(acc.members):
            member.update(pair.member(i))
        acc.count = acc.members[0].count

    def _finish_members(self, acc: _MembersAccumulator, host: list[numpy.ndarray]) -> numpy.ndarray:
        return numpy.array([member.result([h[i] for h in host]) for i, member in enumerate(acc.members)])


class _Direct:
    """A :class:`_Pair` for arrays given directly (``metric(y_true, y_pred)``)."""

    task = None  # the predictions are given: no arg-max to take

    def __init__(self, y_true, y_pred, xp):
        self.y, self.pred, self.xp = y_true, y_pred, xp

    def true_labels(self):
        return self.y

    def predictions(self):
        return self.pred

    def scores(self):
        return self.pred


class _AccuracyMetric(Metric):
    name = "accuracy"
    tasks = _CLASSIFICATION

    def _count(self, acc):
        # the count of right answers: one integer array of shape (1,), made at the first
        # batch and added to in place (a kernel), so that a step allocates nothing for it
        if acc.sums is None:
            acc.sums = [acc.xp.zeros((1,), dtype=index_dtype(acc.xp), device=acc.device)]
        return acc.sums

    def counted_by_loss(self, acc, n: int) -> list:
        """The count of ``acc`` (a list holding the (1,) integer array) for a batch of
        ``n`` labels whose right answers the loss adds itself (``cross_entropy``'s
        ``hits=``): the batch's labels are counted here, its hits there."""
        acc.count += n
        return self._count(acc)

    def _update(self, acc, pair):
        xp = acc.xp
        self._count(acc)
        y = pair.y
        if pair.task == "multiclass" and y.ndim == 1:  # labels (n,) against the outputs' arg-max
            out = pair.out
            if out.ndim != 2 or out.shape[0] != y.shape[0]:
                msg = f"accuracy: outputs of shape {_shape(out)} do not match labels of shape {_shape(y)}"
                raise ValueError(msg)
            acc.sums[0] = acc.kernels.add_argmax_hits(acc.sums[0], out, y, xp)
            acc.count += y.shape[0]
            return
        t, p = pair.true_labels(), pair.predictions()
        if t.shape != p.shape:  # never broadcast a (n, 1) against a (n,)
            msg = f"accuracy: predictions of shape {_shape(p)} do not match targets of shape {_shape(t)}"
            raise ValueError(msg)
        if t.dtype != p.dtype:
            p = xp.astype(p, t.dtype)
        right = xp.sum(xp.astype(t == p, index_dtype(xp)))
        acc.sums[0] = acc.sums[0] + right
        acc.count += math.prod(t.shape)

    def _finish(self, acc, host):
        return host[0][0] / acc.count

    def _update_members(self, acc, pair):
        xp = acc.xp
        t, p = pair.true_labels(), pair.predictions()  # (n, ...) and (K, n, ...)
        if _shape(p)[1:] != _shape(t):
            msg = f"accuracy: predictions of shape {_shape(p)[1:]} do not match targets of shape {_shape(t)}"
            raise ValueError(msg)
        if t.dtype != p.dtype:
            p = xp.astype(p, t.dtype)
        acc.add([xp.sum(xp.astype(p == t, index_dtype(xp)), axis=_other_axes(p))])
        acc.count += math.prod(_shape(t))

    def _finish_members(self, acc, host):
        return host[0] / acc.count


class _TopKAccuracy(Metric):
    tasks = ("multiclass",)
    reads = "scores"

    def __init__(self, k: int):
        self.k = k
        self.name = "top_k_accuracy" if k == 5 else f"top_{k}_accuracy"

    def check(self, task, n_outputs):
        super().check(task, n_outputs)
        if self.k >= n_outputs:
            msg = (f"{self.name}: k={self.k} is not below the {n_outputs} classes, so every prediction "
                   f"would count as right; use top_k_accuracy(k) with k < {n_outputs}")
            raise ValueError(msg)

    def _check_pair(self, y_true, y_pred):
        if y_pred.ndim != 2 or _shape(y_true) != (_shape(y_pred)[0],):
            msg = (f"{self.name}: needs labels y_true of shape (n,) and scores y_pred of shape (n, k), "
                   f"got {_shape(y_true)} and {_shape(y_pred)}")
            raise ValueError(msg)
        self.check("multiclass", _shape(y_pred)[1])

    def _update(self, acc, pair):
        xp = acc.xp
        scores, labels = pair.scores(), pair.true_labels()
        n, k = _shape(scores)
        classes = xp.arange(k, dtype=index_dtype(xp), device=acc.device)
        onehot = xp.reshape(xp.astype(labels, index_dtype(xp)), (n, 1)) == classes
        zero = xp.zeros((), dtype=scores.dtype, device=acc.device)
        true_score = xp.sum(xp.where(onehot, scores, zero), axis=1, keepdims=True)
        above = xp.sum(xp.astype(scores > true_score, index_dtype(xp)), axis=1)  # classes ranked above the true one
        acc.add([xp.sum(xp.astype(above < self.k, index_dtype(xp)))])
        acc.count += n

    def _finish(self, acc, host):
        return host[0] / acc.count

    def _update_members(self, acc, pair):
        xp = acc.xp
        scores, labels = pair.scores(), pair.true_labels()  # (K, n, c) and (n,)
        _, n, c = _shape(scores)
        classes = xp.arange(c, dtype=index_dtype(xp), device=acc.device)
        onehot = xp.reshape(xp.astype(labels, index_dtype(xp)), (n, 1)) == classes
        zero = xp.zeros((), dtype=scores.dtype, device=acc.device)
        true_score = xp.sum(xp.where(onehot, scores, zero), axis=-1, keepdims=True)
        above = xp.sum(xp.astype(scores > true_score, index_dtype(xp)), axis=-1)  # (K, n)
        acc.add([xp.sum(xp.astype(above < self.k, index_dtype(xp)), axis=-1)])
        acc.count += n

    def _finish_members(self, acc, host):
        return host[0] / acc.count

    def __repr__(self) -> str:
        return f"top_k_accuracy({self.k})"


def _as_2d(a, xp):
    return xp.reshape(a, (_shape(a)[0], -1)) if a.ndim != 2 else a


class _MAE(Metric):
    name = "mae"
    tasks = ("regression",)

    def _update(self, acc, pair):
        xp = acc.xp
        y, p = pair.true_labels(), pair.predictions()
        self._check_pair(y, p)
        d = xp.astype(y, acc.acc) - xp.astype(p, acc.acc)
        acc.add([xp.sum(xp.abs(d))])
        acc.count += math.prod(_shape(d))

    def _finish(self, acc, host):
        return host[0] / acc.count

    def _update_members(self, acc, pair):
        xp = acc.xp
        y, p = pair.true_labels(), pair.predictions()
        d = xp.astype(y, acc.acc) - xp.astype(p, acc.acc)  # (K, n, ...)
        acc.add([xp.sum(xp.abs(d), axis=_other_axes(d))])
        acc.count += math.prod(_shape(y))

    def _finish_members(self, acc, host):
        return host[0] / acc.count


class _R2(Metric):
    """R^2 from per-output sums: with ``c`` a shift (the first target row), ``S1 =
    sum(y - c)``, ``S2 = sum((y - c)^2)``, ``R = sum((y - p)^2)``; ``SS_tot = S2 -
    S1^2 / n`` and ``r2_j = 1 - R_j / SS_tot_j``, averaged over the outputs."""

    name = "r2"
    tasks = ("regression",)

    def _anchor(self, acc, y):
        acc.extra = _as_2d(acc.xp.astype(y, acc.acc), acc.xp)[0:1, ...]

    def _update(self, acc, pair):
        xp = acc.xp
        y, p = pair.true_labels(), pair.predictions()
        self._check_pair(y, p)
        y, p = _as_2d(xp.astype(y, acc.acc), xp), _as_2d(xp.astype(p, acc.acc), xp)
        if acc.extra is None:
            acc.extra = y[0:1, ...]
        c = y - acc.extra
        r = y - p
        acc.add([xp.sum(c, axis=0), xp.sum(c * c, axis=0), xp.sum(r * r, axis=0)])
        acc.count += _shape(y)[0]

    def _finish(self, acc, host):
        s1, s2, res = (numpy.asarray(h, dtype=numpy.float64) for h in host)
        tot = s2 - s1 * s1 / acc.count
        scores = numpy.where(tot > 0, 1.0 - res / numpy.where(tot > 0, tot, 1.0), numpy.where(res == 0, 1.0, 0.0))
        return float(numpy.mean(scores))

    def _update_members(self, acc, pair):
        xp = acc.xp
        y, p = pair.true_labels(), pair.predictions()
        k, n = _shape(p)[0], _shape(y)[0]
        y = _as_2d(xp.astype(y, acc.acc), xp)
        p = xp.reshape(xp.astype(p, acc.acc), (k, n, -1))
        if acc.extra is None:
            acc.extra = y[0:1, ...]
        c = y - acc.extra
        r = y - p
        acc.add([xp.sum(c, axis=0), xp.sum(c * c, axis=0), xp.sum(r * r, axis=1)])  # (m,), (m,), (K, m)
        acc.count += n

    def _finish_members(self, acc, host):
        s1, s2, res = (numpy.asarray(h, dtype=numpy.float64) for h in host)
        tot = s2 - s1 * s1 / acc.count  # (m,), against each member's residuals (K, m)
        scores = numpy.where(tot > 0, 1.0 - res / numpy.where(tot > 0, tot, 1.0), numpy.where(res == 0, 1.0, 0.0))
        return numpy.mean(scores, axis=1)


class _CallableMetric(Metric):
    """A user function ``fn(y_true, y_pred, *, xp) -> 0-d array``, averaged over the
    batches weighted by their sizes."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def _check_pair(self, y_true, y_pred):
        return None

    def _update(self, acc, pair):
        xp = acc.xp
        y = pair.y
        value = self.fn(y, pair.predictions(), xp=xp)
        n = _shape(y)[0]
        acc.add([xp.astype(xp.asarray(value, device=acc.device), acc.acc) * float(n)])
        acc.count += n

    def _finish(self, acc, host):
        return host[0] / acc.count

    def __repr__(self) -> str:
        return f"Metric({self.fn!r})"


#: Accuracy of predicted labels (classification losses).
accuracy: Metric = _AccuracyMetric()
#: Mean absolute error (regression losses).
mae: Metric = _MAE()
#: Coefficient of determination, uniformly averaged over the outputs (regression losses).
r2: Metric = _R2()


def top_k_accuracy(k: int = 5) -> Metric:
    """The fraction of samples whose true class is among the ``k`` highest scores.

    Parameters
    ----------
    k : int, default 5
        Must be below the number of classes of the model it measures.

    Returns
    -------
    Metric
        Named ``"top_k_accuracy"`` for ``k=5``, ``"top_{k}_accuracy"`` otherwise.
        Called directly it takes labels ``(n,)`` and scores ``(n, n_classes)``.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> scores = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    >>> float(am.metrics.top_k_accuracy(2)(np.array([1, 0, 1]), scores))
    0.6666666666666666
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        msg = f"top_k_accuracy: k must be a positive int, got {k!r}"
        raise ValueError(msg)
    return _TopKAccuracy(k)


#: The named metrics ``metrics=`` accepts.
#:
#: :meta hide-value:
METRICS: dict[str, Metric] = {"accuracy": accuracy, "top_k_accuracy": top_k_accuracy(5), "mae": mae, "r2": r2}


def get_metric(spec: str | Metric | Callable[..., Any]) -> Metric:
    """A :class:`Metric` from a name of :data:`METRICS`, a Metric, or a callable
    ``fn(y_true, y_pred, *, xp) -> 0-d array``.

    Examples
    --------
    >>> import arraymlp as am
    >>> am.metrics.get_metric("r2") is am.metrics.r2
    True
    >>> am.metrics.get_metric("f1")
    Traceback (most recent call last):
    ...
    ValueError: unknown metric 'f1'; known metrics: accuracy, top_k_accuracy, mae, r2, top_k_accuracy(k), ...
    """
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        try:
            return METRICS[spec]
        except KeyError:
            pass
    elif callable(spec):
        return _CallableMetric(spec)
    msg = (f"unknown metric {spec!r}; known metrics: {', '.join(METRICS)}, top_k_accuracy(k), "
           "or a callable (y_true, y_pred, *, xp) -> 0-d array")
    raise ValueError(msg)


def get_metrics(specs, task: str, n_outputs: int) -> list[Metric]:
    """The metrics of ``specs`` (None: none), each checked against the task; names unique."""
    if specs is None:
        return []
    if isinstance(specs, (str, Metric)) or callable(specs):
        specs = [specs]
    out: list[Metric] = []
    for spec in specs:
        m = get_metric(spec)
        m.check(task, n_outputs)
        if any(o.name == m.name for o in out) or m.name == "loss":
            msg = f"metrics: the name {m.name!r} appears twice (or is 'loss'); give each metric its own name"
            raise ValueError(msg)
        out.append(m)
    return out


def read_results(accs: list[_Accumulator], xp, gather: Callable[[Any], list] | None = None) -> list[float]:
    """Every accumulator's value, reading their sums to the host at once (one transfer
    for the integer counts, one for the floating sums).

    ``gather`` (data parallelism: an mpi4py communicator's ``allgather``) collects every
    rank's host sums and counts in one collective; each value is then that of the sums
    added over the ranks (in rank order, so every rank gets the same value), as if one
    process had seen every rank's rows."""
    ints, floats = [], []
    for acc in accs:
        for a in acc.arrays():
            (ints if xp.isdtype(a.dtype, "integral") else floats).append(a)
    host_ints = _read(ints, xp)
    host_floats = _read(floats, xp)
    hosts = []
    for acc in accs:
        host = []
        for a in acc.arrays():
            src = host_ints if xp.isdtype(a.dtype, "integral") else host_floats
            size = math.prod(_shape(a))
            host.append(src[:size].reshape(_shape(a)))
            del src[:size]
        hosts.append(host)
    if gather is not None:
        hosts = _add_ranks(accs, hosts, gather)
    return [acc.result(host) for acc, host in zip(accs, hosts)]


def _add_ranks(accs: list[_Accumulator], hosts: list[list], gather) -> list[list]:
    """Every rank's host sums of ``accs`` added up (a rank that saw no rows sent none),
    and the counts with them: one ``gather`` of this rank's ``(sums, count)`` per
    accumulator."""
    ranks = gather([(host, acc.count) for acc, host in zip(accs, hosts)])
    added = []
    for i, acc in enumerate(accs):
        parts = [rank[i][0] for rank in ranks if rank[i][0]]
        total = [numpy.sum(numpy.stack(arrays), axis=0) for arrays in zip(*parts)] if parts else []
        acc.count = sum(int(rank[i][1]) for rank in ranks)
        if isinstance(acc, _MembersAccumulator) and total and type(acc.metric)._update_members is \
                Metric._update_members:
            # a metric of one's own, run member by member: each member's count is the rows seen
            if acc.members is None:
                acc.members = [_Accumulator(acc.metric, acc.xp, acc.dtype, acc.device) for _ in range(acc.k)]
            for member in acc.members:
                member.count = acc.count
        added.append(total)
    return added


def _read(arrays: list[Any], xp) -> list:
    """The arrays' values on the host (float64 / int64), in one transfer."""
    if not arrays:
        return _HostList(numpy.empty(0))
    dtype = arrays[0].dtype
    flat = xp.concat([xp.reshape(xp.astype(a, dtype), (-1,)) for a in arrays])
    return _HostList(numpy.asarray(to_numpy(flat)))


class _HostList:
    """A host vector consumed from the front: ``[:size]`` and ``del [:size]``."""

    def __init__(self, values: numpy.ndarray):
        self.values, self.pos = values, 0

    def __getitem__(self, s: slice):
        return self.values[self.pos:self.pos + s.stop]

    def __delitem__(self, s: slice) -> None:
        self.pos += s.stop
