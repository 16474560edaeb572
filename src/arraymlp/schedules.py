"""Learning-rate schedules.

A schedule is an object called with a step (or epoch) count ``t >= 0`` that returns
the learning rate for that step; the training loop passes it on as
``opt.step(params, grads, lr=schedule(t))``. All schedules but
:class:`ReduceOnPlateau` are pure closed forms of ``t`` (no state, no order of
calls), so resuming from a checkpoint needs only the step count.
:class:`ReduceOnPlateau` is stateful: it reacts to a metric through
:meth:`ReduceOnPlateau.step` and keeps its counters in :meth:`~Schedule.state_dict`.

The formulas are those of :mod:`torch.optim.lr_scheduler` (closed forms), with the
differences noted on each class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from .optim import _number

__all__ = [
    "SCHEDULES",
    "Constant",
    "CosineAnnealing",
    "CosineWarmRestarts",
    "ExponentialDecay",
    "LinearWarmup",
    "ReduceOnPlateau",
    "Schedule",
    "StepDecay",
    "get_schedule",
]


# ----------------------------------------------------------------------------- checks
_real = _number  # one validator for every hyper-parameter, shared with the optimisers


def _int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)
    if value < low:
        msg = f"{name} must be an integer >= {low}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _step(t: Any) -> float:
    """Validate a step/epoch count (an integer, or a float for fractional epochs)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        msg = f"the step must be a non-negative number, got {t!r} ({type(t).__name__})"
        raise TypeError(msg)
    if math.isnan(t) or t < 0:
        msg = f"the step must be a non-negative number, got {t!r}"
        raise ValueError(msg)
    return t


# ----------------------------------------------------------------------------- base
class Schedule:
    """Base class: ``schedule(t) -> lr``, a ``repr`` of the arguments, empty state."""

    _args: tuple[str, ...] = ()

    def __call__(self, t: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint; empty for the pure closed forms."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (nothing to restore for the closed forms)."""
        if state:
            msg = f"{type(self).__name__} has no state to load, got keys {sorted(state)}"
            raise ValueError(msg)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._args)
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """Constant rate: ``lr(t) = lr``.

    Parameters
    ----------
    lr : float
        The learning rate, ``>= 0``.

    Examples
    --------
    >>> from arraymlp import Constant
    >>> s = Constant(0.1)
    >>> [s(t) for t in range(3)]
    [0.1, 0.1, 0.1]
    """

    _args = ("lr",)

    def __init__(self, lr: float) -> None:
        self.lr = _real("lr", lr, low=0.0)

    def __call__(self, t: float) -> float:
        _step(t)
        return self.lr


class StepDecay(Schedule):
    """Multiply by ``gamma`` every ``step_size`` steps: ``lr(t) = lr * gamma**floor(t / step_size)``.

    Same as ``torch.optim.lr_scheduler.StepLR``.

    Parameters
    ----------
    lr : float
        Initial learning rate, ``>= 0``.
    step_size : int
        Period of the decay, ``>= 1``.
    gamma : float, default 0.1
        Factor per period, ``> 0``.

    Examples
    --------
    >>> from arraymlp import StepDecay
    >>> s = StepDecay(0.1, step_size=2, gamma=0.5)
    >>> [round(s(t), 4) for t in range(6)]
    [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    """

    _args = ("lr", "step_size", "gamma")

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        self.lr = _real("lr", lr, low=0.0)
        self.step_size = _int("step_size", step_size, low=1)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def __call__(self, t: float) -> float:
        return self.lr * self.gamma ** (_step(t) // self.step_size)


class ExponentialDecay(Schedule):
    """Exponential decay: ``lr(t) = lr * gamma**t``.

    Same as ``torch.optim.lr_scheduler.ExponentialLR``.

    Parameters
    ----------
    lr : float
        Initial learning rate, ``>= 0``.
    gamma : float
        Factor per step, ``> 0``.

    Examples
    --------
    >>> from arraymlp import ExponentialDecay
    >>> s = ExponentialDecay(0.1, gamma=0.5)
    >>> [round(s(t), 4) for t in range(4)]
    [0.1, 0.05, 0.025, 0.0125]
    """

    _args = ("lr", "gamma")

    def __init__(self, lr: float, gamma: float) -> None:
        self.lr = _real("lr", lr, low=0.0)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def __call__(self, t: float) -> float:
        return self.lr * self.gamma ** _step(t)


def _cosine(lr: float, eta_min: float, t: float, T: float) -> float:
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * t / T)) / 2.0


class CosineAnnealing(Schedule):
    """Half a cosine from ``lr`` down to ``eta_min`` over ``T_max`` steps.

    ``lr(t) = eta_min + (lr - eta_min) * (1 + cos(pi * min(t, T_max) / T_max)) / 2``.

    Equal to ``torch.optim.lr_scheduler.CosineAnnealingLR`` for ``t <= T_max``.
    After ``T_max`` the rate stays at ``eta_min`` (as optax's cosine decay does),
    where torch's scheduler would climb back up along the cosine; use
    :class:`CosineWarmRestarts` for restarts.

    Parameters
    ----------
    lr : float
        Initial learning rate, ``>= 0``.
    T_max : int or float
        Length of the decay in steps, ``> 0``.
    eta_min : float, default 0.0
        Final learning rate, ``>= 0``.

    Examples
    --------
    >>> from arraymlp import CosineAnnealing
    >>> s = CosineAnnealing(0.1, T_max=4)
    >>> [round(s(t), 4) for t in range(6)]  # stays at eta_min after T_max
    [0.1, 0.0854, 0.05, 0.0146, 0.0, 0.0]
    """

    _args = ("lr", "T_max", "eta_min")

    def __init__(self, lr: float, T_max: float, eta_min: float = 0.0) -> None:
        self.lr = _real("lr", lr, low=0.0)
        self.T_max = _real("T_max", T_max, low=0.0, low_open=True)
        if isinstance(T_max, numbers.Integral):
            self.T_max = int(T_max)
        self.eta_min = _real("eta_min", eta_min, low=0.0)

    def __call__(self, t: float) -> float:
        t = min(_step(t), self.T_max)
        return _cosine(self.lr, self.eta_min, t, self.T_max)


class CosineWarmRestarts(Schedule):
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter).

    ``lr(t) = eta_min + (lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``, where the
    ``i``-th cycle lasts ``T_i = T_0 * T_mult**i`` steps and ``T_cur`` is the number
    of steps since the current cycle began; the rate jumps back to ``lr`` at each
    restart. Same as ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``; the
    cycle is located by exact summation rather than a floating-point logarithm, so
    the restarts land exactly on ``T_0, T_0 + T_0*T_mult, ...``.

    Parameters
    ----------
    lr : float
        Learning rate at the start of every cycle, ``>= 0``.
    T_0 : int
        Length of the first cycle, ``>= 1``.
    T_mult : int, default 1
        Growth factor of the cycle length, ``>= 1``.
    eta_min : float, default 0.0
        Learning rate at the end of every cycle, ``>= 0``.

    Examples
    --------
    >>> from arraymlp import CosineWarmRestarts
    >>> s = CosineWarmRestarts(0.1, T_0=2, T_mult=2)  # cycles of 2, 4, 8, ... steps
    >>> [round(s(t), 4) for t in range(7)]
    [0.1, 0.05, 0.1, 0.0854, 0.05, 0.0146, 0.1]
    >>> s.cycle(5)  # (steps into the cycle, cycle length)
    (3, 4)
    """

    _args = ("lr", "T_0", "T_mult", "eta_min")

    def __init__(self, lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0) -> None:
        self.lr = _real("lr", lr, low=0.0)
        self.T_0 = _int("T_0", T_0, low=1)
        self.T_mult = _int("T_mult", T_mult, low=1)
        self.eta_min = _real("eta_min", eta_min, low=0.0)

    def cycle(self, t: float) -> tuple[float, int]:
        """``(T_cur, T_i)``: steps into the current cycle and that cycle's length."""
        t = _step(t)
        if self.T_mult == 1:
            n = t // self.T_0
            return t - n * self.T_0, self.T_0
        start, T_i = 0, self.T_0
        while t >= start + T_i:
            start += T_i
            T_i *= self.T_mult
        return t - start, T_i

    def __call__(self, t: float) -> float:
        T_cur, T_i = self.cycle(t)
        return _cosine(self.lr, self.eta_min, T_cur, T_i)


class LinearWarmup(Schedule):
    """Linear warm-up in front of any schedule.

    With ``W = warmup_steps``, ``s`` the wrapped schedule and ``f = start_factor``::

        lr(t) = s(0) * (f + (1 - f) * t / W)   for t < W
        lr(t) = s(t - W)                       for t >= W

    The ramp goes from ``f * s(0)`` at ``t = 0`` to the wrapped schedule's value at
    the end of warm-up, ``s(0)``, which it reaches at ``t = W``; the wrapped schedule
    then runs shifted by ``W`` steps, so it starts from its own beginning (a cosine
    decay over ``T_max`` steps ends at ``t = W + T_max``). With the default
    ``start_factor=0`` the very first step has rate 0, as in the usual
    ``t / W`` warm-up. The ramp equals ``torch.optim.lr_scheduler.LinearLR`` with
    ``end_factor=1, total_iters=W``.

    A wrapped schedule that learns from a metric (:class:`ReduceOnPlateau`) gets the
    metrics of :meth:`step` once warm-up is over: the metric of the last warm-up epoch
    is its first, so a loss that rises while the rate ramps up cannot count as a
    plateau.

    Parameters
    ----------
    schedule : Schedule, callable or float
        The schedule after warm-up; a number means :class:`Constant`.
    warmup_steps : int
        ``W >= 0``; 0 means no warm-up.
    start_factor : float, default 0.0
        Fraction of ``s(0)`` at ``t = 0``, in ``[0, 1]``.

    Examples
    --------
    >>> from arraymlp import LinearWarmup, ReduceOnPlateau
    >>> s = LinearWarmup(ReduceOnPlateau(0.1, patience=0), warmup_steps=2)
    >>> [round(s(t), 3) for t in range(3)]
    [0.0, 0.05, 0.1]
    >>> for loss in (5.0, 1.0, 2.0):  # epochs 0 and 1 warm up; epoch 2 does not improve
    ...     _ = s.step(loss)
    >>> round(s(3), 3)
    0.01
    """

    _args = ("schedule", "warmup_steps", "start_factor")

    def __init__(
        self,
        schedule: Schedule | Callable[[float], float] | float,
        warmup_steps: int,
        start_factor: float = 0.0,
    ) -> None:
        if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
            schedule = Constant(schedule)
        if not callable(schedule):
            msg = (
                "schedule must be a Schedule, a callable of the step, or a number, "
                f"got {type(schedule).__name__}"
            )
            raise TypeError(msg)
        self.schedule = schedule
        self.warmup_steps = _int("warmup_steps", warmup_steps, low=0)
        self.start_factor = _real("start_factor", start_factor, low=0.0, high=1.0)
        self.metrics_seen = 0

    def __call__(self, t: float) -> float:
        t = _step(t)
        W = self.warmup_steps
        if t >= W:
            return self.schedule(t - W)
        f = self.start_factor
        return self.schedule(0) * (f + (1.0 - f) * t / W)

    def _inner_step(self):
        step = getattr(self.schedule, "step", None)
        return step if callable(step) else None

    def step(self, metric: Any) -> float | None:
        """Record one epoch's ``metric``; passed on to the wrapped schedule's own
        ``step`` from the last warm-up epoch on, and ignored when it has none.

        Returns
        -------
        float or None
            What the wrapped ``step`` returned (a :class:`ReduceOnPlateau`'s rate),
            or None while warming up or when there is nothing to step.
        """
        inner = self._inner_step()
        self.metrics_seen += 1
        if inner is None or self.metrics_seen < self.warmup_steps:
            return None
        return inner(metric)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped schedule's state (for a wrapped :class:`ReduceOnPlateau`) and
        the count of metrics :meth:`step` has seen."""
        state: dict[str, Any] = {}
        inner = getattr(self.schedule, "state_dict", None)
        if inner is not None:
            state["schedule"] = inner()
        if self._inner_step() is not None:
            state["metrics_seen"] = self.metrics_seen
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        self.metrics_seen = int(state.get("metrics_seen", 0))


class ReduceOnPlateau(Schedule):
    """Divide the rate by ``1/factor`` when a metric stops improving.

    Call :meth:`step` with the monitored metric once per epoch (or evaluation);
    ``schedule(t)`` returns the current rate whatever ``t``. A metric counts as an
    improvement over the best so far, ``best``, when (``threshold_mode="rel"``)
    ``metric < best * (1 - threshold)`` in ``"min"`` mode or
    ``metric > best * (1 + threshold)`` in ``"max"`` mode (``"abs"``: ``best -
    threshold`` / ``best + threshold``). After more than ``patience`` epochs
    without improvement the rate becomes ``max(lr * factor, min_lr)`` (ignored if
    the change is below ``eps``), the bad-epoch count restarts, and the next
    ``cooldown`` epochs do not count as bad. NaN metrics count as no improvement.
    Same as ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Parameters
    ----------
    lr : float
        Initial learning rate, ``>= 0``.
    factor : float, default 0.1
        Multiplier of a reduction, in ``[0, 1)``.
    patience : int, default 10
        Bad epochs tolerated before reducing, ``>= 0``.
    threshold : float, default 1e-4
        Minimal improvement, ``>= 0``.
    mode : {"min", "max"}, default "min"
        Whether the metric should decrease (a loss) or increase (an accuracy).
    min_lr : float, default 0.0
        Lower bound of the rate, ``>= 0``.
    cooldown : int, default 0
        Epochs after a reduction during which bad epochs are not counted, ``>= 0``.
    threshold_mode : {"rel", "abs"}, default "rel"
        Relative or absolute ``threshold``.
    eps : float, default 1e-8
        Smallest change of the rate that is applied.

    Attributes
    ----------
    lr : float
        The current learning rate.
    best : float
        Best metric so far (``inf`` / ``-inf`` before the first step).
    num_bad_epochs, cooldown_counter, last_epoch : int
        Counters, as in torch.

    Examples
    --------
    >>> from arraymlp import ReduceOnPlateau
    >>> s = ReduceOnPlateau(0.1, factor=0.5, patience=1)
    >>> [round(s.step(loss), 4) for loss in (1.0, 0.8, 0.9, 0.85, 0.9)]
    [0.1, 0.1, 0.1, 0.05, 0.05]
    >>> s.best, round(s(100), 4)  # the rate does not depend on the step
    (0.8, 0.05)
    """

    _args = (
        "initial_lr",
        "factor",
        "patience",
        "threshold",
        "mode",
        "min_lr",
        "cooldown",
        "threshold_mode",
        "eps",
    )
    _counters = ("lr", "best", "num_bad_epochs", "cooldown_counter", "last_epoch")

    def __init__(
        self,
        lr: float,
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        mode: str = "min",
        min_lr: float = 0.0,
        cooldown: int = 0,
        threshold_mode: str = "rel",
        eps: float = 1e-8,
    ) -> None:
        self.initial_lr = _real("lr", lr, low=0.0)
        self.factor = _real("factor", factor, low=0.0, high=1.0, high_open=True)
        self.patience = _int("patience", patience, low=0)
        self.threshold = _real("threshold", threshold, low=0.0)
        if mode not in ("min", "max"):
            msg = f"mode must be 'min' or 'max', got {mode!r}"
            raise ValueError(msg)
        self.mode = mode
        if threshold_mode not in ("rel", "abs"):
            msg = f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}"
            raise ValueError(msg)
        self.threshold_mode = threshold_mode
        self.min_lr = _real("min_lr", min_lr, low=0.0)
        self.cooldown = _int("cooldown", cooldown, low=0)
        self.eps = _real("eps", eps, low=0.0)
        self.reset()

    def reset(self) -> None:
        """Back to the initial rate with fresh counters."""
        self.lr = self.initial_lr
        self.best = math.inf if self.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min":
            bound = (
                best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold
            )
            return a < bound
        bound = best * (1.0 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold
        return a > bound

    def step(self, metric: Any) -> float:
        """Record one epoch's ``metric`` (a number or a 0-d array) and return the rate."""
        try:
            current = float(metric)
        except (TypeError, ValueError):
            msg = f"metric must be a number or a 0-d array, got {type(metric).__name__}"
            raise TypeError(msg) from None
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > self.eps:
                self.lr = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return self.lr

    def __call__(self, t: float | None = None) -> float:
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        """Counters and current rate, as plain numbers."""
        return {k: getattr(self, k) for k in self._counters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        missing = [k for k in self._counters if k not in state]
        if missing:
            msg = f"ReduceOnPlateau state is missing {missing}"
            raise ValueError(msg)
        self.lr = float(state["lr"])
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.last_epoch = int(state["last_epoch"])

    def __repr__(self) -> str:
        args = [f"lr={self.initial_lr!r}"] + [f"{k}={getattr(self, k)!r}" for k in self._args[1:]]
        return f"ReduceOnPlateau({', '.join(args)})"


# ----------------------------------------------------------------------------- registry
#: Schedule names accepted by :func:`get_schedule`.
SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "step": StepDecay,
    "exponential": ExponentialDecay,
    "cosine": CosineAnnealing,
    "cosine_warm_restarts": CosineWarmRestarts,
    "linear_warmup": LinearWarmup,
    "reduce_on_plateau": ReduceOnPlateau,
}


def get_schedule(name: str | Schedule | Callable[[float], float] | float, **kwargs: Any):
    """A schedule from its name and arguments; instances, callables and numbers pass through.

    Parameters
    ----------
    name : str, Schedule, callable or float
        One of ``"constant"``, ``"step"``, ``"exponential"``, ``"cosine"``,
        ``"cosine_warm_restarts"``, ``"linear_warmup"``, ``"reduce_on_plateau"``;
        a :class:`Schedule` or any callable of the step is returned as is; a number
        becomes :class:`Constant`.
    **kwargs
        Arguments of the named schedule's constructor.

    Returns
    -------
    Schedule or callable

    Examples
    --------
    >>> from arraymlp import get_schedule
    >>> get_schedule("cosine", lr=0.1, T_max=10)
    CosineAnnealing(lr=0.1, T_max=10, eta_min=0.0)
    >>> get_schedule(0.01)
    Constant(lr=0.01)
    """
    if not isinstance(name, str):
        if kwargs:
            msg = (
                f"arguments {sorted(kwargs)} cannot be combined with a schedule instance; "
                "pass a name instead"
            )
            raise TypeError(msg)
        if isinstance(name, numbers.Real) and not isinstance(name, bool):
            return Constant(name)
        if callable(name):
            return name
        msg = (
            f"schedule must be a name ({', '.join(SCHEDULES)}), a Schedule or a number, "
            f"got {type(name).__name__}"
        )
        raise TypeError(msg)
    try:
        cls = SCHEDULES[name.lower()]
    except KeyError:
        msg = f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}"
        raise ValueError(msg) from None
    return cls(**kwargs)
