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
        monkeypatch.setattr(array_api_strict, "asarray", self._number_counting(array_api_strict.asarray))

    def _number_counting(self, original):
        """``asarray`` of a Python number: a copy from the host that torch makes
        synchronously on a GPU (``xp.full`` fills on the device instead)."""
        counts = self.counts

        def wrapper(obj, *args, **kwargs):
            if isinstance(obj, (bool, int, float, complex)):
                counts["asarray(number)"] += 1
            return original(obj, *args, **kwargs)

        return wrapper

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
    # what runs once per epoch (a plateau schedule, early stopping keeping the best parameters,
    # a callback that watches epochs only) adds no read per step
    "schedule-early-stopping-epoch-callback": dict(
        optimizer=lambda: Adam(lr=1e-3), loss="cross_entropy", validation=True,
        fit=lambda: dict(schedule=am.ReduceOnPlateau(1e-3, patience=0), callbacks=[_EpochWatcher()],
                         early_stopping=am.EarlyStopping("val_loss", patience=50))),
    # rows in order, a last batch shorter than the others, weights: the same
    "in-order-last-short-batch": dict(optimizer=lambda: SGD(lr=0.05, momentum=0.9), loss="mse", weights=True,
                                      extra_rows=3, fit=lambda: dict(shuffle=False)),
}


class _EpochWatcher(am.Callback):
    def on_epoch_end(self, model, logs):
        self.last = logs["loss"]


def _count_fit(monkeypatch, case, steps_per_epoch, *, epochs=2, batch=8, staged=False):
    """``staged``: the model on array_api_strict's second device and the data NumPy
    arrays on the host, staged to it batch by batch."""
    rng = np.random.default_rng(0)
    x, y = _data(steps_per_epoch * batch + case.get("extra_rows", 0), case["loss"], rng)
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
    if "fit" in case:
        kwargs.update(case["fit"]())
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


def test_the_loss_scale_update_reads_and_copies_nothing(monkeypatch):
    """The dynamic loss scale's update after a step (mixed precision): device arithmetic
    only, its constants filled on the device, with the values of the rule (a good step
    counted; an overflow halves the scale, not below ``min_scale``, and is counted)."""
    xp = array_api_strict
    amp = am.MixedPrecision("float16", init_scale=4.0, growth_interval=3, min_scale=2.0)
    amp._state(xp, None)
    steps = [xp.asarray(True), xp.asarray(False), xp.asarray(False)]
    with monkeypatch.context() as m:
        reads = HostReads(m)
        for ok in steps:
            amp.update_scale(ok, xp)
    assert reads.total == 0, dict(reads.counts)
    assert (float(amp.scale), int(amp.good_steps), int(amp.skipped)) == (2.0, 0, 2)


def test_no_number_is_copied_from_the_host_by_torch_wrappers(monkeypatch):
    """array-api-compat's torch ``maximum``/``minimum`` turn a Python number into a tensor
    with ``torch.asarray``: on a GPU a copy from the host that waits for the stream, at
    every call. The activations and losses of a training step that bound values (ReLU,
    ELU and its derivative, softplus, Huber's gradient, binary cross-entropy) pass 0-d
    arrays instead, with the values of the plain formulas (NumPy, float64)."""
    torch = pytest.importorskip("torch")
    from arraymlp import losses
    from arraymlp._backend import resolve_backend
    from arraymlp.kernels import reference as R

    xp = resolve_backend("torch")
    xn = np.array([-3.0, -0.75, -0.0, 0.0, 0.25, 1.5, 4.0])
    tn = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    x, t, dy = torch.asarray(xn), torch.asarray(tn), torch.ones(7, dtype=torch.float64)
    numbers = []
    original = torch.asarray

    def counting(obj, *args, **kwargs):
        if isinstance(obj, (bool, int, float, complex)):
            numbers.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "asarray", counting)
    got = {"relu": R.relu(x, xp=xp), "elu": R.elu(x, xp=xp), "softplus": R.softplus(x, xp=xp),
           "elu'": R._elu_bw(dy, x, xp), "huber'": losses._huber_kernel(x, t, xp, 0.5)[1],
           "bce": losses._bce_kernel(x, t, xp)[0]}
    assert numbers == []
    xp.maximum(x, 0.0)  # the wrapper's conversion is what is counted
    assert numbers == [0.0]
    softplus = np.maximum(xn, 0) + np.log1p(np.exp(-np.abs(xn)))
    want = {"relu": np.maximum(xn, 0), "elu": np.where(xn > 0, xn, R.ELU_ALPHA * np.expm1(np.minimum(xn, 0))),
            "softplus": softplus, "elu'": np.where(xn > 0, 1.0, R.ELU_ALPHA * np.exp(np.minimum(xn, 0))),
            "huber'": np.clip(xn - tn, -0.5, 0.5), "bce": softplus - xn * tn}
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-15, atol=1e-15, err_msg=name)


def _count_torch_numbers(monkeypatch, case, steps_per_epoch, *, batch=8):
    """Tensors made from Python numbers (``torch.asarray``/``torch.tensor``: a copy from
    the host, synchronous on a GPU) while ``fit`` runs on torch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, y = _data(steps_per_epoch * batch, case["loss"], rng)
    xv, yv = _data(12, case["loss"], rng)
    w = rng.uniform(0.5, 2.0, size=x.shape[0])
    model = am.MLP([5, 16, 3], dropout=case.get("dropout", 0.0), dtype="float64", seed=0, backend="torch")
    kwargs = dict(loss=case["loss"], optimizer=case["optimizer"](), epochs=2, batch_size=batch, progress=False,
                  seed=1, l2=case.get("l2", 0.0))
    if case.get("weights"):
        kwargs["sample_weight"] = torch.asarray(w)
    if case.get("validation"):
        kwargs["validation_data"] = (torch.asarray(xv), torch.asarray(yv))
    if "metrics" in case:
        kwargs["metrics"] = case["metrics"]
    xs, ys = torch.asarray(x), torch.asarray(y)
    numbers = collections.Counter()

    def counting(name, original):
        def wrapper(obj, *args, **kw):
            if isinstance(obj, (bool, int, float, complex, list, tuple)):
                numbers[name] += 1
            return original(obj, *args, **kw)
        return wrapper

    with monkeypatch.context() as m:
        for name in ("asarray", "tensor"):
            m.setattr(torch, name, counting(name, getattr(torch, name)))
        history = model.fit(xs, ys, **kwargs)
    assert len(history.loss) == 2 and all(np.isfinite(history.loss))
    return sum(numbers.values()), dict(numbers)


@pytest.mark.parametrize("name", list(CASES))
def test_no_number_is_copied_from_the_host_per_step_on_torch(monkeypatch, name):
    """On torch, a tensor made from a Python number is a copy from the host that waits
    for a GPU (array-api-compat's ``maximum``/``minimum`` make one for a number
    argument): none per training step, for every case of the host-read test."""
    short, short_by = _count_torch_numbers(monkeypatch, CASES[name], 4)
    long, long_by = _count_torch_numbers(monkeypatch, CASES[name], 8)
    assert long - short == 0, (short_by, long_by)
