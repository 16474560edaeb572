"""fit's up-front checks of whole data sets run block by block: a bad value in the last
block is found, the message is the one the loss gives for the same data, and the
checks' extra memory is bounded by the block, not by the data."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import arraymlp as am
import arraymlp.kernels.reference as R
from arraymlp.losses import check_targets
from arraymlp.training import _prepare_data

N, K, F = 101, 4, 3

# on a row without float64 (JAX in 32-bit mode) float64 test data comes as float32
FLOAT64_DATA = "float32"


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements: the data below spans several."""
    monkeypatch.setattr(R, "CHECK_BLOCK", 64)
    return 64


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, F)), rng.integers(0, K, size=N), rng.normal(size=(N, K)),
            rng.uniform(0.5, 2.0, size=N))


def _fit(backend, x, y, loss, **kwargs):
    model = am.MLP([F, 5, K], dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
    kw = {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    return model.fit(backend.asarray(x), backend.asarray(y), loss=loss, epochs=1, batch_size=16, progress=False,
                     **kw)


def _loss_message(loss, y, **kwargs):
    """The message of the loss itself, called on the whole data at once (NumPy)."""
    with pytest.raises(ValueError) as info:
        am.LOSSES[loss](np.zeros((N, K)), y, **kwargs)
    return str(info.value)


def test_the_data_spans_several_blocks(small_blocks):
    assert len(R.row_blocks(N, R.block_rows(np.zeros((N, K))))) == 7
    assert len(R.row_blocks(N, R.block_rows(np.zeros(N)))) == 2


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_value_in_the_last_block_is_found(backend, small_blocks, where, bad):
    x, _, y, _ = _data()
    arr = x if where == "x" else y
    arr[-1, -1] = bad
    with pytest.raises(ValueError, match=f"^{where} contains NaN or infinite values$"):
        _fit(backend, x, y, "mse")


def test_labels_out_of_range_in_the_last_block(backend, small_blocks):
    x, labels, _, _ = _data()
    labels[-1] = K + 2
    want = _loss_message("cross_entropy", labels)
    assert f"found labels in [0, {K + 2}]" in want
    with pytest.raises(ValueError) as info:
        _fit(backend, x, labels, "cross_entropy")
    assert str(info.value) == want
    labels[-1], labels[-2] = 0, -1  # and below
    with pytest.raises(ValueError, match=r"found labels in \[-1, 3\]"):
        _fit(backend, x, labels, "cross_entropy")


def test_validation_labels_out_of_range_in_the_last_block(backend, small_blocks):
    x, labels, _, _ = _data()
    y_val = labels.copy()
    y_val[-1] = K
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {K}\).*found labels in \[0, {K}\]"):
        _fit(backend, x, labels, "cross_entropy", validation_data=(backend.asarray(x), backend.asarray(y_val)))


@pytest.mark.parametrize("bad", ["negative", "nan", "zeros"])
def test_sample_weights_checked_over_all_blocks(backend, small_blocks, bad):
    x, labels, _, w = _data()
    if bad == "negative":
        w[-1] = -1.0
    elif bad == "nan":
        w[-1] = np.nan
    else:
        w[:] = 0.0
    want = _loss_message("cross_entropy", labels, sample_weight=w)
    # "sample_weight contains NaN" comes first, from fit's own check of float arrays
    match = "^sample_weight contains NaN or infinite values$" if bad == "nan" else None
    with pytest.raises(ValueError) as info:
        _fit(backend, x, labels, "cross_entropy", sample_weight=w)
    assert str(info.value) == (want if match is None else "sample_weight contains NaN or infinite values")


class _AfterBatch(am.Callback):
    def __init__(self):
        self.params = []

    def on_batch_end(self, model, logs):
        self.params.append([{k: np.array(am.to_numpy(v)) for k, v in p.items()} for p in model.params])


def test_a_block_of_zero_weights_is_not_all_zero_weights(backend, small_blocks):
    """Weights checked per block would refuse these; over all rows they are valid. The
    step on the batch of zero weights leaves the parameters as they were, and the
    weighted loss of the epoch is finite."""
    x, labels, _, w = _data()
    w[:64] = 0.0
    for watcher in (None, _AfterBatch()):
        model = am.MLP([F, 5, K], dtype=backend.float_dtype(), seed=0, **backend.model_kwargs())
        before = [{k: backend.to_numpy(v).copy() for k, v in p.items()} for p in model.params]
        h = model.fit(backend.asarray(x), backend.asarray(labels), loss="cross_entropy", epochs=1, batch_size=16,
                      optimizer=am.optim.SGD(lr=0.1), shuffle=False, progress=False,
                      sample_weight=backend.asarray(w), callbacks=[] if watcher is None else [watcher])
        assert np.isfinite(h.loss[0])
    for p, q in zip(before, watcher.params[0]):
        for k in p:
            np.testing.assert_array_equal(q[k], p[k])
    assert not np.array_equal(watcher.params[-1][0]["W"], before[0]["W"])


def test_custom_loss_is_called_block_by_block(backend, small_blocks):
    calls = []

    def fn(outputs, targets, *, xp=None, sample_weight=None, check=True):
        calls.append(int(outputs.shape[0]))
        return am.LOSSES["mse"].fn(outputs, targets, xp=xp, sample_weight=sample_weight, check=check)

    custom = am.losses.Loss("custom_mse", fn, "identity", "same_shape")
    xp = backend.xp
    y = backend.asarray(_data()[2])
    check_targets(custom, K, y, dtype=getattr(xp, backend.float_dtype()), device=am._backend.device_of(y), xp=xp)
    assert calls == [16] * 6 + [5]


# ------------------------------------------------------------------------- memory
def _peak(fn, *args, **kwargs) -> int:
    """Peak bytes traced by tracemalloc while ``fn`` runs (NumPy reports its buffers)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fit_checks_allocate_a_block_not_the_data(monkeypatch, loss):
    """The check phase of fit (x, y, weights, validation data) on NumPy: its peak extra
    allocation stays under a few blocks of float64 (blocks of 2**15 elements here)
    while the data grows fourfold, and is far below the data's size."""
    monkeypatch.setattr(R, "CHECK_BLOCK", 1 << 15)
    block_bytes = 8 * (1 << 15)
    peaks = {}
    for n in (1 << 16, 1 << 18):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 8))
        y = rng.integers(0, 10, size=n).astype(np.int32) if loss == "cross_entropy" else rng.normal(size=(n, 10))
        w = rng.uniform(0.5, 2.0, size=n).astype(np.float32)  # a cast: the model is float64
        model = am.MLP([8, 16, 10], dtype="float64", seed=0, backend="numpy")
        w64 = w.astype(np.float64)  # fit casts whole arrays to the model's dtype itself: not part of the check
        lossfn = am.losses.get_loss(loss)
        peaks[n] = _peak(_prepare_data, model, x, y, w64, lossfn, (x[:1000], y[:1000]), 0.0)
        data_bytes = x.nbytes + y.nbytes + w64.nbytes
        assert peaks[n] < 4 * block_bytes < data_bytes / 4, (peaks, data_bytes)
    assert peaks[1 << 18] < 1.5 * peaks[1 << 16] + 65536, peaks


@pytest.mark.parametrize("where", ["x", "y", "validation x", "validation y", "sample_weight"])
def test_values_beyond_a_float16_models_range_are_named_as_such(backend, where):
    """A float16 model casts float64 data to float16, where 1e5 is infinite: the error
    says the values are out of float16's range (not "NaN or infinite", which the data
    is not), names the argument, and the cast does not warn first."""
    if getattr(backend.xp, "float16", None) is None:
        pytest.skip(f"the {backend.name} namespace has no float16")
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(N, F)), "y": rng.normal(size=(N, K)), "sample_weight": rng.uniform(0.5, 2, N)}
    data["validation x"], data["validation y"] = data["x"][:10].copy(), data["y"][:10].copy()
    data[where][-1, ...] = 1e5
    put = backend.asarray
    model = am.MLP([F, 5, K], dtype="float16", seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match=rf"^{where} has values beyond the range of float16 \(largest finite "
                                         r"65504\): scale them, or build the model with dtype='float32'"):
        model.fit(put(data["x"]), put(data["y"]), sample_weight=put(data["sample_weight"]), loss="mse", epochs=1,
                  validation_data=(put(data["validation x"]), put(data["validation y"])), progress=False)


@pytest.mark.parametrize("labels", ["int", "bool", "float"])
def test_binary_labels_of_the_wrong_shape_are_named_with_the_data_shapes(backend, labels):
    """0/1 labels of shape (n,) for a model of 2 sigmoid outputs: the message gives the
    labels' and the outputs' shapes over all n rows (not those of the one row the shape
    is checked on), whatever the labels' dtype."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, F)), rng.integers(0, 2, size=N)
    y = {"int": y, "bool": y.astype(bool), "float": y.astype(np.float64)}[labels]
    model = am.MLP([F, 5, 2], output_activation="sigmoid", seed=0, **backend.model_kwargs())
    with pytest.raises(ValueError, match=rf"binary_cross_entropy: targets shape \({N},\) does not match outputs "
                                         rf"shape \({N}, 2\)"):
        model.fit(backend.asarray(x), backend.asarray(y), epochs=1, progress=False)
