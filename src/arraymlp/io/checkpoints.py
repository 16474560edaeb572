"""Checkpoints of training runs: :func:`save_checkpoint`, :func:`restore_checkpoint`
and the :class:`Checkpoint` callback.

A checkpoint is a model file whose metadata also holds the training state (epoch, step
counter, the optimiser's name, hyper-parameters and step count, the schedule's and the
random generator's state, the history, the callbacks' states) and whose tensors also
hold the optimiser's moments and the callbacks' arrays. ``fit(..., resume_from=...)``
restores one into the model being trained; :func:`arraymlp.io.load_checkpoint` builds a
new model from one. This module works on models it is given and never builds one, so
it does not import the model classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy

from .._backend import backend_name, generator_from_state
from ..callbacks import Callback, History, missing_value, monitor_mode
from ..optim import Optimizer
from .container import ModelFileError, _is_int, _write_file
from .layout import (
    _File,
    _host,
    _layer_config,
    _model_payload,
    _param_shapes,
    _read,
    _seed_for_json,
    _to_xp,
)

__all__ = ["Checkpoint", "restore_checkpoint", "save_checkpoint"]

_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)\.safetensors$")


def _rng_state(model: Any) -> dict[str, Any] | None:
    rng = model.rng
    if rng is None:
        return None
    return {
        "entropy": _seed_for_json(rng.seed_sequence.entropy),
        "backend": backend_name(rng.xp),
        "state": rng.get_state(),
    }


def _schedule_state(schedule: Any) -> dict[str, Any] | None:
    get = getattr(schedule, "state_dict", None)
    if schedule is None or not callable(get):
        return None
    state = get()
    return state if state else None


def _optimizer_entry(optimizer: Optimizer, tensors: dict, dtype) -> dict[str, Any]:
    """The optimiser's checkpoint entry; its state arrays go into ``tensors``."""
    sd = optimizer.state_dict()
    skeleton = None
    if sd["state"] is not None:
        skeleton = []
        for i, layer_state in enumerate(sd["state"]):
            entry = {}
            for key, slots in layer_state.items():
                entry[key] = sorted(slots)
                for slot, a in slots.items():
                    tensors[f"optimizer.{i}.{key}.{slot}"] = _host(a, dtype)
            skeleton.append(entry)
    return {"optimizer": sd["optimizer"], "hyperparameters": sd["hyperparameters"],
            "step": [int(v) for v in sd["step"]] if isinstance(sd["step"], list) else int(sd["step"]),
            "state": skeleton}


def _state_name(cb) -> str:
    """The name a callback's state is saved and found under: its class's, or that of the
    callback it wraps (``state_name``, as :class:`arraymlp.distributed.RootOnly` gives it),
    so that a state saved by a wrapped callback restores into the bare one and back."""
    return getattr(cb, "state_name", None) or type(cb).__name__


def _callback_entries(callbacks: Sequence[Any], n_layers: int, tensors: dict, dtype) -> list[dict[str, Any]]:
    """The entries of the callbacks with a state; per-layer arrays go into ``tensors``."""
    cb_entries = []
    for cb in callbacks:
        state = cb.state_dict()
        if state is None:
            continue
        j = len(cb_entries)
        plain, arrays = {}, {}
        for name, value in state.items():
            if isinstance(value, list) and len(value) == n_layers and all(isinstance(d, dict) for d in value):
                arrays[name] = [sorted(d) for d in value]
                for i, d in enumerate(value):
                    for key, a in d.items():
                        tensors[f"callbacks.{j}.{name}.{i}.{key}"] = _host(a, dtype)
            else:
                plain[name] = value
        cb_entries.append({"class": _state_name(cb), "state": plain, "arrays": arrays})
    return cb_entries


def _history_value(v: Any) -> Any:
    """A history entry for JSON: a float, or a list of floats (an ensemble's one value per
    member, or its per-member rates)."""
    return float(v) if numpy.ndim(v) == 0 else numpy.asarray(v, dtype=float).tolist()


def save_checkpoint(path: str | os.PathLike, model: Any, *, optimizer: Optimizer | None = None,
                    schedule: Any = None, epoch: int = 0, steps: int | None = None,
                    history: History | None = None, callbacks: Sequence[Any] = (),
                    precision: Any = None) -> None:
    """Save everything needed to continue training ``model`` bit-identically.

    The file is a model file (it loads with :func:`load`) whose metadata also holds a
    ``"checkpoint"`` JSON entry: the number of completed epochs, the step counter, the
    optimiser's name, hyper-parameters and step count, the schedule's state (for a
    :class:`~arraymlp.schedules.ReduceOnPlateau`), the model's random-generator state
    and the history so far, and the state of every callback with one (an
    :class:`~arraymlp.EarlyStopping`'s counters and best parameters). The optimiser's
    moment arrays are tensors named ``optimizer.{i}.{key}.{slot}``
    (``optimizer.0.W.exp_avg``), a callback's arrays ``callbacks.{j}.{name}.{i}.{key}``.

    Parameters
    ----------
    path : str or path-like
    model : Sequential
    optimizer : Optimizer, optional
        Default: the one of the model's last ``fit`` (``model.optimizer_``), if any.
    schedule : Schedule, optional
        Default: the one of the model's last ``fit`` (``model.schedule_``), if any.
    epoch : int
        Number of completed epochs; training resumes with this epoch index.
    steps : int, optional
        Optimisation steps so far; default ``model.steps_`` (0 if unset).
    history : History, optional
        Per-epoch record so far, restored into the resumed run's history.
    callbacks : sequence of Callback
        The run's callbacks; those whose ``state_dict()`` is not None are saved.
    precision : MixedPrecision, optional
        Default: the one of the model's last ``fit`` (``model.precision_``), if any; its
        configuration and loss-scale state (scale, good steps, skips) are saved.
    """
    if precision is None:
        precision = getattr(model, "precision_", None)
    if optimizer is None:
        optimizer = getattr(model, "optimizer_", None)
        if getattr(model, "ensemble", None) is not None:  # the members' update rule, per-member settings
            optimizer = getattr(model, "ensemble_optimizer_", None)
    if schedule is None:
        schedule = getattr(model, "schedule_", None)
    metadata, tensors = _model_payload(model, "checkpoint")
    dtype = numpy.dtype(model.dtype_name)
    opt_entry = None if optimizer is None else _optimizer_entry(optimizer, tensors, dtype)
    if steps is None:
        steps = getattr(model, "steps_", 0)
    hist = None
    if history is not None:
        hist = {k: [_history_value(v) for v in getattr(history, k)]
                for k in ("loss", "val_loss", "val_metric", "lr", "time")}
        hist["metric_name"] = history.metric_name
        hist["metrics"] = {k: [_history_value(v) for v in series] for k, series in history.metrics.items()}
    cb_entries = _callback_entries(callbacks, len(model.layers), tensors, dtype)
    ck = {
        "callbacks": cb_entries,
        "epoch": int(epoch),
        "steps": int(steps),
        "optimizer": opt_entry,
        "schedule": _schedule_state(schedule),
        "rng": _rng_state(model),
        "history": hist,
        "precision": None if precision is None else precision.state_dict(),
    }
    metadata["checkpoint"] = json.dumps(ck, sort_keys=True)
    _write_file(path, metadata, tensors)


def _resolve_checkpoint_path(path: Any) -> Path:
    p = Path(os.fspath(path))
    if p.is_dir():
        latest = Checkpoint.latest(p)
        if latest is None:
            msg = f"no checkpoint (epoch-NNNNN.safetensors) in directory {os.fspath(p)}"
            raise FileNotFoundError(msg)
        return latest
    return p


def _checkpoint_dict(f: _File, model: Any) -> dict[str, Any]:
    ck = f.checkpoint
    opt = ck.get("optimizer")
    if opt is not None:
        state = None
        if opt["state"] is not None:
            state = [
                {key: {slot: f.tensors[f"optimizer.{i}.{key}.{slot}"] for slot in slots}
                 for key, slots in entry.items()}
                for i, entry in enumerate(opt["state"])
            ]
        opt = {"optimizer": opt["optimizer"], "hyperparameters": opt["hyperparameters"], "step": opt["step"],
               "state": state}
    return {"model": model, "optimizer": opt, "epoch": ck["epoch"], "steps": ck["steps"],
            "schedule": ck.get("schedule"), "rng": ck.get("rng"), "history": ck.get("history"), "path": Path(f.path)}


def _check_fits(f, model: Any) -> None:
    """Raise ValueError unless the checkpoint ``f`` holds ``model``'s dtype and layers."""
    saved = [_layer_config(i, layer) for i, layer in enumerate(f.layers)]
    mine = [_layer_config(i, layer) for i, layer in enumerate(model.layers)]
    for cfgs in (saved, mine):
        for c in cfgs:
            c.pop("class", None)  # ReLU() and Activation("relu") are the same layer
            c.pop("init", None)  # the saved weights replace the initial ones
    if f.model_cfg["dtype"] != model.dtype_name:
        msg = (f"checkpoint {f.path} holds a {f.model_cfg['dtype']} model, but the model being restored is "
               f"{model.dtype_name}; build it with dtype={f.model_cfg['dtype']!r}")
        raise ValueError(msg)
    if saved != mine:
        diff = next(((i, a, b) for i, (a, b) in enumerate(zip(saved, mine)) if a != b), None)
        where = (f"layer {diff[0]} is {diff[1]} in the checkpoint but {diff[2]} in the model" if diff is not None
                 else f"the checkpoint has {len(saved)} layers, the model {len(mine)}")
        msg = (
            f"checkpoint {f.path} holds layers {f.layers!r}, but the model being restored has layers "
            f"{model.layers!r}: {where}"
        )
        raise ValueError(msg)


def restore_checkpoint(path: str | os.PathLike, model: Any, *, optimizer: Optimizer | None = None,
                       schedule: Any = None, history: History | None = None, callbacks: Sequence[Any] = (),
                       precision: Any = None) -> int:
    """Put a checkpoint's training state into a built model and its optimiser.

    This is what ``fit(..., resume_from=path)`` calls; a hand-written training loop
    can call it too. The model keeps its backend and device; the parameters, step
    counter (``model.steps_``) and random-generator state are replaced, the
    optimiser gets the saved hyper-parameters, step count and moments, a stateful
    schedule its counters, and ``history`` the epochs already run.

    Parameters
    ----------
    path : str or path-like
        A checkpoint file, or a directory of them (the latest is used).
    model : Sequential
        A model with the same architecture and dtype, whose parameters exist.
    optimizer : Optimizer, optional
        Must be of the saved kind (``Adam`` for an Adam checkpoint).
    schedule : Schedule, optional
    history : History, optional
    callbacks : sequence of Callback
        Callbacks with a state (``state_dict()`` not None) get the saved state of
        the same class, in order; saved states without such a callback are ignored.
    precision : MixedPrecision, optional
        Gets the saved mixed-precision configuration and loss scale (a checkpoint of a
        run without mixed precision leaves it as it is); it must compute in the saved
        dtype, and a checkpoint of a mixed-precision run needs it.

    Returns
    -------
    int
        The number of completed epochs: the index of the epoch to run next.

    Raises
    ------
    ModelFileError
        For any problem with the file's contents.
    ValueError
        When the checkpoint does not fit the model (architecture or dtype), the
        optimiser (another kind) or ``precision`` (none, or another compute dtype, for
        a mixed-precision run's checkpoint); nothing has been restored then.
    """
    p = _resolve_checkpoint_path(path)
    f = _read(p)
    if f.checkpoint is None:
        raise ModelFileError(f.path, "a model file, not a checkpoint (it has no training state)")
    if model.params is None:
        msg = "the model has no parameters yet; build it (backend= or a first call) before restoring a checkpoint"
        raise ValueError(msg)
    _check_fits(f, model)
    k_saved, k_model = f.model_cfg.get("ensemble"), getattr(model, "ensemble", None)
    if k_saved != k_model:
        what = {None: "a plain model"}
        msg = (f"checkpoint {f.path} holds {what.get(k_saved, f'an ensemble of {k_saved} members')}, but the model "
               f"being restored is {what.get(k_model, f'an ensemble of {k_model} members')}")
        raise ValueError(msg)
    info = _checkpoint_dict(f, None)
    opt = info["optimizer"]
    if optimizer is not None and opt is not None and opt["optimizer"] != optimizer.name:
        msg = (
            f"checkpoint {f.path} was saved with optimizer {opt['optimizer']!r} but training uses "
            f"{optimizer.name!r}; pass optimizer={opt['optimizer']!r} to resume"
        )
        raise ValueError(msg)
    _check_precision(f, precision)
    xp = model.xp
    model.params = [
        {k: _to_xp(f.tensors[f"layers.{i}.{k}"], xp, model.dtype, model.device) for k in _param_shapes(layer)}
        for i, layer in enumerate(model.layers)
    ]
    if optimizer is not None:
        if opt is not None:
            optimizer.load_state_dict(opt)
        else:
            optimizer.reset()
    rng = info["rng"]
    if rng is not None:
        try:  # both streams carry over to any backend: the per-step one is counter-based
            gen = generator_from_state(rng["entropy"], rng["state"], xp, model.device)  # an ensemble's: per member
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the random-generator state is invalid: {exc}") from None
        model.rng = gen
    model.steps_ = info["steps"]
    if schedule is not None and info["schedule"] is not None and callable(getattr(schedule, "load_state_dict", None)):
        try:
            schedule.load_state_dict(info["schedule"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the schedule state does not fit {schedule!r}: {exc}") from None
    hist = info["history"]
    if history is not None and hist is not None:
        for k in ("loss", "val_loss", "val_metric", "lr", "time"):
            # an ensemble's per-member values come back as the arrays (K,) its history holds
            setattr(history, k, [numpy.asarray(v) if isinstance(v, list) and k != "lr" else v
                                 for v in hist.get(k, [])])
        history.metric_name = hist.get("metric_name", history.metric_name) or history.metric_name
        for k, series in hist.get("metrics", {}).items():  # an ensemble's: arrays (K,)
            history.metrics[k] = [numpy.asarray(v) if isinstance(v, list) else float(v) for v in series]
    _restore_precision(f, precision)
    _restore_callbacks(f, model, callbacks)
    for key, value in f.model_cfg["fitted"].items():
        setattr(model, key, value)
    return info["epoch"]


def _check_precision(f: _File, precision: Any) -> None:
    """Refuse, before anything is restored, a checkpoint of a mixed-precision run without
    a ``precision`` to continue it, or with one of another compute dtype."""
    saved = f.checkpoint.get("precision")
    if saved is None:
        return
    dtype = saved.get("dtype") if isinstance(saved, dict) else None
    if precision is None:
        msg = (f"checkpoint {f.path} was saved by a run with mixed precision ({dtype}); pass precision={dtype!r} to "
               f"continue it with its loss scale (to train on in the model's own dtype instead, load the model "
               f"with arraymlp.io.load_checkpoint and fit it afresh)")
        raise ValueError(msg)
    if dtype != precision.dtype_name:
        msg = (f"checkpoint {f.path}: the saved mixed-precision state is for dtype {dtype!r}, but this run computes "
               f"in {precision.dtype_name!r}; pass precision={dtype!r} to continue it")
        raise ValueError(msg)


def _restore_precision(f: _File, precision: Any) -> None:
    """Give a MixedPrecision the saved loss scale and configuration, if the run had one."""
    saved = f.checkpoint.get("precision")
    if precision is None or saved is None:
        return
    try:
        precision.load_state_dict(saved)
    except ValueError as exc:
        msg = f"checkpoint {f.path}: {exc}"
        raise ValueError(msg) from None
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f.path, f"the mixed-precision state is invalid: {exc}") from None


def _restore_callbacks(f: _File, model: Any, callbacks: Sequence[Any]) -> None:
    """Give each stateful callback the next saved state of its class."""
    saved = list(enumerate(f.checkpoint.get("callbacks", [])))
    xp = model.xp
    for cb in callbacks:
        if cb.state_dict() is None:
            continue
        match = next((k for k, (_, e) in enumerate(saved) if e["class"] == _state_name(cb)), None)
        if match is None:
            continue
        j, entry = saved.pop(match)
        state = dict(entry["state"])
        for name, skeleton in entry["arrays"].items():
            state[name] = [{key: _to_xp(f.tensors[f"callbacks.{j}.{name}.{i}.{key}"], xp, model.dtype, model.device)
                            for key in keys} for i, keys in enumerate(skeleton)]
        try:
            cb.load_state_dict(state)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFileError(f.path, f"the saved state of {type(cb).__name__} does not fit it: {exc}") from None


class Checkpoint(Callback):
    """Training callback that saves a checkpoint every ``every`` epochs.

    Each checkpoint holds the model, the optimiser's state, the schedule's state, the
    random-generator state, the step counter, the epoch, the history and the state of
    the run's other callbacks, such as early stopping (see :func:`save_checkpoint`);
    ``fit(..., resume_from=...)`` continues from it so that an interrupted run ends
    bit-identical (on NumPy) to an uninterrupted one. ``fit`` runs checkpoints after
    the other callbacks of each epoch, so what they save is the epoch's final state.

    By default a directory holds the last three checkpoints; with ``monitor=`` the
    best one (by the monitored value) is kept as well, however old.

    For an ensemble (``ensemble=K``), whose logs hold one value per member, ``monitor=``
    keeps each member's best by default (``reduce=None``): the directory's
    ``best.safetensors`` (:attr:`best_path`) is a model file, loaded with
    :func:`arraymlp.load`, of the ensemble whose member ``i`` has member ``i``'s
    parameters at the epoch of its own best monitored value, the ensemble a deep
    ensemble with per-member model selection is made of. It is rewritten after each
    save in which some member improved, and the members' best parameters travel in
    the checkpoints, so a resumed run goes on tracking them. ``reduce="mean"`` instead
    monitors the members' mean value and keeps the checkpoint of the epoch where it
    was best, as for a plain model.

    Parameters
    ----------
    path : str or path-like
        A directory (created if needed), where the checkpoints are files named
        ``epoch-00003.safetensors`` after the number of completed epochs; or a file
        ending in ``.safetensors``, rewritten (atomically) at each save.
    every : int
        Save after every ``every``-th epoch (counted from the start of training, so
        resumed runs keep the same rhythm).
    keep : int or None
        Keep only the last ``keep`` checkpoints of the directory (those with the
        highest epoch numbers up to the one just written), plus the best one when
        ``monitor`` is given; ``None`` keeps them all. Ignored for a single file.
    monitor : str, optional
        A value of the epoch's logs (``"val_loss"``, ``"loss"``, ``"val_metric"``, or
        any other key ``fit`` logs) whose best checkpoint is never deleted; its path is
        :attr:`best_path`.
    mode : {"auto", "min", "max"}
        Whether lower or higher ``monitor`` values are better; ``"auto"`` infers it from
        the name as :class:`arraymlp.EarlyStopping` does (:func:`arraymlp.callbacks.monitor_mode`:
        min for losses and errors, max for accuracies, R^2 and ``"val_metric"``; any
        other name needs ``mode=``).
    reduce : {None, "mean"}
        For an ensemble: ``None`` keeps each member's best (``best.safetensors``),
        ``"mean"`` the epoch with the best mean over the members. A plain model has one
        value; both give its best.

    Attributes
    ----------
    saved : list of Path
        Files written by this callback, in order (some may have been deleted since).
    best_path : Path or None
        The checkpoint with the best monitored value so far (``None`` without ``monitor``);
        for an ensemble with ``reduce=None``, the ``best.safetensors`` model file of the
        members' bests.
    best, best_epoch : float and int, or NumPy arrays (K,)
        The best monitored value so far and the number of completed epochs it came
        after; per member (arrays of shape (K,), -1 for a member with no finite value
        yet) for an ensemble with ``reduce=None``.

    Examples
    --------
    >>> import tempfile, os
    >>> import numpy as np, arraymlp as am
    >>> d = tempfile.mkdtemp()
    >>> x, y = np.zeros((4, 2)), np.ones((4, 1))
    >>> ckpt = am.Checkpoint(os.path.join(d, "run"), every=2, keep=1)
    >>> _ = am.MLP([2, 3, 1], backend="numpy", seed=0).fit(x, y, epochs=4, callbacks=[ckpt], progress=False)
    >>> [p.name for p in ckpt.saved], os.listdir(os.path.join(d, "run"))
    (['epoch-00002.safetensors', 'epoch-00004.safetensors'], ['epoch-00004.safetensors'])
    >>> model = am.MLP([2, 3, 1], backend="numpy", seed=0)
    >>> model.fit(x, y, epochs=6, resume_from=os.path.join(d, "run"), progress=False).epochs
    6
    """

    saves_callbacks = True  # fit runs it last and gives it run_callbacks; data-parallel fit, on the root only

    def __init__(self, path: str | os.PathLike, every: int = 1, keep: int | None = 3, *,
                 monitor: str | None = None, mode: str = "auto", reduce: str | None = None):
        if not _is_int(every) or every < 1:
            msg = f"every must be a positive int, got {every!r}"
            raise ValueError(msg)
        if keep is not None and (not _is_int(keep) or keep < 1):
            msg = f"keep must be a positive int or None, got {keep!r}"
            raise ValueError(msg)
        if mode not in ("auto", "min", "max"):
            msg = f"mode must be 'auto', 'min' or 'max', got {mode!r}"
            raise ValueError(msg)
        if monitor is not None:
            mode = monitor_mode(monitor, mode)
        if reduce not in (None, "mean"):
            msg = (f"reduce must be None (an ensemble's members each keep their best) or 'mean' (the best mean "
                   f"over the members), got {reduce!r}")
            raise ValueError(msg)
        self.path = Path(os.fspath(path))
        self.single_file = self.path.suffix == ".safetensors"
        if self.single_file and monitor is not None:
            msg = (f"monitor={monitor!r} keeps the best checkpoint beside the latest, which needs a directory; "
                   f"{os.fspath(self.path)} names a single file, rewritten at each save")
            raise ValueError(msg)
        self.every, self.keep, self.monitor = every, keep, monitor
        self.mode = mode
        self.reduce = reduce
        self.run_callbacks: Sequence[Callback] = ()  # set by fit: the run's callbacks, whose state is saved
        self.saved: list[Path] = []
        self.best: Any = None
        self.best_epoch: Any = None  # number of completed epochs of the best checkpoint
        self._history: History | None = None
        self._members = False  # tracking each member of an ensemble (reduce=None)
        self._best_params: list[dict[str, Any]] | None = None  # the members' bests, stacked

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint's file (``None`` before the first save or without ``monitor``)."""
        if self.best_epoch is None or self.single_file:
            return None
        if self._members:
            return self.path / "best.safetensors"
        return self.path / f"epoch-{self.best_epoch:05d}.safetensors"

    def state_dict(self) -> dict[str, Any] | None:
        """The best monitored value and its epoch (``None`` without ``monitor``); per
        member, with the members' best parameters, for an ensemble with ``reduce=None``."""
        if self.monitor is None:
            return None
        if not self._members:
            state = {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch}
            if self.reduce is not None:
                state["reduce"] = self.reduce
            return state
        state = {"monitor": self.monitor, "members": True, "best": None, "best_epoch": None}
        if self.best is not None:
            state["best"] = [float(v) if numpy.isfinite(v) else None for v in self.best]
            state["best_epoch"] = [int(v) for v in self.best_epoch]
            state["best_params"] = self._best_params
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best value and epoch of a resumed run monitoring the same value
        (per member, with their best parameters, for an ensemble with ``reduce=None``)."""
        if state.get("monitor") != self.monitor or state.get("reduce") != self.reduce:
            return
        best = state["best"]
        if state.get("members"):
            self._members = True
            if best is None:
                return
            worst = numpy.inf if self.mode == "min" else -numpy.inf
            self.best = numpy.array([worst if v is None else float(v) for v in best])
            self.best_epoch = numpy.array(state["best_epoch"], dtype=int)
            self._best_params = state.get("best_params")
            return
        self.best = None if best is None else float(best)
        self.best_epoch = None if state["best_epoch"] is None else int(state["best_epoch"])

    def on_train_begin(self, model, history):
        """Remember the run's history, saved with each checkpoint."""
        self._history = history

    def _track_best(self, model, logs: dict[str, Any], done: int) -> bool:
        """Record the epoch's monitored value; whether it (or, per member, some member's)
        is a new best."""
        value = logs.get(self.monitor)
        if value is None:
            raise missing_value("Checkpoint", self.monitor, logs)
        k = getattr(model, "ensemble", None)
        if k is not None and numpy.ndim(value) != 0:
            if self.reduce is None:
                return self._track_members(model, numpy.asarray(value, dtype=float).reshape(-1), done)
            value = numpy.mean(numpy.asarray(value, dtype=float))
        value = float(value)
        if value != value:  # NaN is never the best
            return
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_epoch = value, done
            return True
        return False

    def _track_members(self, model, values, done: int) -> bool:
        """Each member's best value, epoch and parameters (stacked, on the model's device)."""
        k = int(model.ensemble)
        if values.shape != (k,):
            msg = f"Checkpoint monitors {self.monitor!r}, which holds {values.size} values for an ensemble of {k}"
            raise ValueError(msg)
        self._members = True
        if self.best is None:
            self.best = numpy.full(k, numpy.inf if self.mode == "min" else -numpy.inf)
            self.best_epoch = numpy.full(k, -1)
        better = values < self.best if self.mode == "min" else values > self.best
        improved = numpy.isfinite(values) & better  # NaN is never the best
        if not improved.any():
            return False
        self.best = numpy.where(improved, values, self.best)
        self.best_epoch = numpy.where(improved, done, self.best_epoch)
        xp = model.xp
        if self._best_params is None or improved.all():
            self._best_params = [{key: xp.asarray(a, copy=True) for key, a in p.items()} for p in model.params]
        else:
            like = model.params[0][next(iter(model.params[0]))]
            mask = xp.reshape(xp.asarray(improved, device=like.device), (k, 1, 1))
            self._best_params = [{key: xp.where(mask, a, self._best_params[i][key]) for key, a in p.items()}
                                 for i, p in enumerate(model.params)]
        return True

    def _save_members_best(self, model) -> None:
        """``best.safetensors``: the model file of the ensemble of the members' bests."""
        current = model.params
        model.params = self._best_params
        try:
            metadata, tensors = _model_payload(model, "model")
        finally:
            model.params = current
        _write_file(self.path / "best.safetensors", metadata, tensors)

    def on_epoch_end(self, model, logs):
        """Save a checkpoint when the number of completed epochs is a multiple of ``every``."""
        done = logs["epoch"] + 1
        if done % self.every:
            return None
        improved = self.monitor is not None and self._track_best(model, logs, done)
        if self.single_file:
            target = self.path
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            target = self.path / f"epoch-{done:05d}.safetensors"
        save_checkpoint(target, model, epoch=done, steps=logs["step"], history=self._history,
                        callbacks=self.run_callbacks)
        self.saved.append(target)
        if improved and self._members:
            self._save_members_best(model)
        if not self.single_file and self.keep is not None:
            self._prune(done)
        return None

    def _prune(self, upto: int) -> None:
        found = sorted((n, p) for n, p in self._scan(self.path) if n <= upto)
        for n, p in found[:-self.keep]:
            if not self._members and n == self.best_epoch:
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    @staticmethod
    def _scan(directory: Path) -> list[tuple[int, Path]]:
        out = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                m = _CHECKPOINT_NAME.match(entry.name)
                if m and entry.is_file():
                    out.append((int(m.group(1)), Path(entry.path)))
        return out

    @staticmethod
    def latest(directory: str | os.PathLike) -> Path | None:
        """The checkpoint with the highest epoch number in ``directory`` (``None`` if none)."""
        found = Checkpoint._scan(Path(os.fspath(directory)))
        return max(found)[1] if found else None

    def __repr__(self) -> str:
        extra = "" if self.monitor is None else f", monitor={self.monitor!r}, mode={self.mode!r}"
        if self.reduce is not None:
            extra += f", reduce={self.reduce!r}"
        return f"Checkpoint({os.fspath(self.path)!r}, every={self.every}, keep={self.keep}{extra})"
