"""Training callbacks and the records they see: :class:`Callback`, :class:`History`,
:class:`EarlyStopping`, and :class:`DivergenceError`, raised when the loss stops being finite.

A callback is any object with the hooks of :class:`Callback`; :func:`arraymlp.training.fit`
calls them at the start and end of training, of each epoch and after each batch. A
callback with a state (``state_dict()`` not None) is saved in checkpoints and restored
when training resumes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["Callback", "DivergenceError", "EarlyStopping", "History", "monitor_mode"]


class DivergenceError(FloatingPointError, ValueError):
    """The training loss became NaN or infinite; ``epoch`` and ``step`` say where.

    It is both a :class:`FloatingPointError` and a :class:`ValueError`: code written for
    scikit-learn, which reports a diverged fit as a ``ValueError`` (``GridSearchCV``'s
    ``error_score``, ``except ValueError``), catches it too.

    The step whose loss is not finite makes no update, so the model keeps the
    parameters it had: those left by the last step with a finite loss. They are
    finite unless that step's own update overflowed (a finite loss whose gradient
    was not); ``params_finite`` says which, and the message tells the two apart.

    Attributes
    ----------
    epoch, step : int
        0-based epoch and count of the updates made before the failing step.
    params_finite : bool
        Whether every parameter of the model is finite.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> try:  # a learning rate far too large: the second step's loss overflows
    ...     model.fit(np.ones((4, 2)), np.ones((4, 1)), optimizer="sgd", lr=1e20, epochs=5, progress=False)
    ... except am.DivergenceError as err:
    ...     print(err.epoch, err.step, err.params_finite)
    1 1 True
    """

    def __init__(self, msg: str, *, epoch: int, step: int, params_finite: bool = True):
        super().__init__(msg)
        self.epoch, self.step, self.params_finite = epoch, step, params_finite


@dataclasses.dataclass
class History:
    """Per-epoch record of a :func:`fit` run (lists indexed by epoch).

    Attributes
    ----------
    loss : list of float
        Mean training loss over the epoch's batches (weighted by batch size).
    val_loss, val_metric : list of float
        Loss and metric on the validation data (empty without validation data).
    metric_name : str
        ``"accuracy"`` for classification losses, ``"r2"`` otherwise: the metric of
        ``val_metric``.
    metrics : dict of str to list of float
        The ``metrics=`` of ``fit`` per epoch: ``"accuracy"`` on the training batches
        (before each step's update), ``"val_accuracy"`` on the validation data, and so
        on for each metric (by default accuracy for classification losses; the
        validation entries also hold ``metric_name``'s).
    lr : list of float
        Learning rate used in the epoch.
    time : list of float
        Wall-clock seconds of the epoch.
    stopped_early : bool
    best_epoch : int or None
        Epoch whose weights were restored by early stopping.

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> history = model.fit(np.zeros((8, 2)), np.ones((8, 1)), epochs=3, lr=0.25,
    ...                     validation_split=0.25, progress=False)
    >>> history.epochs, len(history.val_loss), history.metric_name, history.lr
    (3, 3, 'r2', [0.25, 0.25, 0.25])
    >>> history.stopped_early, history.best_epoch
    (False, None)
    >>> sorted(history.as_dict())
    ['best_epoch', 'loss', 'lr', 'metric_name', 'metrics', 'stopped_early', 'time', 'val_loss', 'val_metric']
    >>> sorted(history.metrics), history["val_r2"] == history.val_metric
    (['val_r2'], True)
    """

    loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_metric: list[float] = dataclasses.field(default_factory=list)
    metric_name: str = ""
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    lr: list[float] = dataclasses.field(default_factory=list)
    time: list[float] = dataclasses.field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, name: str) -> list[float]:
        """A series by name: ``"loss"``, ``"val_loss"``, ``"lr"``, ``"time"``, or a
        metric's (``"accuracy"``, ``"val_accuracy"``, ...)."""
        if name in ("loss", "val_loss", "val_metric", "lr", "time"):
            return getattr(self, name)
        try:
            return self.metrics[name]
        except KeyError:
            known = ["loss", "val_loss", "lr", "time", *self.metrics]
            msg = f"History has no series {name!r}; it has {', '.join(known)}"
            raise KeyError(msg) from None


class Callback:
    """Base class for training callbacks; override the hooks you need.

    A hook that returns ``True`` stops training after the current batch or epoch.
    ``logs`` carries ``epoch``, ``step``, ``loss`` and, at epoch end, ``val_loss``,
    ``val_metric``, ``lr`` and the value of each metric of the epoch (``"accuracy"``,
    ``"val_accuracy"``, ...: see :attr:`History.metrics`).

    Examples
    --------
    >>> import numpy as np, arraymlp as am
    >>> class EpochRecorder(am.Callback):
    ...     def __init__(self):
    ...         self.epochs = []
    ...     def on_epoch_end(self, model, logs):
    ...         self.epochs.append(logs["epoch"])
    >>> recorder = EpochRecorder()
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> _ = model.fit(np.zeros((4, 2)), np.ones((4, 1)), epochs=3, callbacks=[recorder], progress=False)
    >>> recorder.epochs
    [0, 1, 2]
    """

    def on_train_begin(self, model, history: History) -> Any:
        return None

    def on_epoch_begin(self, model, epoch: int) -> Any:
        return None

    def on_batch_end(self, model, logs: dict[str, Any]) -> Any:
        return None

    def on_epoch_end(self, model, logs: dict[str, Any]) -> Any:
        return None

    def on_train_end(self, model, history: History) -> Any:
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """State for checkpoints, or None (the default) for a callback without any.

        A callback that returns a dict here is saved by :class:`arraymlp.Checkpoint`
        and restored by ``fit(..., resume_from=...)`` through :meth:`load_state_dict`.
        Values are JSON numbers, strings, booleans or None, except that a value may
        be a list with one dict of arrays per layer, shaped like ``model.params``.
        """
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (arrays already on the model's
        backend and device)."""
        msg = f"{type(self).__name__} has no state to load"
        raise TypeError(msg)


def monitor_mode(monitor: str, mode: str = "auto", *, who: str = "monitor") -> str:
    """Whether a logged value is better lower (``"min"``) or higher (``"max"``).

    ``mode="min"`` or ``"max"`` is returned as given. ``"auto"`` reads the name, with
    or without its ``val_`` prefix: losses and errors (``"loss"``, ``"val_loss"``, names
    ending in ``loss`` or ``error``, ``"mae"``, ``"mse"``) are ``"min"``; accuracies
    (any name containing ``accuracy``), ``"r2"`` and ``"val_metric"`` are ``"max"``.
    Any other name raises a ``ValueError`` asking for ``mode=``: guessing the direction
    of a custom metric would silently keep its worst epoch.

    Parameters
    ----------
    monitor : str
        A key of the epoch's logs (``"val_loss"``, ``"val_accuracy"``, ...).
    mode : {"auto", "min", "max"}
    who : str
        The caller's name, for the messages.

    Returns
    -------
    str
        ``"min"`` or ``"max"``.

    Examples
    --------
    >>> import arraymlp as am
    >>> [am.callbacks.monitor_mode(name) for name in ("val_loss", "val_accuracy", "val_top_3_accuracy", "mae")]
    ['min', 'max', 'max', 'min']
    >>> am.callbacks.monitor_mode("val_f1", "max")
    'max'
    """
    if not isinstance(monitor, str):
        msg = f"{who} must be the name of a logged value (such as 'val_loss' or 'val_accuracy'), got {monitor!r}"
        raise TypeError(msg)
    if mode not in ("auto", "min", "max"):
        msg = f"mode must be 'auto', 'min' or 'max', got {mode!r}"
        raise ValueError(msg)
    if mode != "auto":
        return mode
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if base.endswith(("loss", "error")) or base in ("mae", "mse"):
        return "min"
    if "accuracy" in base or base == "r2" or monitor == "val_metric":
        return "max"
    msg = (f"{who}={monitor!r}: cannot tell whether higher or lower values are better; pass mode='max' "
           "(a score, such as an accuracy) or mode='min' (a loss or an error)")
    raise ValueError(msg)


class EarlyStopping(Callback):
    """Stop when the monitored value has not improved for ``patience`` epochs.

    Parameters
    ----------
    monitor : str
        A value ``fit`` logs at the end of each epoch: ``"val_loss"`` (default),
        ``"loss"``, ``"val_metric"``, or a metric's name with or without ``val_``
        (``"val_accuracy"``, ``"accuracy"``, ``"val_r2"``, ``"val_top_3_accuracy"``,
        a custom metric's name): those of ``fit``'s ``metrics=``, the ``val_`` ones
        with validation data.
    patience : int
        Epochs without an improvement of more than ``min_delta`` before stopping.
    min_delta : float
        How much better than the best so far a value must be to count as an improvement.
    restore_best_weights : bool
        Put back the parameters of the best epoch when training ends (not when it ends
        with a :class:`DivergenceError`, which leaves those of the last finite step).
    mode : {"auto", "min", "max"}
        Whether lower or higher values are better; ``"auto"`` infers it from the name
        (:func:`monitor_mode`: min for losses and errors, max for accuracies, R^2 and
        ``"val_metric"``, an error for other names).

    Attributes
    ----------
    best : float
        The best value so far, negated when ``mode`` is ``"max"`` (lower is always
        better inside); ``math.inf`` before the first epoch.
    best_epoch : int or None
    wait : int
        Epochs since the best one.

    Notes
    -----
    Its state (best value and epoch, epochs waited and the best parameters) is part
    of a :class:`arraymlp.Checkpoint`, so a resumed run stops where the uninterrupted
    one would have and restores the same parameters. A value that is never logged (for
    example ``"val_accuracy"`` without validation data) is a ``ValueError`` at the end
    of the first epoch that names the values that were logged.

    Examples
    --------
    The loss of this model starts at 1 and never falls by more than ``min_delta``, so
    the first epoch stays the best, and training stops once more than ``patience``
    epochs have passed without an improvement:

    >>> import numpy as np, arraymlp as am
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> stop = am.EarlyStopping("loss", patience=2, min_delta=1.0)
    >>> history = model.fit(np.zeros((4, 2)), np.ones((4, 1)), epochs=50, early_stopping=stop, progress=False)
    >>> history.epochs, history.stopped_early, history.best_epoch
    (4, True, 0)
    >>> am.EarlyStopping("val_accuracy").mode, am.EarlyStopping("val_loss").mode
    ('max', 'min')
    >>> am.EarlyStopping("val_f1")
    Traceback (most recent call last):
    ...
    ValueError: monitor='val_f1': cannot tell whether higher or lower values are better; pass mode='max' ...
    """

    def __init__(self, monitor: str = "val_loss", *, patience: int = 10, min_delta: float = 0.0,
                 restore_best_weights: bool = True, mode: str = "auto"):
        self.mode = monitor_mode(monitor, mode)
        if patience < 0:
            msg = f"patience must be >= 0, got {patience!r}"
            raise ValueError(msg)
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.restore_best_weights = restore_best_weights

    @property
    def sign(self) -> float:
        """1.0 for ``mode="min"``, -1.0 for ``"max"``: ``sign * value`` is lower when better."""
        return -1.0 if self.mode == "max" else 1.0

    def on_train_begin(self, model, history):
        if not getattr(self, "_resumed", False):
            self.best, self.best_epoch, self.wait, self.best_params = math.inf, None, 0, None
        self._resumed = False
        self.history = history

    def state_dict(self) -> dict[str, Any]:
        """Best value so far (None before the first epoch; negated for ``mode="max"``),
        its epoch, epochs waited since, and the best parameters when
        ``restore_best_weights``."""
        best = getattr(self, "best", math.inf)
        return {"best": None if math.isinf(best) else float(best), "best_epoch": getattr(self, "best_epoch", None),
                "wait": int(getattr(self, "wait", 0)), "best_params": getattr(self, "best_params", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``fit`` continues from it instead of
        starting afresh."""
        best, epoch, wait = state["best"], state["best_epoch"], state["wait"]
        if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool)):
            msg = f"best must be a number or None, got {best!r}"
            raise ValueError(msg)
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
            msg = f"best_epoch must be a non-negative int or None, got {epoch!r}"
            raise ValueError(msg)
        if not isinstance(wait, int) or isinstance(wait, bool) or wait < 0:
            msg = f"wait must be a non-negative int, got {wait!r}"
            raise ValueError(msg)
        self.best = math.inf if best is None else float(best)
        self.best_epoch, self.wait = epoch, wait
        self.best_params = state.get("best_params")
        self._resumed = True

    def on_epoch_end(self, model, logs):
        value = logs.get(self.monitor)
        if value is None:
            raise missing_value("EarlyStopping", self.monitor, logs)
        score = self.sign * float(value)
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = score, logs["epoch"], 0
            if self.restore_best_weights:
                xp = model.xp
                self.best_params = [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in model.params]
            return False
        self.wait += 1
        return self.wait > self.patience

    def on_train_end(self, model, history):
        if getattr(history, "_diverged", False):  # fit's DivergenceError keeps the last finite step's
            return
        if self.restore_best_weights and self.best_params is not None:
            model.params = self.best_params
            history.best_epoch = self.best_epoch


def missing_value(who: str, monitor: str, logs: dict[str, Any]) -> ValueError:
    """The error for a monitored value the epoch's logs do not hold, naming those they do."""
    logged = sorted(k for k, v in logs.items() if v is not None and k not in ("epoch", "step", "time"))
    hint = ("pass validation data (validation_data= or validation_split=) for val_* values"
            if monitor.startswith("val_") and not any(k.startswith("val_") for k in logged) else
            "name a metric of fit's metrics= (each is also logged as val_<name> with validation data)")
    msg = f"{who} monitors {monitor!r}, which training does not log; logged: {', '.join(logged)}. {hint}"
    return ValueError(msg)
