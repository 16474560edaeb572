"""Host synchronisations of the training loop, counted on array_api_strict arrays.

Every way a value travels from an array to the host (``float``, ``int``, ``bool``,
``operator.index``, ``complex``, iteration, printing, the buffer, ``__array__`` and
DLPack protocols) and every operation whose result shape depends on the data
(boolean-mask indexing, ``nonzero``, ``unique_*``) is counted while ``fit`` runs. Two
runs that differ only in the number of steps per epoch must read the same number of
times: the steady-state step reads nothing.
"""

from __future__ import annotations

import collections

import array_api_strict
import numpy as np
import pytest

import arraymlp as am
from arraymlp.optim import SGD, Adam

_READS = ("__float__", "__int__", "__index__", "__bool__", "__complex__", "__iter__", "__repr__", "__str__",
          "__array__", "__buffer__", "__dlpack__")
_SHAPE_FROM_DATA = ("nonzero", "unique_all", "unique_counts", "unique_inverse", "unique_values")


class HostReads:
    """Counts host reads of array_api_strict arrays, by kind, while installed."""

    def __init__(self, monkeypatch):
        self.counts = collections.Counter()
        cls = type(array_api_strict.asarray(0.0))
        for name in _READS:
            original = getattr(cls, name, None)
            if original is not None:
                monkeypatch.setattr(cls, name, self._counting(name, original))
        for name in ("__getitem__", "__setitem__"):
            monkeypatch.setattr(cls, name, self._mask_counting(name, getattr(cls, name)))
        for name in _SHAPE_FROM_DATA:
            original = getattr(array_api_strict, name, None)
            if original is not None:
                monkeypatch.setattr(array_api_strict, name, self._counting(name, original))

    def _counting(self, name, original):
        counts = self.counts

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    def _mask_counting(self, name, original):
        counts = self.counts

        def wrapper(self, key, *args):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, type(self)) and k.dtype == array_api_strict.bool for k in keys):
                counts[f"{name}[mask]"] += 1
            return original(self, key, *args)

        return wrapper

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _data(n_rows, loss, rng):
    x = rng.normal(size=(n_rows, 5))
    if loss == "cross_entropy":
        y = rng.integers(0, 3, size=n_rows)
        return x, y
    return x, rng.normal(size=(n_rows, 3))


CASES = {
    "sgd": dict(optimizer=lambda: SGD(lr=0.05), loss="mse"),
    "sgd-momentum-l2": dict(optimizer=lambda: SGD(lr=0.05, momentum=0.9), loss="mse", l2=1e-3),
    "adam": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy"),
    "clip_norm": dict(optimizer=lambda: Adam(lr=1e-3, clip_norm=0.1), loss="mse"),
    "clip_value": dict(optimizer=lambda: SGD(lr=0.05, clip_value=0.01), loss="mse"),
    "sample_weight": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", weights=True),
    "huber": dict(optimizer=lambda: Adam(lr=1e-3), loss="huber"),
    "dropout": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", dropout=0.3),
    "validation": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", validation=True),
    "everything": dict(optimizer=lambda: Adam(lr=1e-3, clip_norm=1.0, clip_value=0.5), loss="huber",
                       weights=True, dropout=0.2, validation=True, l2=1e-4),
    # metrics are sums on the device, read once at the epoch's end
    "metrics-classification": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", validation=True,
                                   metrics=["accuracy", am.metrics.top_k_accuracy(2),
                                            lambda y, p, *, xp: xp.mean(xp.astype(y == p, xp.float64))]),
    "metrics-regression": dict(optimizer=lambda: SGD(lr=0.05), loss="mse", validation=True,
                               metrics=["mae", "r2"]),
}


def _count_fit(monkeypatch, case, steps_per_epoch, *, epochs=2, batch=8, staged=False):
    """``staged``: the model on array_api_strict's second device and the data NumPy
    arrays on the host, staged to it batch by batch."""
    rng = np.random.default_rng(0)
    x, y = _data(steps_per_epoch * batch, case["loss"], rng)
    xv, yv = _data(12, case["loss"], rng)
    w = rng.uniform(0.5, 2.0, size=x.shape[0])
    put = (lambda a: a) if staged else array_api_strict.asarray  # staged: the data stays NumPy
    out = 3
    device = array_api_strict.Device("device1") if staged else None
    model = am.MLP([5, 16, out], dropout=case.get("dropout", 0.0), dtype="float64", seed=0,
                   backend="array_api_strict", device=device)
    kwargs = dict(loss=case["loss"], optimizer=case["optimizer"](), epochs=epochs, batch_size=batch,
                  progress=False, seed=1, l2=case.get("l2", 0.0))
    if case.get("weights"):
        kwargs["sample_weight"] = put(w)
    if case.get("validation"):
        kwargs["validation_data"] = (put(xv), put(yv))
    if "metrics" in case:
        kwargs["metrics"] = case["metrics"]
    xs, ys = put(x), put(y)
    with monkeypatch.context() as m:
        reads = HostReads(m)
        history = model.fit(xs, ys, **kwargs)
    return reads, history


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_read_per_training_step(monkeypatch, name):
    case = CASES[name]
    short, h_short = _count_fit(monkeypatch, case, 4)
    long, h_long = _count_fit(monkeypatch, case, 8)
    # the loss of every epoch was still read, once, at its end
    assert len(h_short.loss) == len(h_long.loss) == 2 and all(np.isfinite(h_long.loss))
    per_step = (long.total - short.total) / (2 * (8 - 4))
    assert per_step == 0, (dict(short.counts), dict(long.counts))


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_read_per_step_with_host_data_staged(monkeypatch, name):
    """Host (NumPy) data for a model on another device: the batches are gathered on the
    host and copied over; the device side of a step still reads nothing back."""
    case = CASES[name]
    short, h_short = _count_fit(monkeypatch, case, 4, staged=True)
    long, h_long = _count_fit(monkeypatch, case, 8, staged=True)
    assert len(h_short.loss) == len(h_long.loss) == 2 and all(np.isfinite(h_long.loss))
    per_step = (long.total - short.total) / (2 * (8 - 4))
    assert per_step == 0, (dict(short.counts), dict(long.counts))


def test_the_counter_counts_a_read_inside_a_step(monkeypatch):
    """A loss kernel that reads one value per call adds exactly one read per step: the
    counter behind the zero slope above does see reads made inside a step."""
    original = am.losses._mse_kernel

    def reading(o, t, xp):
        e, g = original(o, t, xp)
        float(xp.sum(e))
        return e, g

    monkeypatch.setattr(am.losses, "_mse_kernel", reading)
    case = CASES["sgd"]
    short, _ = _count_fit(monkeypatch, case, 4)
    long, _ = _count_fit(monkeypatch, case, 8)
    assert (long.total - short.total) / (2 * (8 - 4)) == 1
    assert long.counts["__float__"] - short.counts["__float__"] == 8


def test_a_long_epoch_reads_its_losses_every_check_every_steps(monkeypatch):
    """With the check every 2 steps, an epoch of 8 steps reads its losses 4 times and
    one of 4 steps twice: half a read per step, one transfer each."""
    monkeypatch.setattr(am.training, "_CHECK_EVERY", 2)
    case = CASES["adam"]
    short, _ = _count_fit(monkeypatch, case, 4)
    long, _ = _count_fit(monkeypatch, case, 8)
    assert (long.total - short.total) / (2 * (8 - 4)) == 0.5
    assert set(long.counts) - set(short.counts) == set()


# ----------------------------------------------------------------------------- ensembles
ENSEMBLE_CASES = {
    "sgd": dict(optimizer=lambda: SGD(lr=0.05), loss="mse"),
    "sgd-momentum-per-member-lr-l2": dict(optimizer=lambda: SGD(lr=0.05, momentum=0.9), loss="mse",
                                          fit=dict(lr=[0.01, 0.02, 0.05], l2=[0.0, 1e-3, 1e-2])),
    "adam": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy"),
    "adam-clip": dict(optimizer=lambda: Adam(lr=1e-3, clip_norm=0.1, clip_value=0.05), loss="huber"),
    "per-member-sample-weight": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", weights=True),
    "dropout": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", dropout=0.3),
    "validation-early-stopping": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", validation=True,
                                      fit=dict(early_stopping=am.EarlyStopping("val_loss", patience=5))),
    # a callback that watches epochs only: the steps still read nothing
    "epoch-callback": dict(optimizer=lambda: Adam(lr=1e-3), loss="mse", fit=dict(callbacks=[am.Callback()])),
    # each member's metrics are sums on the device (a leading member axis), read once at the epoch's end
    "metrics-classification": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", validation=True,
                                   fit=dict(metrics=["accuracy", am.metrics.top_k_accuracy(2),
                                                     lambda y, p, *, xp: xp.mean(xp.astype(y == p, xp.float64))])),
    "metrics-regression": dict(optimizer=lambda: SGD(lr=0.05), loss="mse", validation=True, weights=True,
                               fit=dict(metrics=["mae", "r2"], lr=[0.01, 0.02, 0.05])),
    # each member its own batch order: (K, batch, ...) rows gathered on the device
    "shuffle-members-classification": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", weights=True,
                                           dropout=0.3, validation=True,
                                           fit=dict(shuffle="members", metrics=["accuracy", lambda y, p, *, xp: xp.mean(
                                               xp.astype(y == p, xp.float64))])),
    "shuffle-members-regression": dict(optimizer=lambda: SGD(lr=0.05, momentum=0.9), loss="mse", weights=True,
                                       validation=True, fit=dict(shuffle="members", metrics=["mae", "r2"])),
    # a frozen member: its parameters, moments and step count kept by xp.where on the device
    "frozen-member": dict(optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", dropout=0.3,
                          fit=dict(_active=[True, False, True], shuffle="members")),
}


def _count_ensemble_fit(monkeypatch, case, steps_per_epoch, *, epochs=2, batch=8, k=3):
    rng = np.random.default_rng(0)
    x, y = _data(steps_per_epoch * batch, case["loss"], rng)
    xv, yv = _data(12, case["loss"], rng)
    w = rng.uniform(0.5, 2.0, size=(k, x.shape[0]))
    w[1, ::3] = 0.0  # a member leaving rows out, as a cross-validation fold does
    xp = array_api_strict
    model = am.MLP([5, 16, 3], dropout=case.get("dropout", 0.0), dtype="float64", seed=0, ensemble=k,
                   backend="array_api_strict")
    kwargs = dict(loss=case["loss"], optimizer=case["optimizer"](), epochs=epochs, batch_size=batch,
                  progress=False, seed=1, **case.get("fit", {}))
    if case.get("weights"):
        kwargs["sample_weight"] = xp.asarray(w)
    if case.get("validation"):
        kwargs["validation_data"] = (xp.asarray(xv), xp.asarray(yv))
    xs, ys = xp.asarray(x), xp.asarray(y)
    with monkeypatch.context() as m:
        reads = HostReads(m)
        history = model.fit(xs, ys, **kwargs)
    return reads, history


@pytest.mark.parametrize("name", list(ENSEMBLE_CASES))
def test_no_host_read_per_ensemble_training_step(monkeypatch, name):
    case = ENSEMBLE_CASES[name]
    short, h_short = _count_ensemble_fit(monkeypatch, case, 4)
    long, h_long = _count_ensemble_fit(monkeypatch, case, 8)
    # every member's loss of every epoch was still read, once, at its end
    assert len(h_short.loss) == len(h_long.loss) == 2
    assert all(v.shape == (3,) and np.all(np.isfinite(v)) for v in h_long.loss)
    for name in case.get("fit", {}).get("metrics", ()):  # and each member's metrics
        key = getattr(name, "__name__", getattr(name, "name", name))
        assert all(v.shape == (3,) and np.all(np.isfinite(v)) for v in h_long[key] + h_long["val_" + key])
    per_step = (long.total - short.total) / (2 * (8 - 4))
    assert per_step == 0, (dict(short.counts), dict(long.counts))


def test_a_long_ensemble_epoch_reads_its_losses_every_check_every_steps(monkeypatch):
    """With the check every 2 steps, an ensemble epoch of 8 steps reads its members'
    losses 4 times and one of 4 steps twice: half a read per step."""
    monkeypatch.setattr(am.ensemble, "_CHECK_EVERY", 2)
    case = ENSEMBLE_CASES["adam"]
    short, _ = _count_ensemble_fit(monkeypatch, case, 4)
    long, _ = _count_ensemble_fit(monkeypatch, case, 8)
    assert (long.total - short.total) / (2 * (8 - 4)) == 0.5
