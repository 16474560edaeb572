"""Host batches for a model on another device (:mod:`arraymlp._staging`), on every
backend row: the batches are the rows of the permutation, in the model's dtype and
place, independent of the reused host buffers, and the host data is never written."""

from __future__ import annotations

import math
import sys

import array_api_strict
import numpy as np
import pytest

import arraymlp as am
from arraymlp._backend import _PlainCopies, canonical_device, host_copies, index_dtype, to_numpy
from arraymlp._staging import DeviceBatches


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_the_rows_on_the_models_device(backend, shuffle):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 4))  # float64 on the host, float32 on the device
    y = np.arange(23) % 3
    if backend.readonly:
        x.flags.writeable = y.flags.writeable = False
    x0, y0 = x.copy(), y.copy()
    xp = backend.xp
    device = canonical_device(xp, backend.device)
    order = rng.permutation(23) if shuffle else None
    batches = DeviceBatches([x, y, None], xp, device, batch_size=5, dtypes=["float32", None, None])
    got = list(batches.epoch(order))
    rows = order if shuffle else np.arange(23)
    assert [b[0].shape[0] for b in got] == [5, 5, 5, 5, 3]
    for i, (xb, yb, wb) in enumerate(got):  # read after the whole epoch: no batch shares a reused buffer
        idx = rows[5 * i: 5 * i + 5]
        assert wb is None and backend.same_place(xb) and backend.same_place(yb)
        assert xb.dtype == xp.float32 and yb.dtype == index_dtype(xp)  # int32 on JAX's 32-bit mode
        np.testing.assert_array_equal(backend.to_numpy(xb), x[idx].astype(np.float32))
        np.testing.assert_array_equal(backend.to_numpy(yb), y[idx])
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    again = list(batches.epoch(order))  # the buffers serve the next epoch too
    np.testing.assert_array_equal(backend.to_numpy(again[-1][0]), backend.to_numpy(got[-1][0]))


def test_copies_by_backend():
    assert type(host_copies(np)) is _PlainCopies
    torch = pytest.importorskip("torch")
    from arraymlp._backend import resolve_backend

    assert type(host_copies(resolve_backend("torch"), torch.device("cpu"))) is _PlainCopies


def test_arrays_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        DeviceBatches([np.zeros((3, 2)), np.zeros(4)], np, None, batch_size=2)
    with pytest.raises(ValueError, match="one dtype"):
        DeviceBatches([np.zeros((3, 2)), np.zeros(3)], np, None, batch_size=2, dtypes=["float32"])
    assert list(DeviceBatches([np.zeros((0, 2))], np, None, batch_size=2).epoch()) == []


# ----------------------------------------------------------------- fit on host data
def _host_params(model):
    return [{k: np.array(to_numpy(v), dtype=np.float64) for k, v in p.items()} for p in model.params]


def _classification(n=46, n_val=13, seed=0):
    rng = np.random.default_rng(seed)
    x, xv = rng.standard_normal((n, 4)), rng.standard_normal((n_val, 4))
    y, yv = rng.integers(0, 3, n), rng.integers(0, 3, n_val)
    w = rng.uniform(0.2, 2.0, n)
    return x, y, w, xv, yv


FIT_CASES = {
    "adam-shuffled": dict(optimizer="adam"),
    "sgd-in-order": dict(optimizer="sgd", shuffle=False, lr=0.05),
    "momentum-weights-l2": dict(optimizer=lambda: am.optim.SGD(lr=0.05, momentum=0.9), weights=True, l2=1e-3),
    "dropout-validation": dict(optimizer="adam", dropout=0.3, validation=True),
    "validation-split-metrics": dict(optimizer="adam", validation_split=0.25),
    "per-step-reads": dict(optimizer="adam", weights=True, watch=True),
}


class _Watch(am.Callback):
    def __init__(self):
        self.losses = []

    def on_batch_end(self, model, logs):
        self.losses.append(logs["loss"])


def _fit(model, x, y, w, val, case):
    opt = case["optimizer"]
    kwargs = dict(optimizer=opt() if callable(opt) else opt, epochs=3, batch_size=8, progress=False, seed=4,
                  shuffle=case.get("shuffle", True), l2=case.get("l2", 0.0),
                  validation_split=case.get("validation_split", 0.0))
    if "lr" in case:
        kwargs["lr"] = case["lr"]
    if case.get("weights"):
        kwargs["sample_weight"] = w
    if case.get("validation"):
        kwargs["validation_data"] = val
    watch = _Watch() if case.get("watch") else None
    if watch is not None:
        kwargs["callbacks"] = [watch]
    history = model.fit(x, y, **kwargs)
    return history, _host_params(model), None if watch is None else watch.losses


@pytest.mark.parametrize("name", list(FIT_CASES))
def test_fit_on_host_data_equals_fit_on_data_moved_first(backend, name):
    """NumPy data with a model on another backend or device is staged batch by batch;
    training ends bit-identical (float64) to training on the same data moved to the
    model's device first: same batches, order, dropout masks, validation and history."""
    backend.skip_without_float64()
    case = FIT_CASES[name]
    x, y, w, xv, yv = _classification()
    runs = []
    for moved in (False, True):
        model = am.MLP([4, 8, 3], dropout=case.get("dropout", 0.0), dtype="float64", seed=1,
                       **backend.model_kwargs())
        put = backend.asarray if moved else (lambda a: a)
        runs.append(_fit(model, put(x), put(y), put(w), (put(xv), put(yv)), case))
    (h, params, losses), (h_moved, params_moved, losses_moved) = runs
    for p, q in zip(params, params_moved):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    assert h.loss == h_moved.loss and h.val_loss == h_moved.val_loss and h.metrics == h_moved.metrics
    assert losses == losses_moved
    if case.get("validation") or case.get("validation_split"):
        assert len(h.val_loss) == 3 and all(np.isfinite(h.val_loss))


def _counting_sends(monkeypatch):
    """Every host-to-device copy of the staging, as (shape, dtype) in order."""
    sent = []
    original = _PlainCopies.send

    def send(self, host):
        sent.append((host.shape, host.dtype.name))
        return original(self, host)

    monkeypatch.setattr(_PlainCopies, "send", send)
    return sent


@pytest.mark.parametrize("weights", [False, True])
def test_one_transfer_per_batch_and_array(monkeypatch, weights):
    """Host data staged to array_api_strict's second device: each batch crosses once
    (x, y and the weights, one copy each, of the batch's rows), the validation data once
    per evaluation block, and nothing the size of the data ever does."""
    x, y, w, xv, yv = _classification(n=46, n_val=13)
    model = am.MLP([4, 8, 3], dtype="float64", seed=1, backend="array_api_strict",
                   device=array_api_strict.Device("device1"))
    sent = _counting_sends(monkeypatch)
    asarray_calls = []
    original = array_api_strict.asarray

    def asarray(obj, *args, **kwargs):
        if isinstance(obj, np.ndarray) and obj.ndim >= 1:
            asarray_calls.append(obj.shape)  # any host array moved to the device
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(array_api_strict, "asarray", asarray)
    model.fit(x, y, sample_weight=w if weights else None, validation_data=(xv, yv), epochs=2, batch_size=8,
              progress=False, seed=0)
    rows = [8] * 5 + [6]
    per_batch = [((r, 4), "float64") for r in rows], [((r,), "int64") for r in rows], \
        [((r,), "float64") for r in rows]
    epoch = []
    for i in range(len(rows)):
        epoch += [per_batch[0][i], per_batch[1][i]] + ([per_batch[2][i]] if weights else [])
    validation = [((13, 4), "float64"), ((13,), "int64")]
    assert sent == (epoch + validation) * 2
    assert asarray_calls == [shape for shape, _ in sent]  # no other host array reached the device


def test_data_on_the_first_strict_device_is_staged_to_the_second():
    """array_api_strict's CPU device is host memory: data there trains a model on its
    second device as NumPy data does, bit for bit."""
    x, y, w, xv, yv = _classification()
    dev1 = array_api_strict.Device("device1")
    runs = []
    for put in (lambda a: array_api_strict.asarray(a), lambda a: a):
        model = am.MLP([4, 8, 3], dtype="float64", seed=1, dropout=0.2, backend="array_api_strict", device=dev1)
        h = model.fit(put(x), put(y), sample_weight=put(w), validation_data=(put(xv), put(yv)), epochs=2,
                      batch_size=8, progress=False, seed=0)
        runs.append((h.loss, h.val_loss, _host_params(model)))
    assert runs[0][:2] == runs[1][:2]
    for p, q in zip(runs[0][2], runs[1][2]):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def _nan_at_call(k):
    calls = [0]

    def fn(outputs, targets, *, xp=None, sample_weight=None, check=True):
        calls[0] += 1
        value, g = am.LOSSES["mse"].fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)
        return (value * math.nan if calls[0] == k else value), g

    return am.losses.Loss("nan_at_call", fn, "identity", "same_shape")


def test_divergence_replays_staged_batches(backend, monkeypatch):
    """A non-finite loss found at a read replays the steps since the last one; with host
    data their batches are staged again, out of turn: the error and the parameters are
    those of the same run on data moved first."""
    backend.skip_without_float64()
    monkeypatch.setattr(am.training, "_CHECK_EVERY", 3)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    results = []
    for put in (lambda a: a, backend.asarray):
        model = am.MLP([3, 8, 2], dropout=0.25, dtype="float64", seed=1, **backend.model_kwargs())
        with pytest.raises(am.DivergenceError) as info:
            model.fit(put(x), put(y), loss=_nan_at_call(9), optimizer="adam", lr=1e-2, epochs=3, batch_size=8,
                      progress=False, seed=3)
        results.append((str(info.value), _host_params(model)))
    assert "step 8" in results[0][0] and results[0][0] == results[1][0]
    for p, q in zip(results[0][1], results[1][1]):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_host_data_refusals():
    """Host x with targets on the device, or with data parallelism, is refused by name."""
    x, y, w, xv, yv = _classification()
    dev1 = array_api_strict.Device("device1")
    model = am.MLP([4, 8, 3], dtype="float64", seed=1, backend="array_api_strict", device=dev1)
    with pytest.raises(ValueError, match="y is on .* but x is host data"):
        model.fit(x, array_api_strict.asarray(y, device=dev1), epochs=1, progress=False)
    with pytest.raises(ValueError, match="comm= .* needs x on the model's device"):
        model.fit(x, y, epochs=1, progress=False, comm=object())


class _FakeCupy:
    """A stand-in ``cupy`` recording the stream protocol of :class:`_CupyCopies`: which
    stream records, waits and copies, in order (arrays are NumPy arrays). As in CuPy,
    each device has its own current stream (the compute streams ``compute`` on device 0
    and ``compute@1`` on device 1), ``Device`` makes a device current for a ``with``
    block, and an event recorded on a stream of another device than the current one (on
    which ``record`` creates it) fails as CUDA's ``cudaEventRecord`` does."""

    def __init__(self):
        self.log = []
        self.current = 0
        fake = self
        import types

        class Device:
            def __init__(self, i=None):
                self.id = fake.current if i is None else i

            def __enter__(self):
                self.prev, fake.current = fake.current, self.id
                return self

            def __exit__(self, *exc):
                fake.current = self.prev

        class Event:
            def __init__(self, stream):
                self.stream = stream

            def synchronize(self):
                fake.log.append(("host waits", self.stream.name))

        class Stream:
            def __init__(self, name="side", non_blocking=False):
                self.name, self.device = name, fake.current

            def record(self):
                if self.device != fake.current:
                    msg = "cudaErrorInvalidResourceHandle: the event's device is not the stream's"
                    raise RuntimeError(msg)
                fake.log.append(("record", self.name))
                return Event(self)

            def wait_event(self, event):
                fake.log.append(("wait", self.name, event.stream.name))

        class Array(np.ndarray):
            def set(self, host, stream=None):
                fake.log.append(("copy", stream.name))
                self[...] = host

        self.compute = {}
        for i, name in ((0, "compute"), (1, "compute@1")):
            with Device(i):
                self.compute[i] = Stream(name)
        cuda = types.SimpleNamespace(Stream=Stream, Device=Device,
                                     get_current_stream=lambda: self.compute[self.current],
                                     alloc_pinned_memory=lambda n: bytearray(n))
        self.module = types.SimpleNamespace(cuda=cuda, empty=lambda shape, dtype: np.empty(shape, dtype).view(Array))


def test_cupy_copies_wait_for_the_compute_queue_and_are_waited_for(monkeypatch):
    """On CuPy each batch's copy runs on a side stream after the compute stream's queue
    as it was when the batch was staged (its memory may have been freed by kernels still
    queued there), and the compute stream waits for the copy by an event before using
    the batch: device-side waits only, the host waiting only to refill a buffer two
    batches later."""
    from arraymlp._backend import _CupyCopies

    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    x, y = np.arange(12.0).reshape(6, 2), np.arange(6)
    batches = DeviceBatches([x, y], np, None, batch_size=2)
    batches.copies = _CupyCopies(np, 0)
    got = []
    for xb, yb in batches.epoch(np.array([5, 4, 3, 2, 1, 0])):
        fake.log.append(("compute uses", int(yb[0])))
        got.append((xb[:, 0].tolist(), yb.tolist()))
    assert got == [([10.0, 8.0], [5, 4]), ([6.0, 4.0], [3, 2]), ([2.0, 0.0], [1, 0])]
    one_copy = [("record", "compute"), ("wait", "side", "compute"), ("copy", "side")]
    stage = one_copy * 2 + [("record", "side")]  # x and y, then the event marking both copied
    use = [("wait", "compute", "side")]
    assert fake.log == (stage + stage + use + [("compute uses", 5)]  # batch 1 staged while batch 0 is used
                        + [("host waits", "side")] + stage + use + [("compute uses", 3)]  # slot 0 again
                        + use + [("compute uses", 1)])


def test_a_batch_staged_ahead_and_dropped_is_ordered_before_its_memory_returns(monkeypatch):
    """An epoch broken off (a callback stopping training, the next epoch's begin) drops
    the batch staged ahead, whose copy may still be running on the side stream. On
    CuPy its memory came from the compute stream's pool: before it goes back there the
    compute stream waits for that copy (a device-side wait), so no kernel queued later
    can be handed memory the copy is still writing."""
    from arraymlp._backend import _CupyCopies
    from arraymlp._staging import StagedEpochs

    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    x = np.arange(12.0).reshape(6, 2)
    staged = StagedEpochs([x], np, None, batch_size=2)
    staged.batches.copies = _CupyCopies(np, 0)
    staged.begin()
    staged.batch(0)  # batch 1 is staged while batch 0 is used
    use = ("wait", "compute", "side")
    assert fake.log.count(use) == 1
    staged.begin()  # a new epoch: batch 1 is dropped unused
    waits = [i for i, e in enumerate(fake.log) if e == use]
    copies_of_batch_1 = [i for i, e in enumerate(fake.log) if e == ("record", "side")][1]
    assert len(waits) == 2 and waits[1] > copies_of_batch_1


def test_cupy_copies_for_a_model_on_another_device_than_the_current_one(monkeypatch):
    """A model on device 1 while device 0 is current: the copies order after, and are
    waited for by, device 1's compute stream (CuPy's current stream is per device), and
    their events are recorded with device 1 current. Waiting on device 0's stream would
    let the kernels read a batch before its copy landed."""
    from arraymlp._backend import _CupyCopies

    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    x = np.arange(8.0).reshape(4, 2)
    batches = DeviceBatches([x], np, None, batch_size=2)
    batches.copies = _CupyCopies(np, fake.module.cuda.Device(1))
    got = []
    for (xb,) in batches.epoch():
        assert fake.current == 0  # the caller's current device is left as it was
        got.append(xb[:, 0].tolist())
    assert got == [[0.0, 2.0], [4.0, 6.0]]
    waits = [e for e in fake.log if e[0] == "wait"]
    assert waits == [("wait", "side", "compute@1")] * 2 + [("wait", "compute@1", "side")] * 2
    assert batches.one(None, 2, 4)[0][:, 0].tolist() == [4.0, 6.0]
    assert fake.log[-2:] == [("wait", "compute@1", "side"), ("host waits", "side")]


def test_partial_fit_and_mixed_places_stage_what_is_on_the_host(backend):
    """partial_fit stages host data as fit does; training data on the device with host
    validation data (and the reverse) stages only the host side. All end as the run on
    data moved first, bit for bit (float64)."""
    backend.skip_without_float64()
    x, y, w, xv, yv = _classification()
    put = backend.asarray
    runs = []
    for xs, vs in (((put(x), put(y)), (put(xv), put(yv))), ((x, y), (put(xv), put(yv))),
                   ((put(x), put(y)), (xv, yv))):
        model = am.MLP([4, 8, 3], dtype="float64", seed=1, dropout=0.2, **backend.model_kwargs())
        model.partial_fit(xs[0], xs[1], loss="cross_entropy", batch_size=8)
        h = model.fit(*xs, validation_data=vs, epochs=2, batch_size=8, progress=False, seed=0)
        model.partial_fit(*xs, batch_size=8)
        runs.append((h.loss, h.val_loss, _host_params(model)))
    for loss, val_loss, params in runs[1:]:
        assert (loss, val_loss) == runs[0][:2]
        for p, q in zip(params, runs[0][2]):
            for k in p:
                np.testing.assert_array_equal(p[k], q[k])


def test_evaluate_stages_host_data(backend):
    """evaluate on host data gives the loss and metrics of evaluate on the data moved to
    the model's device (blocks of batch_size rows, staged)."""
    backend.skip_without_float64()
    x, y, w, xv, yv = _classification()
    model = am.MLP([4, 8, 3], dtype="float64", seed=1, **backend.model_kwargs())
    model.fit(backend.asarray(x), backend.asarray(y), epochs=2, batch_size=8, progress=False, seed=0)
    metrics = ["accuracy", am.metrics.top_k_accuracy(2)]
    on_host = model.evaluate(xv, yv, metrics=metrics, batch_size=5)
    moved = model.evaluate(backend.asarray(xv), backend.asarray(yv), metrics=metrics, batch_size=5)
    assert on_host == moved and set(on_host) == {"loss", "accuracy", "top_2_accuracy"}
